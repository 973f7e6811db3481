"""tfkdp.Distiller: objective, metrics, frozen teacher, state, XLA, mixed precision, MirroredStrategy."""

import copy
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import losses as kd
from tfkdp import runtime
from tfkdp.distill.distiller import Distiller
from tfkdp.models import resnet_cifar

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _net(name, widths, seed, regularizer=None):
    """Conv(w0) -> pool -> Conv(w1) -> GAP -> Dense(3); no batch norm (replica-invariant)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1), name="image")
    x = keras.layers.Conv2D(
        widths[0], 3, padding="same", activation="relu", name="conv1",
        kernel_regularizer=regularizer,
    )(inputs)  # fmt: skip
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(widths[1], 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _pair(seed=0, regularizer=None):
    """Teacher conv1 (12,12,6), conv2 (6,6,8); student conv1 (12,12,6), conv2 (6,6,4)."""
    return _net("teacher", (6, 8), seed), _net("student", (6, 4), seed + 1, regularizer)


def _values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def _np_ce(logits, y):
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_p[np.arange(len(y)), y]


def _np_kd(t, s, temperature):
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t), log_softmax(s)
    return (np.exp(lt) * (lt - ls)).sum(-1) * temperature**2


class CountingPenalty(keras.layers.Layer):
    """Sparsity hook for tests: penalty = sum |W| of one student kernel; counts every N steps.

    `__call__()` returns the penalty; `on_train_step_end(iterations)` increments
    `count` when `iterations % every == 0` and stores the last iteration seen,
    as an ADMM Z/U update would.
    """

    def __init__(self, kernel, every=2, **kwargs):
        super().__init__(**kwargs)
        self.every = every
        self._kernel = [kernel]  # a reference; the student owns the variable
        self.count = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="count",
            aggregation="only_first_replica",
        )  # fmt: skip
        self.last_iteration = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="last_iteration",
            aggregation="only_first_replica",
        )  # fmt: skip

    def __call__(self):
        return keras.ops.sum(keras.ops.abs(self._kernel[0]))

    def on_train_step_end(self, iterations):
        iterations = keras.ops.cast(iterations, "float32")
        self.last_iteration.assign(iterations)
        update = keras.ops.cast(keras.ops.equal(keras.ops.mod(iterations, self.every), 0.0), "float32")
        self.count.assign_add(update)


# ----------------------------------------------------------------------------- training


def _tensorboard_tags(log_dir):
    tags = set()
    for root, _, files in os.walk(log_dir):
        for name in files:
            if "tfevents" in name:
                for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                    tags.update(value.tag for value in event.summary.value)
    return tags


def test_fit_trains_only_student_and_connector_teacher_unchanged(tiny_images):
    x, y = tiny_images
    keras.utils.set_random_seed(0)
    teacher = resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3, name="teacher")
    student = resnet_cifar(8, width=2, input_shape=(12, 12, 1), num_classes=3, name="student")
    hint = kd.HintLoss("stage2_block1_out", "stage2_block1_out")  # 8 vs 4 channels
    distiller = Distiller(teacher, student, [kd.SoftTargetKD(), hint], [0.5, 1.0])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])

    assert [id(v) for v in distiller.trainable_variables] == [
        id(v) for v in student.trainable_variables + hint.connector.trainable_variables
    ]
    teacher_before = _values(teacher.weights)  # kernels and BN moving statistics
    student_before = _values(student.weights)
    connector_before = _values(hint.connector.weights)
    history = distiller.fit(
        x, y, batch_size=32, epochs=1, verbose=0, validation_data=(x[:16], y[:16])
    )

    for before, after in zip(teacher_before, _values(teacher.weights), strict=True):
        np.testing.assert_array_equal(before, after)
    # Frozen without being changed: the caller's teacher keeps its flag, the distiller
    # tracks none of its variables.
    assert teacher.trainable
    teacher_ids = {id(v) for v in teacher.weights}
    assert not teacher_ids & {id(v) for v in distiller.variables}
    # Every student variable moved: trainable ones by Adam, BN statistics because the
    # student (not the teacher) runs with training=True.
    for variable, before in zip(student.weights, student_before, strict=True):
        assert not np.allclose(before, keras.ops.convert_to_numpy(variable)), variable.path
    assert not np.allclose(connector_before[0], keras.ops.convert_to_numpy(hint.connector.kernel))
    assert int(distiller.optimizer.iterations) == 2

    terms = [
        "accuracy", "distillation_loss", "distillation_loss_0", "distillation_loss_1", "loss",
        "regularization_loss", "sparsity_loss", "student_loss",
    ]  # fmt: skip
    assert sorted(history.history) == sorted(terms + [f"val_{t}" for t in terms])
    assert history.history["sparsity_loss"] == [0.0]
    assert history.history["distillation_loss_1"][0] > 0


def test_tensorboard_receives_per_term_losses(tiny_images, tmp_path):
    pytest.importorskip("tensorboard", reason="tf.summary needs the tensorboard package")
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student)
    distiller.compile(loss=CE)
    distiller.fit(
        x, y, batch_size=64, epochs=1, verbose=0, validation_data=(x, y),
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path))],
    )  # fmt: skip
    tags = _tensorboard_tags(tmp_path)
    assert {"epoch_student_loss", "epoch_distillation_loss_0", "epoch_sparsity_loss"} <= tags


def test_call_and_predict_equal_student(tiny_images):
    x, _ = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(distiller(x[:8])), keras.ops.convert_to_numpy(student(x[:8]))
    )
    np.testing.assert_allclose(
        distiller.predict(x, batch_size=32, verbose=0),
        student.predict(x, batch_size=32, verbose=0),
        rtol=1e-6,
    )


def test_evaluate_loss_is_weighted_sum_of_numpy_terms(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(
        teacher, student, kd.SoftTargetKD(temperature=2.0), student_loss_weight=0.3
    )
    assert float(distiller.distillation_loss_weights[0]) == pytest.approx(0.7)  # 1 - 0.3
    distiller.compile(loss=CE)
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)

    t_logits = keras.ops.convert_to_numpy(teacher(x))
    s_logits = keras.ops.convert_to_numpy(student(x))
    ce = _np_ce(s_logits, y).mean()
    kd_term = _np_kd(t_logits, s_logits, 2.0).mean()
    np.testing.assert_allclose(logs["student_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(logs["distillation_loss_0"], kd_term, rtol=1e-5)
    np.testing.assert_allclose(logs["distillation_loss"], 0.7 * kd_term, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], 0.3 * ce + 0.7 * kd_term, rtol=1e-5)


def test_kernel_regularizer_adds_to_loss(tiny_images):
    x, y = tiny_images
    teacher, plain = _pair(seed=3)
    _, regularized = _pair(seed=3, regularizer=keras.regularizers.L2(0.01))
    regularized.set_weights(plain.get_weights())
    results = []
    for student in (plain, regularized):
        distiller = Distiller(teacher, student)
        distiller.compile(loss=CE)
        results.append(distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True))
    kernel = keras.ops.convert_to_numpy(regularized.get_layer("conv1").kernel)
    penalty = 0.01 * np.sum(kernel**2)
    np.testing.assert_allclose(results[1]["regularization_loss"], penalty, rtol=1e-5)
    np.testing.assert_allclose(results[1]["loss"] - results[0]["loss"], penalty, rtol=1e-4)
    assert results[0]["regularization_loss"] == 0.0


def test_sample_weight_weights_task_and_distillation_terms(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student, [kd.SoftTargetKD(), kd.DecoupledKD()], [0.5, 0.25])
    distiller.compile(loss=CE)
    half = distiller.evaluate(x[:32], y[:32], batch_size=32, verbose=0, return_dict=True)
    weights = np.r_[np.ones(32), np.zeros(32)].astype("float32")
    weighted = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=64, verbose=0, return_dict=True
    )
    # sum_over_batch_size: zero-weight samples still count in the denominator (64 vs 32).
    for key in ("loss", "student_loss", "distillation_loss_0", "distillation_loss_1"):
        np.testing.assert_allclose(weighted[key], half[key] / 2, rtol=1e-5, err_msg=key)

    # Training on all-zero weights from an (x, y, w) dataset: every term is 0, so Adam
    # (zero moments) leaves the weights exactly unchanged.
    before = _values(student.trainable_variables)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, np.zeros(64, "float32"))).batch(32)
    history = distiller.fit(dataset, epochs=1, verbose=0)
    assert history.history["loss"] == [0.0]
    for b, a in zip(before, _values(student.trainable_variables), strict=True):
        np.testing.assert_array_equal(b, a)


def test_loss_weight_variables_changed_by_callback_take_effect(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student, kd.SoftTargetKD())
    distiller.compile(loss=CE)
    before = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        before["loss"], 0.5 * before["student_loss"] + 0.5 * before["distillation_loss_0"], rtol=1e-5
    )

    class Reweight(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.student_loss_weight.assign(0.0)
            self.model.distillation_loss_weights[0].assign(2.0)

    logs = distiller.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[Reweight()]).history
    np.testing.assert_allclose(logs["distillation_loss"][0], 2.0 * logs["distillation_loss_0"][0], rtol=1e-5)
    np.testing.assert_allclose(logs["loss"][0], logs["distillation_loss"][0], rtol=1e-5)
    # The already-compiled test function sees the new values too (no retrace needed).
    after = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(after["loss"], 2.0 * after["distillation_loss_0"], rtol=1e-5)


def test_sparsity_penalty_and_in_step_hook_with_steps_per_execution(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    kernel = student.get_layer("conv2").kernel
    penalty = CountingPenalty(kernel, every=2)
    distiller = Distiller(teacher, student, sparsity=penalty, sparsity_weight=0.01)
    distiller.compile(optimizer="sgd", loss=CE, steps_per_execution=2)
    assert any(v is penalty.count for v in distiller.non_trainable_variables)

    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)  # 4 steps, 2 per execution
    assert float(penalty.last_iteration) == 4.0  # called after apply(): iterations 1..4
    assert float(penalty.count) == 2.0  # iterations 2 and 4

    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    l1 = np.abs(keras.ops.convert_to_numpy(kernel)).sum()
    np.testing.assert_allclose(logs["sparsity_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"],
        0.5 * logs["student_loss"] + logs["distillation_loss"] + 0.01 * l1,
        rtol=1e-5,
    )
    distiller.sparsity_weight.assign(0.0)
    without = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"] - without["loss"], 0.01 * l1, rtol=1e-3)


def test_plain_object_sparsity_is_tracked_and_added(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    kernel = student.get_layer("conv2").kernel

    class Plain:  # not a Layer: its `variables` must be tracked by the Distiller
        def __init__(self):
            self.z = keras.Variable(np.full(kernel.shape, 0.1, "float32"), trainable=False, name="z")
            self.variables = [self.z]

        def __call__(self):
            return keras.ops.sum(keras.ops.square(kernel - self.z))

    plain = Plain()
    distiller = Distiller(teacher, student, sparsity=plain, sparsity_weight=2.0)
    assert any(v is plain.z for v in distiller.non_trainable_variables)
    distiller.compile(loss=CE)
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    expected = np.sum((keras.ops.convert_to_numpy(kernel) - 0.1) ** 2)
    np.testing.assert_allclose(logs["sparsity_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], 0.5 * logs["student_loss"] + logs["distillation_loss"] + 2.0 * expected, rtol=1e-5
    )


def test_keras_logits_and_feature_distillation_plug_in(tiny_images):
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(
        teacher,
        student,
        [
            keras.distillation.LogitsDistillation(3.0, loss=keras.losses.KLDivergence()),
            keras.distillation.FeatureDistillation("mse", "conv1", "conv1"),
        ],
        [1.0, 1.0],
    )
    distiller.compile(loss=CE)
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    t_logits, s_logits = keras.ops.convert_to_numpy(teacher(x)), keras.ops.convert_to_numpy(student(x))
    np.testing.assert_allclose(logs["distillation_loss_0"], _np_kd(t_logits, s_logits, 3.0).mean(), rtol=1e-4)
    t_conv = keras.Model(teacher.input, teacher.get_layer("conv1").output)(x)
    s_conv = keras.Model(student.input, student.get_layer("conv1").output)(x)
    mse = np.mean((keras.ops.convert_to_numpy(t_conv) - keras.ops.convert_to_numpy(s_conv)) ** 2)
    np.testing.assert_allclose(logs["distillation_loss_1"], mse, rtol=1e-5)
    before = _values(student.trainable_variables)
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert not np.allclose(before[0], keras.ops.convert_to_numpy(student.trainable_variables[0]))


def test_unlabelled_data_gives_pure_distillation(tiny_images):
    x, _ = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student, [kd.DecoupledKD()], [1.0])
    distiller.compile(loss=CE, metrics=["accuracy"])
    logs = distiller.evaluate(x, batch_size=64, verbose=0, return_dict=True)
    assert logs["student_loss"] == 0.0
    assert logs["distillation_loss_0"] > 0
    np.testing.assert_allclose(logs["loss"], logs["distillation_loss_0"], rtol=1e-6)


def test_jit_compile_matches_non_jit_training(tiny_images):
    x, y = tiny_images
    finals, losses = [], []
    for jit in (False, True):
        teacher, student = _pair(seed=5)
        distiller = Distiller(teacher, student, [kd.SoftTargetKD(), kd.HintLoss("conv2", "conv2")], [0.5, 1.0])
        distiller.compile(optimizer="sgd", loss=CE, jit_compile=jit)
        assert distiller.jit_compile is jit
        losses.append(distiller.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False).history["loss"])
        finals.append(_values(student.trainable_variables))
    # XLA fuses and reorders float32 reductions; 2 SGD steps stay within 1e-5.
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for a, b in zip(*finals, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_mixed_float16_trains_with_loss_scaling(tiny_images):
    x, y = tiny_images
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        teacher, student = _pair(seed=7)
        distiller = Distiller(
            teacher, student, [kd.SoftTargetKD(), kd.HintLoss("conv2", "conv2"), kd.DecoupledKD()], [0.5, 1.0, 0.5]
        )
        distiller.compile(optimizer="adam", loss=CE)
        assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
        assert student.get_layer("conv1").compute_dtype == "float16"
        mixed = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
        weights = [teacher.get_weights(), student.get_weights()]
        before = _values(student.trainable_variables)
        history = distiller.fit(x, y, batch_size=32, epochs=2, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
        assert int(distiller.optimizer.iterations) == 4
        assert not np.allclose(before[0], keras.ops.convert_to_numpy(student.trainable_variables[0]))
    finally:
        keras.config.set_dtype_policy(previous)
    teacher32, student32 = _pair(seed=7)
    teacher32.set_weights(weights[0])
    student32.set_weights(weights[1])
    reference = Distiller(
        teacher32, student32, [kd.SoftTargetKD(), kd.HintLoss("conv2", "conv2"), kd.DecoupledKD()], [0.5, 1.0, 0.5]
    )
    reference.compile(loss=CE)
    # The connector is initialised from a different seed draw; compare the logit terms.
    full = reference.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    for key in ("student_loss", "distillation_loss_0", "distillation_loss_2"):
        # float16 activations carry ~3 significant digits.
        np.testing.assert_allclose(mixed[key], full[key], rtol=2e-2, err_msg=key)


def test_mirrored_strategy_loss_matches_single_device(tiny_images):
    x, y = tiny_images
    weights = np.linspace(0.2, 1.8, 64).astype("float32")
    strategy = runtime.mirrored_strategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    teacher0, student0 = _pair(seed=11)
    init = [teacher0.get_weights(), student0.get_weights()]
    results = []
    for scope in (strategy, None):
        with scope.scope() if scope else tf.distribute.get_strategy().scope():
            teacher, student = _pair(seed=11)
            teacher.set_weights(init[0])
            student.set_weights(init[1])
            hint = kd.HintLoss("conv2", "conv2")
            penalty = CountingPenalty(student.get_layer("conv1").kernel, every=2)
            keras.utils.set_random_seed(12)  # same connector initialisation in both runs
            distiller = Distiller(
                teacher, student, [kd.SoftTargetKD(), hint], [0.5, 1.0],
                sparsity=penalty, sparsity_weight=1e-3,
            )  # fmt: skip
            distiller.compile(optimizer=keras.optimizers.SGD(0.1), loss=CE)
        history = distiller.fit(
            x, y, sample_weight=weights, batch_size=16, epochs=1, verbose=0, shuffle=False
        ).history
        results.append(
            (history, _values(student.trainable_variables + hint.connector.weights),
             float(keras.ops.convert_to_numpy(penalty.count)))
        )
    (dist_hist, dist_w, dist_count), (single_hist, single_w, single_count) = results
    for key in ("loss", "student_loss", "distillation_loss_0", "distillation_loss_1", "sparsity_loss"):
        # Per-replica reductions add in a different order: float32 round-off only.
        np.testing.assert_allclose(dist_hist[key], single_hist[key], rtol=1e-5, err_msg=key)
    for a, b in zip(dist_w, single_w, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert dist_count == single_count == 2.0


# ----------------------------------------------------------------------------- state


def _resumable(seed):
    teacher, student = _pair(seed=seed)
    hint = kd.HintLoss("conv2", "conv2")
    penalty = CountingPenalty(student.get_layer("conv1").kernel, every=3)
    distiller = Distiller(
        teacher, student, [kd.SoftTargetKD(), hint], [0.5, 1.0], sparsity=penalty, sparsity_weight=1e-3
    )
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    return distiller, hint, penalty


def _state(distiller, hint, penalty):
    return _values(distiller.student.weights + hint.connector.weights + [penalty.count])


def test_stop_restore_continue_equals_uninterrupted_run(tiny_images, tmp_path):
    x, y = tiny_images
    fit = dict(x=x, y=y, batch_size=32, verbose=0, shuffle=False)
    uninterrupted, hint, penalty = _resumable(seed=20)
    uninterrupted.distillation_loss_weights[0].assign(0.7)
    uninterrupted.fit(epochs=3, **fit)
    expected = _state(uninterrupted, hint, penalty)

    first, _, _ = _resumable(seed=20)
    first.distillation_loss_weights[0].assign(0.7)
    first.fit(epochs=1, **fit)
    path = tmp_path / "state.weights.h5"
    first.save_training_state(path)
    assert os.listdir(tmp_path) == ["state.weights.h5"]  # no temporary file left behind

    resumed, hint2, penalty2 = _resumable(seed=99)  # different initial weights
    assert not np.allclose(_values(resumed.student.weights)[0], expected[0])
    resumed.load_training_state(path)
    assert int(resumed.optimizer.iterations) == 2
    assert float(resumed.distillation_loss_weights[0]) == pytest.approx(0.7)
    resumed.fit(epochs=3, initial_epoch=1, **fit)

    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations) == 6
    got = _state(resumed, hint2, penalty2)
    assert float(got[-1]) == float(expected[-1]) == 2.0  # sparsity state: iterations 3 and 6
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_backup_and_restore_callback_resumes_interrupted_fit(tiny_images, tmp_path):
    x, y = tiny_images
    fit = dict(x=x, y=y, batch_size=32, verbose=0, shuffle=False, epochs=2)
    uninterrupted, hint, penalty = _resumable(seed=30)
    uninterrupted.fit(**fit)
    expected = _state(uninterrupted, hint, penalty)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("interrupted")

    backup = str(tmp_path / "backup")
    first, _, _ = _resumable(seed=30)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()], **fit)
    resumed, hint2, penalty2 = _resumable(seed=31)
    resumed.fit(callbacks=[keras.callbacks.BackupAndRestore(backup)], **fit)
    assert int(resumed.optimizer.iterations) == 4
    for a, b in zip(_state(resumed, hint2, penalty2), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_student_saves_alone_as_keras_file(tiny_images, tmp_path):
    x, y = tiny_images
    teacher, student = _pair()
    distiller = Distiller(teacher, student, ["soft_target", kd.HintLoss("conv2", "conv2")], [0.5, 1.0])
    distiller.compile(loss=CE)
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "student.keras"
    distiller.student.save(path)
    reloaded = keras.saving.load_model(path)
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in student.layers]
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), distiller.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def test_teacher_loaded_from_keras_file_and_savedmodel(tiny_images, tmp_path):
    x, y = tiny_images
    teacher, student = _pair()
    keras_path = tmp_path / "teacher.keras"
    teacher.save(keras_path)
    saved_model = tmp_path / "teacher_savedmodel"
    teacher.export(str(saved_model), verbose=False)
    expected = keras.ops.convert_to_numpy(teacher(x))
    for source in (keras_path, str(saved_model)):
        distiller = Distiller(source, student)
        teacher_ids = {id(v) for v in distiller.teacher.weights}
        assert not teacher_ids & {id(v) for v in distiller.trainable_variables}
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(distiller.teacher(x, training=False)), expected, rtol=1e-5, atol=1e-6
        )
        distiller.compile(loss=CE)
        logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
        s_logits = keras.ops.convert_to_numpy(student(x))
        np.testing.assert_allclose(logs["distillation_loss_0"], _np_kd(expected, s_logits, 4.0).mean(), rtol=1e-4)
    # A SavedModel teacher has no intermediate layers: feature losses are refused.
    with pytest.raises(ValueError, match=r"no layer named 'conv2'.*teacher_savedmodel"):
        Distiller(str(saved_model), student, [kd.HintLoss("conv2", "conv2")], [1.0])


def test_distiller_config_round_trip():
    teacher, student = _pair()
    distiller = Distiller(
        teacher, student, [kd.SoftTargetKD(2.0), kd.HintLoss("conv2", "conv2")], [0.25, 1.5],
        student_loss_weight=0.75, sparsity_weight=0.5,
    )  # fmt: skip
    config = distiller.get_config()
    reference = copy.deepcopy(config)  # Keras' deserialization edits nested configs in place
    assert config["distillation_loss_weights"] == [0.25, 1.5]
    assert config["student_loss_weight"] == 0.75 and config["sparsity_weight"] == 0.5
    restored = Distiller.from_config(config)
    assert restored.get_config() == reference
    assert config == reference
    assert [type(loss) for loss in restored.distillation_losses] == [kd.SoftTargetKD, kd.HintLoss]


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    def build(**overrides):
        teacher, student = _pair()
        args = dict(teacher=teacher, student=student)
        args.update({k: (v(teacher, student) if callable(v) else v) for k, v in overrides.items()})
        return Distiller(**args)

    other_input = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    return [
        (lambda: build(teacher=lambda t, s: 3), ValueError,
         "teacher must be a keras.Model or a path.*received 3 of type int"),
        (lambda: build(teacher="/nonexistent/teacher.keras"), FileNotFoundError,
         "Teacher path '/nonexistent/teacher.keras' does not exist"),
        (lambda: build(student=lambda t, s: "student.keras"), ValueError,
         "student must be a keras.Model; received 'student.keras'"),
        (lambda: build(student=lambda t, s: t), ValueError, "teacher and student are the same model"),
        (lambda: build(student=lambda t, s: keras.Model(t.input, t.get_layer("gap").output)),
         ValueError, "share 4 variables"),
        (lambda: build(student=lambda t, s: other_input), ValueError,
         r"teacher input shapes \[\(None, 12, 12, 1\)\], student input shapes \[\(None, 8, 8, 1\)\]"),
        (lambda: build(distillation_losses=[]), ValueError, "distillation_losses must not be empty"),
        (lambda: build(distillation_losses="fitnets"), ValueError,
         r"Unknown distillation loss 'fitnets'; valid names"),
        (lambda: build(distillation_losses=[kd.SoftTargetKD()] * 2, distillation_loss_weights=[1.0]),
         ValueError, r"list of 2 numbers.*received distillation_loss_weights=\[1.0\]"),
        (lambda: build(distillation_loss_weights=[-1.0]), ValueError,
         r"distillation_loss_weights\[0\] must be a finite number >= 0; received"),
        (lambda: build(student_loss_weight=float("nan")), ValueError, "student_loss_weight must be a finite"),
        (lambda: build(student_loss_weight=2.0), ValueError, "needs student_loss_weight <= 1"),
        (lambda: build(sparsity_weight="1"), ValueError, "sparsity_weight must be a number"),
        (lambda: build(sparsity=42), ValueError, "sparsity must be None or a callable.*received 42"),
        (lambda: build(distillation_losses=[kd.HintLoss("conv9", "conv2")]), ValueError,
         r"teacher model 'teacher' has no layer named 'conv9'.*'conv2'"),
        (lambda: build(distillation_losses=[kd.HintLoss("conv2", "conv2", connector=False)]),
         ValueError, r"\(None, 6, 6, 8\).*\(None, 6, 6, 4\)"),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(16))
def test_bad_input_raises_its_error(index):
    make, error, match = _bad_cases()[index]
    with pytest.raises(error, match=match):
        make()


def test_bad_paths_and_compile_arguments_raise(tmp_path):
    teacher, student = _pair()
    other = tmp_path / "teacher.txt"
    other.write_text("not a model")
    with pytest.raises(ValueError, match="neither a .keras/.h5 file nor a SavedModel directory"):
        Distiller(str(other), student)
    distiller = Distiller(teacher, student)
    with pytest.raises(ValueError, match="loss \\(the student's task loss\\) is None but student_loss_weight=0.5"):
        distiller.compile(loss=None)
    with pytest.raises(ValueError, match="jit_compile must be 'auto', True or False; received jit_compile='yes'"):
        distiller.compile(loss=CE, jit_compile="yes")
    with pytest.raises(ValueError, match="Call compile\\(\\) before saving"):
        distiller.save_training_state(tmp_path / "s.weights.h5")
    distiller.compile(loss=CE)
    with pytest.raises(ValueError, match="must end in .weights.h5; received filepath='.*state.h5'"):
        distiller.save_training_state(str(tmp_path / "state.h5"))
    with pytest.raises(FileNotFoundError, match="No training state at"):
        distiller.load_training_state(tmp_path / "missing.weights.h5")
    pure = Distiller(teacher, _pair(seed=4)[1], student_loss_weight=0.0)
    pure.compile(loss=None)  # pure distillation is allowed without a task loss
