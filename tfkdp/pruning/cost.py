"""The exact cost of a plan without building the stripped model.

`CostModel(model)` gives the MACs and parameters of the stripped model for any
keep counts in microseconds (budget searches call it thousands of times);
`plan_macs` / `plan_params` give the same for one plan by walking the graph
with the pruned shapes. Both read each layer's handler (`LayerHandler.macs`,
`LayerHandler.mac_terms`), the same rules `tfkdp.count_macs` uses, so
`plan_macs(model, plan) == CostModel(model).macs(plan) ==
count_macs(strip_channels(model, plan))`.
"""

import math

import numpy as np

from tfkdp import metrics
from tfkdp.pruning.analysis import channel_groups, get_layer, get_weight
from tfkdp.pruning.handlers import get_handler
from tfkdp.pruning.masks import is_mask_variable
from tfkdp.pruning.rebuild import as_plan, masks_by_variable

__all__ = ["CostModel", "plan_cost", "plan_macs", "plan_params"]


class CostModel:
    """Exact MACs and parameters of the stripped model for any keep counts.

    Args:
        model: a built functional model.
        groups: its `ChannelGroup`s (computed when omitted).

    Example:
        >>> cost = CostModel(model)
        >>> cost.macs({"stem_conv": 4}) < cost.macs({})
        True
    """

    def __init__(self, model, groups=None):
        self.groups = list(groups) if groups is not None else channel_groups(model)
        self.index = {g.id: i for i, g in enumerate(self.groups)}
        self.sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        # weight key -> {"shape", "axes": {axis: [(group index, repeat)]}}
        weights = {}
        for gi, group in enumerate(self.groups):
            for ref in tuple(group.out_params) + tuple(group.in_params):
                key = (ref.layer, ref.attr)
                if key not in weights:
                    shape = tuple(int(d) for d in get_weight(model, ref).shape)
                    weights[key] = {"shape": shape, "axes": {}}
                entry = weights[key]
                axis = int(ref.axis) % len(entry["shape"])
                # Entries per channel on that axis: spatial positions after Flatten × depth multiplier.
                repeat = int(getattr(ref, "repeat", 1) or 1) * int(getattr(ref, "block", 1) or 1)
                entry["axes"].setdefault(axis, []).append((gi, repeat))
        self._weights = weights
        self.base_params = metrics.count_params(model)
        self.base_macs = 0
        # MAC terms: (macs at full width, [(weight key, axes)]); a product of kept fractions.
        self._mac_terms = []
        self.term_layers = []  # the layer of each MAC term (for cost models by layer kind)
        for path, macs in metrics.layer_macs(model):
            self.base_macs += macs
            layer = get_layer(model, path)
            handler = get_handler(layer, inherit=True)
            for share, attrs in handler.mac_terms(layer, macs):
                self._mac_terms.append((share, [(path, attr) for attr in attrs]))
                self.term_layers.append(layer)

    def _kept_dims(self, key, pruned):
        entry = self._weights[key]
        dims = list(entry["shape"])
        for axis, refs in entry["axes"].items():
            dims[axis] -= sum(int(pruned[gi]) * rep for gi, rep in refs)
        return entry["shape"], dims

    def _pruned(self, keep):
        pruned = np.zeros(len(self.groups), dtype=np.int64)
        for gid, k in _keep_counts(keep).items():
            if gid not in self.index:
                raise ValueError(f"unknown group id {gid!r}; groups are {sorted(self.index)}")
            pruned[self.index[gid]] = self.sizes[self.index[gid]] - k
        return pruned

    def macs_for_pruned(self, pruned):
        return float(np.sum(self.term_macs(pruned)))

    def term_macs(self, pruned, out_tile=1):
        """MACs of every MAC term (`term_layers` order) for `pruned` channels per group.

        With `out_tile > 1` a pruned count on a kernel's last axis (its output
        channels) is rounded up to a multiple of `out_tile`, capped at the full
        count: the MACs a runtime that computes output channels in tiles of
        `out_tile` actually does.
        """
        out = np.empty(len(self._mac_terms), dtype=np.float64)
        for i, (macs, kernels) in enumerate(self._mac_terms):
            factor = 1.0
            for key in kernels:
                if key not in self._weights:
                    continue
                shape, dims = self._kept_dims(key, pruned)
                last = len(shape) - 1
                for axis, (full, kept) in enumerate(zip(shape, dims, strict=True)):
                    if full != kept:
                        if out_tile > 1 and axis == last:
                            kept = min(full, -(-kept // out_tile) * out_tile)
                        factor *= kept / full
            out[i] = macs * factor
        return out

    def params_for_pruned(self, pruned):
        total = float(self.base_params)
        for key in self._weights:
            shape, dims = self._kept_dims(key, pruned)
            total -= math.prod(shape) - math.prod(dims)
        return total

    def macs(self, keep):
        """MACs of the stripped model that keeps `keep` (`{group_id: count or indices}`)."""
        return int(round(self.macs_for_pruned(self._pruned(keep))))

    def params(self, keep):
        """Parameters of the stripped model that keeps `keep`."""
        return int(round(self.params_for_pruned(self._pruned(keep))))


def _keep_counts(keep):
    if keep is None:
        return {}
    items = keep.items() if hasattr(keep, "items") else keep
    return {gid: (len(v) if isinstance(v, (list, tuple, np.ndarray)) else int(v)) for gid, v in items}


def plan_cost(model, plan, groups=None):
    """`{"macs", "params", "macs_reduction", "params_reduction"}` of `model` stripped by `plan`."""
    cost = CostModel(model, groups)
    macs, params = cost.macs(plan), cost.params(plan)
    return {
        "macs": macs,
        "params": params,
        "macs_reduction": 1.0 - macs / cost.base_macs,
        "params_reduction": 1.0 - params / cost.base_params,
    }


def _kept_shape(analysis, key, pruned):
    shape = [1 if d is None else int(d) for d in analysis.shapes[key]]
    keep = analysis.tensor_keep(key, pruned) if pruned else None
    if keep is not None:
        shape[-1] = int(np.sum(keep))
    return tuple(shape)


def plan_macs(model, plan):
    """MACs of `strip_channels(model, plan)` without building it.

    Equal to `tfkdp.count_macs(strip_channels(model, plan))` (same counting
    rules, see `tfkdp.metrics`), at a small fraction of the cost: use it in
    budget searches.

    Args:
        model: a functional `keras.Model`.
        plan: a `PruningPlan` (or mapping).

    Returns:
        The MAC count of one forward pass at batch size 1, as an `int`.

    Raises:
        ValueError: if the plan does not fit the model.
    """
    analysis, plan = as_plan(model, plan)
    pruned = analysis.pruned(plan)
    total = 0
    for flat in analysis.nodes:
        handler = get_handler(flat.layer, inherit=True)
        if handler is None or not flat.inputs:
            continue
        in_shapes = [_kept_shape(analysis, k, pruned) for k in flat.inputs]
        out_shapes = [_kept_shape(analysis, k, pruned) for k in flat.outputs]
        total += handler.macs(flat.layer, in_shapes, out_shapes)
    return int(total)


def plan_params(model, plan):
    """Parameter count of `strip_channels(model, plan)` without building it.

    Counts every weight, batch-norm moving statistics included, like
    `tfkdp.count_params`.

    Args:
        model: a functional `keras.Model`.
        plan: a `PruningPlan` (or mapping).

    Returns:
        The parameter count as an `int`.
    """
    analysis, plan = as_plan(model, plan)
    masks = masks_by_variable(analysis, analysis.pruned(plan))
    total, seen = 0, set()
    for variable in model.weights:
        if id(variable) in seen or is_mask_variable(variable):
            continue
        seen.add(id(variable))
        shape = list(variable.shape)
        for axis, keep in masks.get(id(variable), {}).items():
            shape[axis] = int(np.sum(keep))
        total += math.prod(shape)
    return int(total)
