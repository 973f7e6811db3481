"""Pruning policy: channel groups × criterion × budget → `PruningPlan`.

A budget is a target **MAC reduction** (0.5 = the stripped model does half the
multiply-accumulates) or **parameter reduction**, never a channel ratio:
removing half of a conv's output channels also halves the next conv's input
channels, so the MAC ratio is not the channel ratio.

Allocation:
- `"global"`: within a group, channels are removed least important first;
  removing a group's first j channels is scored by the share of the group's
  total importance they hold (scores normalised per group, in [0, 1]),
  divided by `(relative cost of one of the group's channels) ** cost_exponent`
  (MAC cost for a MAC target, parameter cost for a parameter target: a channel
  in a 28×28 stage costs more than one at 7×7). These removal steps are ranked
  across all groups and taken in order until the target is met.
- `"uniform"`: every prunable group keeps the same fraction of its channels;
  the criterion picks which.

Both respect `min_channels` (a group never keeps fewer) and `round_to` (kept
counts are multiples of it, kernel-friendly; a group smaller than that keeps
all), never touch unprunable groups, and land within `tolerance` (relative to
the target's remaining MACs/params) by finishing with single `round_to` steps
on individual groups. Costs come from an exact analytic model of the stripped
model (each conv/dense costs its MACs × kept-in/in × kept-out/out), checked
against the stripped model when `verify=True`.
"""

import math

import numpy as np
from absl import logging

from tfkdp.checks import check_fraction, check_int, check_number
from tfkdp.onednn import ONEDNN_SAFE_CHANNELS
from tfkdp.pruning import criteria as criteria_lib
from tfkdp.pruning.cost import CostModel, plan_macs, plan_params
from tfkdp.pruning.masking import apply_plan
from tfkdp.pruning.plan import PruningPlan

__all__ = ["make_plan", "prune", "onednn_hazards", "ALLOCATIONS"]

ALLOCATIONS = ("global", "uniform")


_ONEDNN_GUARDS = ("auto", "keep", "raise", "off")


def onednn_hazards(model, groups, onednn_guard="auto"):
    """`(mode, {group_id: [layer paths]})`: the guard in force and the groups it covers.

    `mode` is `"keep"`, `"raise"` or `"off"` (`"auto"` resolved with
    `tfkdp.onednn.onednn_active()`); the dict is empty when `mode == "off"`.
    A hazardous group narrower than 16 channels in the unpruned model cannot be
    made safe by pruning and is logged as a warning.

    Reference:
        uxlfoundation/oneDNN#6035.
    """
    from tfkdp import onednn

    if onednn_guard not in _ONEDNN_GUARDS:
        raise ValueError(
            f"onednn_guard must be one of {_ONEDNN_GUARDS}; received onednn_guard={onednn_guard!r}"
        )
    mode = onednn_guard
    if mode == "auto":
        mode = "keep" if onednn.onednn_active() else "off"
    if mode == "off":
        return mode, {}
    hazards = onednn.hazardous_groups(model, groups)
    sizes = {g.id: g.size for g in groups}
    for group_id, layers in hazards.items():
        if sizes.get(group_id, ONEDNN_SAFE_CHANNELS) < ONEDNN_SAFE_CHANNELS:
            logging.warning(
                "Group %r (%d channels) feeds the strided 1x1 convolution(s) %s with fewer than %d "
                "input channels even unpruned: oneDNN's AVX-512 kernel can corrupt memory "
                "training it (oneDNN#6035); run with TF_ENABLE_ONEDNN_OPTS=0.",
                group_id, sizes[group_id], layers, ONEDNN_SAFE_CHANNELS,
            )  # fmt: skip
    if hazards:
        logging.info("oneDNN guard (%s) on groups %s", mode, sorted(hazards))
    return mode, hazards


def _raise_on_hazards(plan, groups, hazards):
    sizes = {g.id: g.size for g in groups}
    for group_id, layers in hazards.items():
        kept = len(plan[group_id]) if group_id in plan else sizes[group_id]
        if kept < ONEDNN_SAFE_CHANNELS <= sizes[group_id]:
            raise ValueError(
                f"the plan keeps {kept} channels of group {group_id!r}, which feeds the strided "
                f"1x1 convolution {layers[0]!r}: below {ONEDNN_SAFE_CHANNELS} input channels "
                "oneDNN's AVX-512 kernel corrupts memory in training (oneDNN#6035). Remedies: "
                "make_plan(..., onednn_guard='keep') keeps 16 channels there, or turn oneDNN's "
                "custom operations off (TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported) "
                "and pass onednn_guard='off'"
            )


_TARGET_NAMES = {
    "macs": "target_macs_reduction", "params": "target_params_reduction",
    "latency_ms": "target_latency_ms", "latency": "target_latency_reduction",
}  # fmt: skip


def _round_up(value, multiple, size):
    return min(size, int(math.ceil(value / multiple) * multiple))


def make_plan(
    model,
    target_macs_reduction=None,
    target_params_reduction=None,
    criterion="l1",
    allocation="global",
    min_channels=1,
    round_to=1,
    data=None,
    groups=None,
    scores=None,
    cost_exponent=0.5,
    tolerance=0.02,
    verify=True,
    onednn_guard="auto",
    target_latency_ms=None,
    target_latency_reduction=None,
    latency_model=None,
):
    """A `PruningPlan` that meets a MAC, parameter or latency target.

    Args:
        model: the functional model to prune (not modified).
        target_macs_reduction: fraction of MACs to remove, in (0, 1).
        target_params_reduction: fraction of parameters to remove, in (0, 1);
            give exactly one of the two targets.
        criterion: a name from `tfkdp.criteria.names()` or a `Criterion`.
        allocation: `"global"` or `"uniform"` (see the module docstring).
        min_channels: fewest channels any pruned group keeps (>= 1).
        round_to: kept counts are multiples of this (>= 1).
        data: batches for data-driven criteria (`"taylor"`).
        groups: the model's `ChannelGroup`s (computed when omitted).
        scores: precomputed `{group_id: scores}`; replaces `criterion`.
        cost_exponent: how strongly global allocation prefers removing
            expensive channels: 0 ranks by normalised importance only, 1 by
            importance per MAC.
        tolerance: allowed relative deviation of the stripped model's MACs
            (or params) from the target's, e.g. 0.02 = 2 %.
        verify: check the analytic count against the stripped model.
        target_latency_ms: predicted latency (ms, batch 1) the stripped model
            must not exceed, on `latency_model`'s runtime and threads.
        target_latency_reduction: fraction of the predicted latency to
            remove, in (0, 1); give exactly one target in all.
        latency_model: a `tfkdp.pruning.latency_model.LatencyModel` of
            `model` (needed by the latency targets; built with its defaults,
            LiteRT and 1 thread, when omitted).
        onednn_guard: what to do about groups that feed a strided 1×1
            convolution (`tfkdp.onednn.hazardous_groups`), which oneDNN's
            AVX-512 kernel corrupts memory on below 16 input channels:
            `"keep"` keeps at least 16 channels on them, `"raise"` raises a
            `ValueError` naming the layer when the plan would leave fewer,
            `"off"` does nothing, `"auto"` (default) is `"keep"` when oneDNN's
            custom operations are active on an AVX-512 CPU
            (`tfkdp.onednn.onednn_active()`) and `"off"` otherwise.

    Returns:
        A `PruningPlan`; groups it does not name keep all their channels.

    Raises:
        ValueError: for bad arguments, or a target that cannot be reached (the
            message gives the largest reachable reduction) or hit within
            `tolerance` with this `round_to`.

    Example:
        >>> plan = make_plan(model, target_macs_reduction=0.5, criterion="l1", round_to=2)
        >>> round(1 - tfkdp.plan_macs(model, plan) / tfkdp.count_macs(model), 1)
        0.5
    """

    targets = {
        "macs": target_macs_reduction, "params": target_params_reduction,
        "latency_ms": target_latency_ms, "latency": target_latency_reduction,
    }  # fmt: skip
    given = [k for k, v in targets.items() if v is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of target_macs_reduction, target_params_reduction, "
            "target_latency_ms and target_latency_reduction; received "
            + ", ".join(f"{_TARGET_NAMES[k]}={v!r}" for k, v in targets.items() if v is not None)
        )
    kind = given[0]
    if kind == "latency_ms":
        check_number("target_latency_ms", target_latency_ms, 0, strict=True)
    else:
        check_fraction(_TARGET_NAMES[kind], targets[kind])
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}; received allocation={allocation!r}")
    check_int("min_channels", min_channels, 1)
    check_int("round_to", round_to, 1)
    check_number("cost_exponent", cost_exponent, 0)
    check_fraction("tolerance", tolerance)

    cost = CostModel(model, groups)
    if kind.startswith("latency"):
        if latency_model is None:
            from tfkdp.pruning.latency_model import LatencyModel

            latency_model = LatencyModel(model, groups=cost.groups)
        evaluate = latency_model.predict_pruned
        base = latency_model.predict_pruned(np.zeros(len(cost.groups), dtype=np.int64))
    else:
        evaluate = cost.macs_for_pruned if kind == "macs" else cost.params_for_pruned
        base = cost.base_macs if kind == "macs" else cost.base_params
    target = target_latency_ms if kind == "latency_ms" else (1.0 - targets[kind]) * base
    label = f"{_TARGET_NAMES[kind]}={targets[kind]!r}"

    prunable = [i for i, g in enumerate(cost.groups) if g.prunable]
    floors = np.array(
        [_round_up(max(min_channels, 1), round_to, int(g.size)) for g in cost.groups], dtype=np.int64
    )
    mode, hazards = onednn_hazards(model, cost.groups, onednn_guard)
    if mode == "keep":
        for i, group in enumerate(cost.groups):
            if group.id in hazards:
                safe = _round_up(min(ONEDNN_SAFE_CHANNELS, group.size), round_to, int(group.size))
                floors[i] = max(floors[i], safe)
    max_pruned = np.zeros(len(cost.groups), dtype=np.int64)
    for i in prunable:
        max_pruned[i] = cost.sizes[i] - floors[i]
    smallest = evaluate(max_pruned)
    if smallest > target * (1.0 + tolerance):
        reach = (f"the fastest reachable predicted latency is {smallest:.3f} ms (the unpruned "
                 f"model: {base:.3f} ms)" if kind.startswith("latency") else
                 f"the largest reachable {kind} reduction is {1.0 - smallest / base:.4f}")  # fmt: skip
        raise ValueError(
            f"{label} is unreachable: {reach} with min_channels={min_channels}, "
            f"round_to={round_to} ({len(cost.groups) - len(prunable)} of {len(cost.groups)} "
            "groups are not prunable)"
        )

    if scores is None:
        crit = criteria_lib.get(criterion)
        scores = crit(model, [cost.groups[i] for i in prunable], data=data)
    order = {}  # group index -> channel indices, least important first
    for i in prunable:
        group = cost.groups[i]
        if group.id not in scores:
            raise ValueError(f"scores has no entry for prunable group {group.id!r}")
        s = np.asarray(scores[group.id], dtype=np.float64).reshape(-1)
        if s.shape != (group.size,):
            raise ValueError(f"scores[{group.id!r}] has {s.size} values; the group has {group.size}")
        order[i] = np.argsort(s, kind="stable")

    if allocation == "global":
        pruned = _global_allocation(cost, evaluate, scores, order, max_pruned, target, cost_exponent, round_to)
    else:
        pruned = _uniform_allocation(cost, evaluate, max_pruned, target, round_to)
    pruned = _refine(cost, evaluate, pruned, max_pruned, target, tolerance, round_to)
    achieved = evaluate(pruned)
    if abs(achieved - target) > tolerance * target and not (
        kind.startswith("latency") and achieved <= target
    ):
        raise ValueError(
            f"{label} cannot be hit within tolerance={tolerance} "
            f"with round_to={round_to}: the closest plan removes {1.0 - achieved / base:.4f}; "
            "use a smaller round_to or a larger tolerance"
        )
    keep = {}
    for i in prunable:
        if pruned[i] > 0:
            keep[cost.groups[i].id] = sorted(int(c) for c in order[i][pruned[i]:])
    plan = PruningPlan(keep)
    if mode == "raise":
        _raise_on_hazards(plan, cost.groups, hazards)
    if verify and not kind.startswith("latency"):
        _verify(model, plan, kind, achieved)
    logging.info(
        "make_plan: %s %s reduction %.4f (%s), %d groups pruned",
        allocation, kind, 1.0 - achieved / base, label, len(keep),
    )
    return plan


def _global_allocation(cost, evaluate, scores, order, max_pruned, target, cost_exponent, round_to):
    # Marginal cost of one channel of each group, relative to the mean.
    zero = np.zeros(len(cost.groups), dtype=np.int64)
    full = evaluate(zero)
    marginal = {}
    for i in order:
        one = zero.copy()
        one[i] = 1
        marginal[i] = max(full - evaluate(one), 1e-12)
    mean_marginal = float(np.mean(list(marginal.values()))) if marginal else 1.0
    candidates = []
    for i, idx in order.items():
        s = np.maximum(np.asarray(scores[cost.groups[i].id], dtype=np.float64), 0.0)
        # Normalised per group: the share of the group's total importance removed
        # once its `rank + 1` least important channels are gone. It grows with
        # every channel removed, so no group is emptied just because its scores
        # are flat, and a group whose importance sits in few channels gives up
        # the others cheaply.
        share = np.cumsum(s[idx]) / max(float(np.sum(s)), 1e-30)
        if not np.sum(s) > 0:
            share = np.arange(1, s.size + 1) / s.size
        weight = (marginal[i] / mean_marginal) ** cost_exponent
        for rank in range(int(max_pruned[i])):
            candidates.append((share[rank] / weight, i, rank))
    candidates.sort(key=lambda t: (t[0], t[1], t[2]))
    group_of = np.array([c[1] for c in candidates], dtype=np.int64)

    def pruned_for(n):
        pruned = np.bincount(group_of[:n], minlength=len(cost.groups)).astype(np.int64)
        for i in order:
            kept = _round_up(cost.sizes[i] - pruned[i], round_to, int(cost.sizes[i]))
            pruned[i] = min(max_pruned[i], cost.sizes[i] - kept)
        return pruned

    lo, hi = 0, len(candidates)  # find the smallest n with cost <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(pruned_for(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return pruned_for(lo)


def _uniform_allocation(cost, evaluate, max_pruned, target, round_to):
    def pruned_for(fraction):
        pruned = np.zeros(len(cost.groups), dtype=np.int64)
        for i in np.flatnonzero(max_pruned):
            size = int(cost.sizes[i])
            kept = _round_up(size * (1.0 - fraction), round_to, size)
            pruned[i] = min(max_pruned[i], size - kept)
        return pruned

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if evaluate(pruned_for(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return pruned_for(hi)


def _refine(cost, evaluate, pruned, max_pruned, target, tolerance, round_to):
    """Moves one group at a time to its next allowed kept count while that brings the cost closer."""
    pruned = pruned.copy()
    allowed = {}  # group index -> sorted allowed pruned counts
    for i in np.flatnonzero(max_pruned):
        size = int(cost.sizes[i])
        kept = {size} | {k for k in range(round_to, size + 1, round_to) if size - k <= max_pruned[i]}
        allowed[i] = sorted(size - k for k in kept)
    error = abs(evaluate(pruned) - target)
    for _ in range(200):
        if error <= 0.5 * tolerance * target:
            break
        best = None
        for i, options in allowed.items():
            pos = int(np.searchsorted(options, pruned[i]))
            for j in (pos - 1, pos + 1 if pos < len(options) and options[pos] == pruned[i] else pos):
                if not 0 <= j < len(options) or options[j] == pruned[i]:
                    continue
                trial = pruned.copy()
                trial[i] = options[j]
                trial_error = abs(evaluate(trial) - target)
                if trial_error < error and (best is None or trial_error < best[0]):
                    best = (trial_error, trial)
        if best is None:
            break
        error, pruned = best
    return pruned


def _verify(model, plan, kind, achieved):
    exact = plan_macs(model, plan) if kind == "macs" else plan_params(model, plan)
    if abs(exact - achieved) > 1e-6 * max(exact, 1) + 0.5:
        raise RuntimeError(
            f"internal cost model disagrees with the stripped model: {kind} {achieved:.0f} vs "
            f"{exact} for plan {plan!r}; please report this model"
        )


def prune(model, target_macs_reduction=None, **kwargs):
    """`make_plan` then `apply_plan`: returns `(masked_model, plan)`.

    Args:
        model: the model to prune (not modified).
        target_macs_reduction: see `make_plan`.
        **kwargs: forwarded to `make_plan`.

    Returns:
        `(masked_model, plan)`; strip it later with `tfkdp.strip_channels`.
    """
    plan = make_plan(model, target_macs_reduction=target_macs_reduction, **kwargs)
    return apply_plan(model, plan), plan
