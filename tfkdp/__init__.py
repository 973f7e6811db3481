"""tfkdp: knowledge distillation with structured channel pruning for Keras 3.

Importing tfkdp has no global side effects: no environment variables, no
mixed-precision policy, no device settings. Importing it registers tfkdp's
serializable objects (`ChannelMask`, the distillation losses) with Keras, so
`keras.saving.load_model` reads masked models after a plain `import tfkdp`.
"""

from tfkdp import (
    admm,
    criteria,
    data,
    graph,
    losses,
    masking,
    methods,
    metrics,
    models,
    plan,
    pruner,
    runtime,
    schedules,
    surgery,
    training,
)
from tfkdp.admm import ADMM
from tfkdp.distiller import Distiller
from tfkdp.graph import ChannelGroup, ParamRef, channel_groups, register_layer
from tfkdp.losses import AttentionTransfer, DecoupledKD, HintLoss, SoftTargetKD
from tfkdp.masking import ChannelMask, apply_plan, plan_of
from tfkdp.metrics import count_macs, count_params
from tfkdp.plan import PruningPlan
from tfkdp.pruner import make_plan
from tfkdp.surgery import fold_batchnorm, plan_macs, plan_params, strip_channels
from tfkdp.version import __version__

__all__ = [
    "__version__",
    # modules
    "admm",
    "criteria",
    "data",
    "graph",
    "losses",
    "masking",
    "methods",
    "metrics",
    "models",
    "plan",
    "pruner",
    "runtime",
    "schedules",
    "surgery",
    "training",
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
    "strip_channels",
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
