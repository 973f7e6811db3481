"""tfkdp: knowledge distillation with structured channel pruning for Keras 3.

Importing tfkdp has no global side effects: no environment variables, no
mixed-precision policy, no device settings. Importing it registers tfkdp's
serializable objects (`ChannelMask`, `WeightMask`, the distillation losses,
the schedules) with Keras, so `keras.saving.load_model` reads masked models
after a plain `import tfkdp`.

Packages: `tfkdp.pruning` (structured-pruning core), `tfkdp.pruning.sparsity`
(ADMM, schedules), `tfkdp.distill` (Distiller, losses), `tfkdp.train`
(phases), `tfkdp.methods` (recipes); modules `data`, `models`, `metrics`.
"""

import sys

from tfkdp import checks, data, distill, methods, metrics, models, pruning, scaling, train
from tfkdp.distill import losses
from tfkdp.distill.distiller import Distiller
from tfkdp.distill.losses import AttentionTransfer, DecoupledKD, HintLoss, SoftTargetKD
from tfkdp.metrics import count_macs, count_params
from tfkdp.pruning import criteria
from tfkdp.pruning.allocation import make_plan
from tfkdp.pruning.analysis import channel_groups
from tfkdp.pruning.cost import plan_macs, plan_params
from tfkdp.pruning.handlers import register_layer
from tfkdp.pruning.masking import apply_plan, plan_of
from tfkdp.pruning.masks import ChannelMask, WeightMask
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.records import ChannelGroup, ParamRef
from tfkdp.pruning.sparsity import schedules
from tfkdp.pruning.sparsity.admm import ADMM
from tfkdp.pruning.surgery import fold_batchnorm, merge_channels, strip_channels
from tfkdp.train import runtime
from tfkdp.version import __version__

# Short module paths of the flat layout (`from tfkdp.losses import SoftTargetKD`).
for _name, _module in (("losses", losses), ("criteria", criteria), ("schedules", schedules),
                       ("runtime", runtime)):  # fmt: skip
    sys.modules.setdefault(f"{__name__}.{_name}", _module)
del _name, _module

__all__ = [
    "__version__",
    # packages and modules
    "checks",
    "data",
    "distill",
    "methods",
    "metrics",
    "models",
    "pruning",
    "scaling",
    "train",
    "criteria",
    "losses",
    "schedules",
    "runtime",
    # graph and plans
    "ChannelGroup",
    "ParamRef",
    "channel_groups",
    "register_layer",
    "PruningPlan",
    "make_plan",
    "apply_plan",
    "plan_of",
    "ChannelMask",
    "WeightMask",
    "strip_channels",
    "merge_channels",
    "fold_batchnorm",
    "plan_macs",
    "plan_params",
    # distillation and ADMM
    "ADMM",
    "Distiller",
    "SoftTargetKD",
    "HintLoss",
    "AttentionTransfer",
    "DecoupledKD",
    # cost
    "count_macs",
    "count_params",
]
