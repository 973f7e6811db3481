"""make_plan's oneDNN guard: groups feeding strided 1x1 convolutions keep 16 channels."""

import pytest

from tfkdp import models, onednn
from tfkdp.pruning import channel_groups, make_plan, strip_channels


def _model():
    # Stem (16 channels) feeds stage2_block1_proj, a 1x1 stride-2 projection;
    # stage2 (32) feeds stage3_block1_proj.
    return models.resnet_cifar(8, width=16, input_shape=(16, 16, 1), num_classes=3)


def _kept(plan, groups, group_id):
    size = next(g.size for g in groups if g.id == group_id)
    return len(plan[group_id]) if group_id in plan else size


def test_without_the_guard_the_plan_leaves_a_strided_projection_below_16_inputs():
    model = _model()
    groups = channel_groups(model)
    assert onednn.hazardous_groups(model, groups) == {
        "stem_conv": ["stage2_block1_proj"], "stage2_block1_conv2": ["stage3_block1_proj"],
    }
    plan = make_plan(model, target_macs_reduction=0.6, allocation="uniform", onednn_guard="off")
    assert _kept(plan, groups, "stem_conv") < 16  # the shape oneDNN#6035 corrupts memory on


def test_keep_guard_keeps_16_channels_on_hazardous_groups_and_meets_the_budget():
    model = _model()
    groups = channel_groups(model)
    plan = make_plan(model, target_macs_reduction=0.6, allocation="uniform", onednn_guard="keep")
    assert _kept(plan, groups, "stem_conv") >= 16
    assert _kept(plan, groups, "stage2_block1_conv2") >= 16
    small = strip_channels(model, plan)
    assert small.get_layer("stage2_block1_proj").kernel.shape[-2] >= 16
    from tfkdp import metrics

    assert abs(metrics.count_macs(small) - 0.4 * metrics.count_macs(model)) <= 0.02 * 0.4 * (
        metrics.count_macs(model)
    )


def test_raise_guard_names_the_layer_and_both_remedies():
    with pytest.raises(ValueError, match=r"stage2_block1_proj.*onednn_guard='keep'.*TF_ENABLE_ONEDNN_OPTS=0"):
        make_plan(_model(), target_macs_reduction=0.6, allocation="uniform", onednn_guard="raise")


def test_auto_guard_follows_whether_onednn_is_active(monkeypatch):
    model = _model()
    groups = channel_groups(model)
    monkeypatch.setattr(onednn, "onednn_active", lambda: True)
    plan = make_plan(model, target_macs_reduction=0.6, allocation="uniform")
    assert _kept(plan, groups, "stem_conv") >= 16
    monkeypatch.setattr(onednn, "onednn_active", lambda: False)
    plan = make_plan(model, target_macs_reduction=0.6, allocation="uniform")
    assert _kept(plan, groups, "stem_conv") < 16


def test_bad_guard_value_is_named():
    with pytest.raises(ValueError, match="onednn_guard='sometimes'"):
        make_plan(_model(), target_macs_reduction=0.5, onednn_guard="sometimes")
