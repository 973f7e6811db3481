"""Cascade: shared-weight views, the STE score gradient, the cascade rule, stage 2, the method."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tfkdp import data, methods, metrics, models
from tfkdp.methods import Budget
from tfkdp.methods.cascade import CascadeTrainer, TeacherSwap, TeacherSwitch, mask_overlap
from tfkdp.pruning import make_plan
from tfkdp.pruning.surgery import strip_channels
from tfkdp.pruning.views import SharedViews
from tfkdp.train.phases import Training


def _conv_net():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(4, name="logits")(x))


def _small_net():
    """A stem, one residual block and a strided conv: the couplings of a ResNet, few layers."""
    inputs = keras.Input((12, 12, 1))
    stem = layers.ReLU()(
        layers.BatchNormalization(name="stem_bn")(
            layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
        )
    )
    x = layers.ReLU()(
        layers.BatchNormalization(name="b_bn1")(
            layers.Conv2D(6, 3, padding="same", name="b_conv1")(stem)
        )
    )
    x = layers.BatchNormalization(name="b_bn2")(
        layers.Conv2D(4, 3, padding="same", name="b_conv2")(x)
    )
    x = layers.ReLU()(layers.Add()([stem, x]))
    x = layers.ReLU()(
        layers.BatchNormalization(name="down_bn")(layers.Conv2D(8, 3, strides=2, name="down")(x))
    )
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x), name="small")  # fmt: skip


def _setup(tiny_images):
    x, y = tiny_images
    teacher = _small_net()
    train = data.make_dataset(x[:48], y[:48], batch_size=8, training=False)
    val = data.make_dataset(x[:32], y[:32], batch_size=16, training=False)
    return teacher, train, val


def _cascade(**kwargs):
    training = Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False)
    options = {
        "num_tas": 0,
        "admm_epochs": 1,
        "stage2_epochs": 2,
        "mask_every": 2,
        "training": training,
    }
    return methods.get("cascade", **{**options, **kwargs})


def test_views_share_kernels_but_not_batch_norms_or_masks():
    model = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    views = SharedViews(model, 3)
    x = np.random.default_rng(0).uniform(size=(4, 12, 12, 1)).astype("float32")
    for view in views.views:  # before any mask or change: every view is the model
        np.testing.assert_allclose(view(x), model(x), atol=1e-6)
    conv = views.views[2].get_layer("stem_conv")
    assert conv is views.views[0].get_layer("stem_conv") is model.get_layer("stem_conv")
    conv.kernel.assign(conv.kernel * 2.0)  # a change through one view ...
    np.testing.assert_allclose(views.views[1](x), model(x), atol=1e-5)  # ... is seen by all
    bn1 = views.per_view_layers(1)["stem_conv_bn"]
    assert bn1 is not model.get_layer("stem_conv_bn")
    bn1.gamma.assign(bn1.gamma * 3.0)  # view 1's batch norm only
    assert not np.allclose(views.views[1](x), model(x), atol=1e-4)
    np.testing.assert_allclose(views.views[0](x), model(x), atol=1e-6)
    head = views.per_view_layers(2)["logits"]
    assert head is not model.get_layer("logits")
    plan = make_plan(model, target_macs_reduction=0.4)
    views.states[2].set_plan(plan)  # view 2's masks only
    assert views.states[2].plan() == plan and not len(views.states[0].plan())
    np.testing.assert_allclose(views.views[0](x), model(x), atol=1e-6)
    masked = views.masked_model(2)
    np.testing.assert_allclose(views.views[2](x), masked(x), atol=1e-5)
    np.testing.assert_allclose(strip_channels(masked, plan)(x), masked(x), atol=1e-5)


def test_views_reject_nested_models_and_bad_counts():
    inner = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    inputs = keras.Input((12, 12, 1))
    outer = keras.Model(inputs, inner(inputs))
    with pytest.raises(ValueError, match="flat functional"):
        SharedViews(outer, 2)
    with pytest.raises(ValueError, match="count"):
        SharedViews(inner, 0)


def test_ste_score_gradient_equals_the_analytic_formula():
    model = _conv_net()
    views = SharedViews(model, 1)
    state = views.states[0]
    state.masks[0].assign([1.0, 0.0, 1.0])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
    y = np.array([0, 1, 2, 3, 1])
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = ce(y, views.views[0](x, training=True))
    got = tape.gradient(loss, state.scores[0]).numpy()
    # Analytic: ∂L/∂γₙ = Σ_{b,h,w} ∂L/∂Z_{b,h,w,n} · Y_{b,h,w,n}, Y = X ∗ W, Z = Y·M.
    conv = model.get_layer("conv")
    y_conv = conv(x)
    z = tf.Variable(y_conv * np.array([1.0, 0.0, 1.0], "float32"))
    rest = keras.Sequential(
        [layers.ReLU(), layers.GlobalAveragePooling2D(), model.get_layer("logits")]
    )
    with tf.GradientTape() as tape:
        loss2 = ce(y, rest(z))
    dz = tape.gradient(loss2, z).numpy()
    expected = np.sum(dz * y_conv.numpy(), axis=(0, 1, 2))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert abs(got[1]) > 0 or abs(expected[1]) == 0  # a pruned channel still has a saliency


def test_scores_move_with_the_teachers_gradient_not_their_own():
    model = _conv_net()
    teacher = _conv_net()
    views = SharedViews(model, 3)
    plan = {"conv": [0, 2]}
    views.states[0].set_plan(plan)
    views.states[1].masks[0].assign([1.0, 1.0, 0.0])
    alpha = 0.1
    trainer = CascadeTrainer(teacher, views, ["student", "ta1", "full"], 0.4, 4.0,
                             keras.optimizers.SGD(alpha))  # fmt: skip
    trainer.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=False)
    trainer.build_optimizers()
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(6, 6, 6, 2)).astype("float32"))
    y = tf.constant(np.array([0, 1, 2, 3, 1, 0]))
    scores = [s.scores[0] for s in views.states]
    with tf.GradientTape() as tape:
        _, losses = trainer._pair_losses(x, y, None, training=True)
        total = tf.add_n(losses)
    own = [g.numpy() for g in tape.gradient(total, scores)]
    before = [s.numpy().copy() for s in scores]
    trainer.train_step((x, y))
    after = [s.numpy() for s in scores]
    np.testing.assert_allclose(after[0] - before[0], -alpha * own[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(after[1] - before[1], -alpha * own[2], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(after[2], before[2])  # the unpruned top model's scores stay
    assert not np.allclose(own[1], own[0], atol=1e-7)  # the rule is not a no-op here
    assert mask_overlap(views) == [0.5, 1.0]  # {0, 2} vs {0, 1}; {0, 1} vs all


def test_teacher_swap_happens_when_and_only_when_the_student_passes_its_teacher():
    teachers = [_conv_net() for _ in range(3)]
    switch = TeacherSwitch(teachers)
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 2)).astype("float32")
    swap = TeacherSwap(switch, None, None, [0.5, 0.7, 0.9], ["ta1", "full", "teacher"])
    assert swap.decide(0, 0.5) is None  # equal is not past
    np.testing.assert_allclose(switch(x), teachers[0](x), atol=1e-6)
    event = swap.decide(1, 0.6)
    assert event == {"epoch": 2, "from": "ta1", "to": "full", "student_accuracy": 0.6,
                     "teacher_accuracy": 0.5}  # fmt: skip
    np.testing.assert_allclose(switch(x), teachers[1](x), atol=1e-6)
    assert swap.decide(2, 0.65) is None
    assert swap.decide(3, 0.95)["to"] == "teacher"
    assert swap.decide(4, 0.99) is None  # the original teacher is the last one
    assert int(switch.index.numpy()) == 2 and len(swap.events) == 2
    np.testing.assert_allclose(switch(x), teachers[2](x), atol=1e-6)


def test_cascade_compress_strips_exactly_at_the_budget(tiny_images, tmp_path):
    teacher, train, val = _setup(tiny_images)
    method = _cascade(num_tas=1)
    result = method.compress(teacher, None, train, val, Budget.macs(0.5))
    x = tiny_images[0][:16]
    np.testing.assert_allclose(result.model(x), result.masked(x), atol=1e-4)
    reduction = 1 - metrics.count_macs(result.model) / metrics.count_macs(teacher)
    assert abs(reduction - 0.5) < 0.02
    record = result.record
    assert [m["name"] for m in record["models"]] == ["student", "ta1", "full"]
    assert [m["level"] for m in record["models"]] == [0.5, 0.25, 0.0]
    assert record["models"][0]["macs"] < record["models"][1]["macs"] < record["models"][2]["macs"]
    assert record["view_vs_masked_max_abs_diff"] < 1e-4
    assert len(record["mask_overlap"]) == 2  # start + 1 epoch
    assert len(record["stage2_student_accuracy"]) == 2 and record["step_time_ratio"] > 0
    assert set(result.history) == {"stage1", "stage2"}
    report = method.report(record, str(tmp_path))
    assert (
        os.path.exists(report["plots"]["cascade"]) and "| student | 0.500 |" in report["markdown"]
    )


def test_cascade_resumes_in_stage_2_without_rerunning_stage_1(tiny_images, tmp_path):
    teacher, train, val = _setup(tiny_images)

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not isinstance(self.model, CascadeTrainer):
                raise KeyboardInterrupt("simulated kill after stage 2's first epoch")

    class Count(keras.callbacks.Callback):
        stage1 = stage2 = 0

        def on_epoch_begin(self, epoch, logs=None):
            if isinstance(self.model, CascadeTrainer):
                Count.stage1 += 1
            else:
                Count.stage2 += 1

    crashing = _cascade(training=Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False,
                                          callbacks=(Crash(),)))  # fmt: skip
    crashing.state_dir = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        crashing.prune(teacher, methods.Method.prepare_student(teacher, None), train, val, 0.5)
    with open(tmp_path / "state" / "cascade_state.json") as f:
        saved = json.load(f)
    assert saved["stage1_done"] and len(saved["curve"]) == 1
    resumed = _cascade(training=Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False,
                                         callbacks=(Count(),)))  # fmt: skip
    resumed.state_dir = str(tmp_path / "state")
    pruned = resumed.prune(teacher, methods.Method.prepare_student(teacher, None), train, val, 0.5)
    assert (Count.stage1, Count.stage2) == (0, 1)  # stage 1 kept, stage 2 from its 2nd epoch
    assert len(pruned.record["stage2_student_accuracy"]) == 2
    assert pruned.record["models"][0]["level"] == 0.5


def test_cascade_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stage2_epochs"):
        methods.get("cascade", finetune_epochs=1)
    with pytest.raises(ValueError, match="one level per"):
        methods.get("cascade", num_tas=3, levels=[0.2, 0.1])
    with pytest.raises(ValueError, match="kd_weight"):
        methods.get("cascade", kd_weight=1.5)
    with pytest.raises(ValueError, match="score_optimizer"):
        methods.get("cascade", score_optimizer="adam")
    with pytest.raises(ValueError, match="not below"):
        methods.get("cascade", levels=[0.6]).check_budget(Budget.macs(0.5))
    assert methods.get("cascade", levels=[0.1, 0.3]).chain_levels(0.5) == [0.5, 0.3, 0.1, 0.0]
    assert methods.get("cascade", num_tas=0).chain_levels(0.5) == [0.5, 0.0]
    flags = {"compress_epochs": 3, "finetune_epochs": 2, "criterion": "l1", "round_to": 1,
             "cascade_num_tas": 2, "cascade_levels": ["0.4", "x"], "cascade_stage2_epochs": 1}  # fmt: skip
    with pytest.raises(ValueError, match="--cascade_levels"):
        methods.get_class("cascade").pipeline_options(flags, None)
    options = methods.get_class("cascade").pipeline_options(dict(flags, cascade_levels=[]), None)
    assert (options["num_tas"], options["finetune_epochs"], options["admm_epochs"]) == (2, 0, 3)
    method = methods.get("cascade", **options)
    assert type(method)(**method.get_config()).get_config() == method.get_config()


def test_pipeline_runs_cascade_end_to_end(tmp_path, tiny_teacher):
    from test_pipeline import _values

    from tfkdp.pipelines import workflow

    values = _values(tmp_path, method="cascade", teacher=tiny_teacher, formats=["tflite"], teacher_epochs=1,
                     finetune_epochs=0, cascade_num_tas=0, cascade_stage2_epochs=0)  # fmt: skip
    workflow.run(values)
    with open(os.path.join(values["output_dir"], "report.json")) as f:
        report = json.load(f)
    assert report["student"]["record"]["method"] == "cascade"
    assert "### Cascade" in report["method_report"]["markdown"]
    assert os.path.exists(os.path.join(values["output_dir"], "cascade.png"))


def test_pipeline_rejects_cascade_levels_above_the_budget_before_training(tmp_path):
    from test_pipeline import _values

    from tfkdp.pipelines import workflow

    values = _values(tmp_path, method="cascade", cascade_levels=["0.7"])
    with pytest.raises(ValueError, match="not below"):
        workflow.run(values)
    assert not os.path.exists(os.path.join(values["output_dir"], "teacher"))


def test_stage_2_teachers_have_re_estimated_batch_norm_statistics(tiny_images, monkeypatch):
    # Stage 1 moves the shared kernels faster than each model's moving averages follow; the
    # TAs must teach in stage 2 with statistics re-estimated on the training data (before
    # this, a 16-step stage 1 left them so far off that the student fell to 10 %).
    from tfkdp.train import batchnorm, phases

    teacher, train, val = _setup(tiny_images)
    seen = {}
    real_distill = phases.distill

    def capture(switch, student, *args, **kwargs):
        seen["teachers"] = list(switch.teachers)
        return real_distill(switch, student, *args, **kwargs)

    monkeypatch.setattr(phases, "distill", capture)
    method = _cascade(num_tas=1, stage2_epochs=1, training=Training(
        learning_rate=0.5, recalibrate_bn=2, jit_compile=False))  # fmt: skip
    pruned = method.prune(teacher, methods.Method.prepare_student(teacher, None), train, val, 0.5)
    ta = seen["teachers"][0]
    bns = [la for la in ta.layers if isinstance(la, layers.BatchNormalization)]
    before = [keras.ops.convert_to_numpy(b.moving_variance).copy() for b in bns]
    batchnorm.recalibrate_batchnorm(ta, train, 2)  # idempotent on re-estimated statistics
    for b, v in zip(bns, before, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b.moving_variance), v, rtol=1e-4)
    assert all("val_accuracy_recalibrated" in m for m in pruned.record["models"])
