"""DDSL: the dean's hypergradient, bounds, KDP equivalence, resume, mirrored, method, pipeline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_admm import _plain_net  # two convs and a Dense, no batch norm
from tfkdp import data, methods, models, runtime
from tfkdp.distill.dean import Dean, DeanDistiller, ValidationBatch
from tfkdp.pruning.sparsity import admm as admm_lib
from tfkdp.pruning.sparsity import schedules
from tfkdp.train.phases import Training


def _two_layer(name, seed, width=6):
    """Dense(tanh) → Dense: smooth, so central differences are accurate."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(width, activation="tanh", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name=name)


def _dean_distiller(teacher, student, keep, val, *, steps=8, dean_every=2, dean_lr=0.5,
                    lr=0.2, spe=1):  # fmt: skip
    schedule = schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2)
    admm = admm_lib.ADMM(student, keep, sparsity_schedule=schedule, rho=0.5, update_every=2)
    dean = Dean(val, total_steps=steps, dean_every=dean_every, dean_lr=dean_lr)
    distiller = DeanDistiller(teacher, student, dean=dean, sparsity=admm)
    distiller.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
    )
    return distiller, admm, dean


def _val(tiny_images):
    x, y = tiny_images
    return data.make_dataset(x[::-1], y[::-1], batch_size=16, training=False)


def test_hypergradient_matches_central_finite_differences(tiny_images):
    x, y = tiny_images
    teacher, student = _two_layer("teacher", 1), _two_layer("student", 2)
    val = _val(tiny_images)
    distiller, admm, dean = _dean_distiller(teacher, student, {"hidden": 3}, next(iter(val)), lr=0.5)
    ValidationBatch(dean, teacher, val).on_epoch_begin(0)
    admm._update(tf.constant(4, tf.int64), final=True)  # Z at 3 of 6 channels: a real hard prune
    # W moves after the Z/U update (as between updates in training), so W − Z + U is not 0
    # on the kept channels: only there does the sparsity term reach the hard-pruned L_meta.
    rng = np.random.default_rng(0)
    for v in student.trainable_variables:
        v.assign(v.numpy() + 0.1 * rng.normal(size=v.shape).astype("float32"))
    xb, yb = x[:16], y[:16]
    got = distiller.hypergradients(xb, yb)["hypergradient"].numpy()

    variables = student.trainable_variables
    start = [v.numpy() for v in variables]
    multipliers = {id(v): m.numpy() for v, m in admm.support_multipliers()}
    assert multipliers[id(student.get_layer("hidden").kernel)].sum() == 3  # three columns kept

    def meta_loss(w_distill, w_sparsity):
        distiller.distillation_loss_weights[0].assign(w_distill)
        distiller.sparsity_weight.assign(w_sparsity)
        for v, w in zip(variables, start, strict=True):
            v.assign(w)
        with tf.GradientTape() as tape:
            total = distiller.compute_terms(xb, yb, training=True)["total"]
        grads = tape.gradient(total, variables)
        for v, w, g in zip(variables, start, grads, strict=True):
            v.assign((w - 0.5 * g.numpy()) * multipliers.get(id(v), 1.0))  # η = 0.5
        logits = student(dean.val_x.value, training=True)
        value = float(distiller._compile_loss(dean.val_y.value, logits))
        for v, w in zip(variables, start, strict=True):
            v.assign(w)
        return value

    eps = 1e-2  # L_meta is smooth in w (tanh, no kinks): O(eps²) error, far below the tolerance
    want = np.array([
        (meta_loss(0.5 + eps, 1.0) - meta_loss(0.5 - eps, 1.0)) / (2 * eps),
        (meta_loss(0.5, 1.0 + eps) - meta_loss(0.5, 1.0 - eps)) / (2 * eps),
    ])  # fmt: skip
    assert np.all(np.abs(want) > 1e-4)  # both terms matter here: the check is not 0 ≈ 0
    rel = np.abs(got - want) / np.abs(want)
    assert np.all(rel < 1e-2), (got, want, rel)


def test_dean_weights_stay_in_bounds_and_move_with_a_learning_rate(tiny_images):
    x, y = tiny_images
    teacher, student = _plain_net("teacher", 3), _plain_net("student", 4)
    val = _val(tiny_images)
    distiller, admm, dean = _dean_distiller(
        teacher, student, {"conv1": 3, "conv2": 4}, next(iter(val)), dean_lr=3.0, steps=8
    )
    dean_cb = ValidationBatch(dean, teacher, val)
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                            callbacks=[dean_cb]).history  # fmt: skip
    w = dean.loss_weights.numpy()
    assert 0.0 <= w[0] <= 2.0 and 0.0 <= w[1] <= 2.0
    # a large step (3 per meta-update in parameter space) moved the weights off (0.5, 1.0)
    assert np.abs(w - [0.5, 1.0]).max() > 0.05
    np.testing.assert_allclose(distiller.distillation_loss_weights[0].numpy(), w[0])
    np.testing.assert_allclose(distiller.sparsity_weight.numpy(), w[1])
    assert int(dean.updates.numpy()) == 4  # steps 2, 4, 6, 8
    for key in ("dean_w_distill", "dean_w_sparsity", "dean_distillability", "dean_sparsability"):
        assert len(history[key]) == 2
    assert 0.0 <= history["dean_distillability"][-1] < 1.0
    assert 0.0 <= history["dean_sparsability"][-1] <= 1.0
    # extreme features cannot push the weights out of [0, max]
    for f in ([50.0, 50.0, 50.0], [-50.0, -50.0, -50.0]):
        dean.kernel.assign(np.full((3, 2), 10.0, "float32"))
        out = dean.weights_at(tf.constant(f)).numpy()
        assert np.all(out >= 0.0) and np.all(out <= 2.0)
        assert np.allclose(out, 2.0 if f[0] > 0 else 0.0)


def _kdp_or_ddsl(method, tiny_images, **options):
    teacher, student = _plain_net("teacher", 3), _plain_net("student", 3)  # same seed: a copy
    keras.utils.set_random_seed(0)
    x, y = tiny_images
    train = data.make_dataset(x, y, batch_size=16, training=False)
    training = Training(learning_rate=0.1, recalibrate_bn=0, jit_compile=False)
    m = methods.get(method, admm_epochs=2, finetune_epochs=0, update_every=2, round_to=1,
                    training=training, **options)  # fmt: skip
    pruned = m.prune(teacher, student, train, _val(tiny_images), methods.Budget.macs(0.4))
    return student, pruned


def test_dean_with_zero_learning_rate_reproduces_kdp_exactly(tiny_images):
    # ddsl's own penalty defaults (per-group, ρ 0.001 → 0.05), given to kdp explicitly.
    kdp_student, kdp = _kdp_or_ddsl("kdp", tiny_images, normalize=True, rho_initial=1e-3, rho_final=0.05)
    ddsl_student, ddsl = _kdp_or_ddsl("ddsl", tiny_images, dean_lr=0.0, dean_every=2)
    assert ddsl.plan == kdp.plan
    for a, b in zip(ddsl_student.weights, kdp_student.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # bit for bit
    trace = ddsl.record["dean"]
    # the state before the first meta-update, then the 4 updates (steps 2, 4, 6, 8)
    assert trace["step"] == [1, 2, 4, 6, 8]
    assert trace["w_distill"] == [0.5] * 5 and trace["w_sparsity"] == [1.0] * 5
    assert all(0.0 <= d < 1.0 for d in trace["distillability"])


def _resume_setup(tiny_images):
    teacher, student = _plain_net("teacher", 3), _plain_net("student", 4)
    val = _val(tiny_images)
    distiller, admm, dean = _dean_distiller(
        teacher, student, {"conv1": 3, "conv2": 4}, next(iter(val)), dean_lr=1.0, steps=8
    )
    return distiller, admm, dean, ValidationBatch(dean, teacher, val)


def test_stop_restore_continue_reproduces_dean_weights_and_admm(tiny_images, tmp_path):
    x, y = tiny_images
    fit = dict(batch_size=16, verbose=0, shuffle=False)
    distiller, admm, dean, cb = _resume_setup(tiny_images)
    distiller.fit(x, y, epochs=2, callbacks=[cb], **fit)
    want = [v.numpy() for v in dean.weights + admm.weights + distiller.student.weights]
    want_w = [distiller.sparsity_weight.numpy(), distiller.distillation_loss_weights[0].numpy()]

    distiller, admm, dean, cb = _resume_setup(tiny_images)
    distiller.fit(x, y, epochs=1, callbacks=[cb], **fit)
    distiller.save_training_state(str(tmp_path / "state.weights.h5"))
    distiller, admm, dean, cb = _resume_setup(tiny_images)  # fresh objects, as in a new process
    distiller.load_training_state(str(tmp_path / "state.weights.h5"))
    assert int(dean.updates.numpy()) == 2
    distiller.fit(x, y, epochs=2, initial_epoch=1, callbacks=[cb], **fit)
    got = [v.numpy() for v in dean.weights + admm.weights + distiller.student.weights]
    got_w = [distiller.sparsity_weight.numpy(), distiller.distillation_loss_weights[0].numpy()]
    assert int(dean.updates.numpy()) == 4
    assert not np.allclose(dean.kernel.numpy(), 0.0)  # the dean did move
    for g, w in zip(got + got_w, want + want_w, strict=True):
        # Same ops on the same data in the same order; only summation order may differ.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_dean_under_mirrored_strategy_matches_single_device(tiny_images):
    x, y = tiny_images  # 4 global batches of 16, 8 per replica
    strategy = runtime.mirrored_strategy(["/cpu:0", "/cpu:1"])
    runs = []
    for scope in (strategy, None):
        with scope.scope() if scope else tf.distribute.get_strategy().scope():
            teacher, student = _plain_net("teacher", 3), _plain_net("student", 4)
            val = _val(tiny_images)
            distiller, admm, dean = _dean_distiller(
                teacher, student, {"conv1": 3, "conv2": 4}, next(iter(val)), dean_lr=1.0,
                spe=2,  # two steps per compiled call: the dean counts optimizer iterations
            )  # fmt: skip
            cb = ValidationBatch(dean, teacher, val)
        distiller.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
        if scope:  # every replica holds the same dean state
            for v in dean.weights:
                first, second = strategy.experimental_local_results(v.value)
                np.testing.assert_array_equal(first.numpy(), second.numpy())
        runs.append([keras.ops.convert_to_numpy(v) for v in dean.weights + student.weights]
                    + [keras.ops.convert_to_numpy(distiller.sparsity_weight)])  # fmt: skip
    assert int(runs[0][list(map(lambda v: v.name, dean.weights)).index("updates")]) == 4
    assert not np.allclose(runs[1][0], 0.0)  # the single-device dean moved
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 reduction order


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dean_every": 0}, "dean_every=0"),
        ({"distill_min": 1.0, "distill_max": 0.8}, "distill_max=0.8"),
        ({"sparsity_max": -1.0}, "sparsity_max=-1.0"),
        ({"sparsity_max": 0.5}, "sparsity_max=0.5"),  # below the initial weight 1.0
        ({"dean_lr": -0.1}, "dean_lr=-0.1"),
    ],
)
def test_ddsl_bad_arguments_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        methods.get("ddsl", **options)


def test_ddsl_without_validation_data_is_refused(tiny_images):
    x, y = tiny_images
    teacher = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    with pytest.raises(ValueError, match="val_data=None"):
        methods.get("ddsl").prune(teacher, teacher, data.make_dataset(x, y), None, 0.3)


def test_pipeline_runs_ddsl_end_to_end_with_dean_report(tmp_path, tiny_teacher):
    import json
    import os

    from test_pipeline import _values

    from tfkdp.pipelines import workflow

    values = _values(tmp_path, method="ddsl", teacher=tiny_teacher, formats=["tflite"], teacher_epochs=1,
                     dean_every=2, dean_lr=0.5, dean_distill_max=1.5, dean_sparsity_max=3.0)  # fmt: skip
    workflow.run(values)
    out = values["output_dir"]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    record = report["student"]["record"]
    assert record["options"]["dean_every"] == 2 and record["options"]["sparsity_max"] == 3.0
    trace = record["dean"]
    assert len(trace["step"]) >= 2
    assert all(0.0 <= w <= 1.5 for w in trace["w_distill"])
    assert all(0.0 <= w <= 3.0 for w in trace["w_sparsity"])
    assert report["student"]["macs"] <= 0.52 * report["teacher"]["macs"]
    assert os.path.getsize(os.path.join(out, "dean.png")) > 0
    assert report["plots"]["dean"] == "dean.png"
