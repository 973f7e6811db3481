"""Structured pruning: graph analysis, per-layer handlers, plans, criteria, budgets,
masks as state, the rebuild engine and surgery.

Modules (one concept each):
- `walker`: the one walk over a functional graph (nested models inlined);
- `records`: `ParamRef`, `ChannelGroup`, tensor layouts;
- `handlers`: the per-layer handler registry (`register_layer`) and the
  generic handlers; `layers`: Keras' own layers;
- `analysis`: `channel_groups` (channel dependency analysis);
- `plan`: `PruningPlan`; `criteria`: importance criteria;
- `cost`: exact MAC/parameter cost of a plan; `allocation`: `make_plan`;
- `masks`: mask constraints holding their masks in variables;
  `masking`: `apply_plan`, `plan_of`;
- `rebuild`: the rebuild engine; `surgery`: strip, merge, fold;
- `sparsity/`: ADMM and sparsity schedules.
"""

from tfkdp.pruning import (
    allocation,
    analysis,
    cost,
    criteria,
    handlers,
    masking,
    masks,
    plan,
    rebuild,
    records,
    sparsity,
    surgery,
    walker,
)
from tfkdp.pruning.allocation import make_plan, prune
from tfkdp.pruning.analysis import channel_groups, channel_values, get_layer, get_weight
from tfkdp.pruning.cost import CostModel, plan_cost, plan_macs, plan_params
from tfkdp.pruning.handlers import (
    Coupler,
    LayerHandler,
    PassThrough,
    Producer,
    Unprunable,
    get_handler,
    register_layer,
    registered_layers,
)
from tfkdp.pruning.masking import apply_plan, plan_of
from tfkdp.pruning.masks import ChannelMask, WeightMask
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.records import ChannelGroup, ParamRef
from tfkdp.pruning.surgery import fold_batchnorm, hard_average, merge_channels, strip_channels

__all__ = [
    "allocation",
    "analysis",
    "cost",
    "criteria",
    "handlers",
    "masking",
    "masks",
    "plan",
    "rebuild",
    "records",
    "sparsity",
    "surgery",
    "walker",
    "make_plan",
    "prune",
    "channel_groups",
    "channel_values",
    "get_layer",
    "get_weight",
    "CostModel",
    "plan_cost",
    "plan_macs",
    "plan_params",
    "LayerHandler",
    "PassThrough",
    "Producer",
    "Coupler",
    "Unprunable",
    "get_handler",
    "register_layer",
    "registered_layers",
    "apply_plan",
    "plan_of",
    "ChannelMask",
    "WeightMask",
    "PruningPlan",
    "ChannelGroup",
    "ParamRef",
    "strip_channels",
    "fold_batchnorm",
    "merge_channels",
    "hard_average",
]
