"""Budgets: MAC/parameter targets, global and uniform allocation, constraints."""

import numpy as np
import pytest

from tfkdp import metrics, models
from tfkdp import pruning as pruner
from tfkdp.pruning import channel_groups, plan_macs, plan_params, strip_channels


def _resnet(width=8):
    return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("round_to", [1, 4])
def test_allocation_hits_mac_target_within_two_percent(allocation, round_to):
    model = models.resnet_cifar(14, width=8, input_shape=(12, 12, 1), num_classes=3)
    base = metrics.count_macs(model)
    plan = pruner.make_plan(model, target_macs_reduction=0.5, allocation=allocation, round_to=round_to)
    stripped = strip_channels(model, plan)
    macs = metrics.count_macs(stripped)
    assert abs(macs - 0.5 * base) <= 0.02 * 0.5 * base
    assert macs == plan_macs(model, plan)
    sizes = {g.id: g.size for g in channel_groups(model)}
    for gid, kept in plan.items():
        assert len(kept) % round_to == 0 or len(kept) == sizes[gid]


def test_allocation_hits_param_target_within_two_percent():
    model = models.vgg_cifar(11, width_multiplier=0.125, input_shape=(16, 16, 1), num_classes=3)
    base = metrics.count_params(model)
    plan = pruner.make_plan(model, target_params_reduction=0.4)
    params = metrics.count_params(strip_channels(model, plan))
    assert abs(params - 0.6 * base) <= 0.02 * 0.6 * base


@pytest.mark.parametrize(
    "build",
    [
        lambda: _resnet(),
        lambda: models.vgg_cifar(11, width_multiplier=0.125, input_shape=(16, 16, 1), num_classes=3),
        lambda: models.mobilenet_v2_cifar(0.25, input_shape=(8, 8, 3), num_classes=3),
    ],
    ids=["resnet8", "vgg11_flatten_dense", "mobilenet_v2_depthwise"],
)
def test_cost_model_equals_stripped_model_counts_for_random_plans(build):
    model = build()
    groups = channel_groups(model)
    cost = pruner.CostModel(model, groups)
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = {
            g.id: sorted(rng.choice(g.size, size=int(rng.integers(1, g.size + 1)), replace=False))
            for g in groups
            if g.prunable and rng.uniform() < 0.7
        }
        assert cost.macs(keep) == plan_macs(model, keep)
        assert cost.params(keep) == plan_params(model, keep)
    assert cost.macs({}) == metrics.count_macs(model)


def test_unprunable_groups_min_channels_and_scores_are_respected():
    model = _resnet()
    groups = channel_groups(model)
    # Scores that make the low indices the important ones in every group.
    scores = {g.id: np.arange(g.size, 0, -1, dtype=float) for g in groups if g.prunable}
    plan = pruner.make_plan(model, target_macs_reduction=0.6, scores=scores, min_channels=3)
    unprunable = {g.id for g in groups if not g.prunable}
    assert unprunable and not unprunable & set(plan)
    for kept in plan.values():
        assert len(kept) >= 3
        assert list(kept) == list(range(len(kept)))  # the highest-scoring channels survive


def test_global_allocation_prunes_the_group_whose_importance_is_concentrated():
    model = _resnet()
    groups = [g for g in channel_groups(model) if g.prunable]
    scores = {g.id: np.ones(g.size) for g in groups}
    skewed = "stage3_block1_conv1"
    scores[skewed] = np.r_[np.full(4, 100.0), np.full(28, 0.01)]  # 4 channels hold it all
    plan = pruner.make_plan(model, target_macs_reduction=0.3, scores=scores, cost_exponent=0.0)
    sizes = {g.id: g.size for g in groups}
    kept_fraction = {gid: len(plan.get(gid, range(sizes[gid]))) / sizes[gid] for gid in sizes}
    assert kept_fraction[skewed] == min(kept_fraction.values())


def test_mac_aware_allocation_prunes_expensive_channels_more():
    model = _resnet()
    groups = [g for g in channel_groups(model) if g.prunable]
    scores = {g.id: np.linspace(1.0, 2.0, g.size) for g in groups}
    sizes = {g.id: g.size for g in groups}

    def kept_fraction(exponent, gid):
        # onednn_guard="off": on an AVX-512 CPU with oneDNN on, "auto" would keep the 8-channel
        # stem whole (it feeds a strided 1x1 conv), and this test is about the cost exponent.
        plan = pruner.make_plan(model, target_macs_reduction=0.4, scores=scores, cost_exponent=exponent,
                                onednn_guard="off")  # fmt: skip
        return len(plan.get(gid, range(sizes[gid]))) / sizes[gid]

    # A stage-1 channel (12×12, in the residual stream) costs more MACs than a stage-3 one (3×3).
    assert kept_fraction(1.0, "stem_conv") < kept_fraction(0.0, "stem_conv")
    assert kept_fraction(1.0, "stage3_block1_conv1") > kept_fraction(0.0, "stage3_block1_conv1")


def test_unreachable_target_states_largest_reachable_reduction():
    model = _resnet()
    best = pruner.plan_cost(
        model, {g.id: [0] for g in channel_groups(model) if g.prunable}
    )["macs_reduction"]
    with pytest.raises(ValueError, match=rf"largest reachable macs reduction is {best:.4f}"):
        # Guard off: the bound above prunes every group, which "auto" forbids for the stem on an
        # AVX-512 CPU with oneDNN on (tests/test_onednn_guard.py covers the guard).
        pruner.make_plan(model, target_macs_reduction=0.999, onednn_guard="off")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"target_macs_reduction": 0.5, "target_params_reduction": 0.5}, "exactly one"),
        ({"target_macs_reduction": 1.5}, "target_macs_reduction=1.5"),
        ({"target_macs_reduction": 0.5, "allocation": "local"}, "allocation='local'"),
        ({"target_macs_reduction": 0.5, "min_channels": 0}, "min_channels=0"),
        ({"target_macs_reduction": 0.5, "round_to": 2.5}, "round_to=2.5"),
        ({"target_macs_reduction": 0.5, "criterion": "l7"}, "'l7'"),
        ({"target_macs_reduction": 0.5, "cost_exponent": -1}, "cost_exponent=-1"),
    ],
)
def test_make_plan_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruner.make_plan(_resnet(4), **kwargs)


def test_prune_returns_masked_model_equal_to_stripped(tiny_images):
    x, _ = tiny_images
    model = _resnet()
    masked, plan = pruner.prune(model, target_macs_reduction=0.5, criterion="l2")
    stripped = strip_channels(masked, plan)
    want = masked.predict(x, verbose=0)
    # Masked and stripped compute the same function; 1e-5 of the output scale.
    np.testing.assert_allclose(stripped.predict(x, verbose=0), want, atol=1e-5 * np.abs(want).max())
