"""ADMM state, projection, updates and penalty against NumPy references."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import data, models, runtime, schedules
from tfkdp.pruning import channel_groups
from tfkdp.pruning.sparsity import admm as admm_lib

KEEP = {"stem_conv": 3, "stage1_block1_conv1": 2, "stage3_block1_conv2": 9}


def _tiny():
    return models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)


def _np_project(values, axes, k):
    """Reference Π_k: joint L2 norm over all slices, keep the k largest (ties: lower index)."""
    norms = sum(np.sum(np.moveaxis(v, a, 0).reshape(v.shape[a], -1) ** 2, axis=1) for v, a in zip(values, axes, strict=True))
    order = np.argsort(-norms, kind="stable")
    mask = np.zeros(norms.shape[0], dtype=np.float32)
    mask[order[:k]] = 1.0
    out = []
    for v, a in zip(values, axes, strict=True):
        shape = [1] * v.ndim
        shape[a] = -1
        out.append(v * mask.reshape(shape))
    return out, mask


def test_projection_keeps_exactly_the_k_channels_of_largest_joint_norm():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 5, 12)).astype("float32")
    gamma = rng.normal(size=(12,)).astype("float32")
    dense = rng.normal(size=(12, 7)).astype("float32")
    # One channel gets a huge gamma only: joint norms must count every slice.
    gamma[4] = 50.0
    for k in (1, 5, 12):
        got, mask = admm_lib.project_channels(
            [tf.constant(kernel), tf.constant(gamma), tf.constant(dense)], [3, 0, 0], [1, 1, 1], k
        )
        want, want_mask = _np_project([kernel, gamma, dense], [3, 0, 0], k)
        np.testing.assert_array_equal(mask.numpy(), want_mask)
        assert mask.numpy().sum() == k
        assert mask.numpy()[4] == 1.0
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w)


def test_projection_breaks_ties_by_lower_channel_index():
    values = [tf.ones((2, 6))]
    _, mask = admm_lib.project_channels(values, [1], [1], 4)
    np.testing.assert_array_equal(mask.numpy(), [1, 1, 1, 1, 0, 0])


def test_projection_with_repeated_entries_per_channel():
    # Flatten → Dense rows: channel c owns entries c*3 .. c*3+2 on axis 0.
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(4 * 3, 5)).astype("float32")
    rows[3:6] *= 10.0  # channel 1
    _, mask = admm_lib.project_channels([tf.constant(rows)], [0], [3], 1)
    np.testing.assert_array_equal(mask.numpy(), [0, 1, 0, 0])


def _state(admm, gid):
    return [
        (w.numpy() if s.full else np.take(w.numpy(), s.indices.numpy(), axis=s.axis), z.numpy(), u.numpy())
        for (ref, w, z, u), s in zip(admm.slots(gid), admm._groups[admm.group_ids.index(gid)][2], strict=True)
    ]


def test_z_u_update_matches_numpy_reference_including_rho_rescaling():
    model = _tiny()
    rho = schedules.ExponentialRho(initial_rho=0.1, multiplier=2.0, every_steps=4, max_rho=10.0)
    admm = admm_lib.ADMM(model, KEEP, rho=rho, update_every=4)
    rng = np.random.default_rng(2)
    # Move W away from Z and give U non-trivial values, as after some training.
    for gid in admm.group_ids:
        for _, w, _, u in admm.slots(gid):
            w.assign(w.numpy() + rng.normal(scale=0.1, size=w.shape).astype("float32"))
            u.assign(rng.normal(scale=0.05, size=u.shape).astype("float32"))
    before = {gid: _state(admm, gid) for gid in admm.group_ids}
    rho_old = float(admm.rho.numpy())
    step_fn = tf.function(admm.on_train_step_end)
    assert not bool(step_fn(tf.constant(3, tf.int64)))  # not an update step: nothing changes
    for gid in admm.group_ids:
        for (_, z0, u0), (_, z1, u1) in zip(before[gid], _state(admm, gid), strict=True):
            np.testing.assert_array_equal(z0, z1)
            np.testing.assert_array_equal(u0, u1)
    assert bool(step_fn(tf.constant(4, tf.int64)))
    rho_new = 0.2  # 0.1 * 2 ** (4 // 4)
    assert float(admm.rho.numpy()) == pytest.approx(rho_new)
    assert int(admm.step.numpy()) == 4
    for gid in admm.group_ids:
        slots = admm._groups[admm.group_ids.index(gid)][2]
        values = [w + u * (rho_old / rho_new) for w, _, u in before[gid]]
        want_z, want_mask = _np_project(values, [s.axis for s in slots], KEEP[gid])
        np.testing.assert_array_equal(admm.mask(gid).numpy(), want_mask)
        for (_, z, u), v, wz in zip(_state(admm, gid), values, want_z, strict=True):
            np.testing.assert_allclose(z, wz, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(u, v - wz, rtol=1e-6, atol=1e-7)


def test_penalty_is_zero_when_w_equals_z_and_u_is_zero_and_matches_formula_otherwise():
    model = _tiny()
    admm = admm_lib.ADMM(model, KEEP, rho=0.5, update_every=1)
    for gid in admm.group_ids:
        for (_, _, z, u), s in zip(admm.slots(gid), admm._groups[admm.group_ids.index(gid)][2], strict=True):
            z.assign(s.read())
            u.assign(tf.zeros_like(u))
    assert float(admm()) == 0.0
    rng = np.random.default_rng(3)
    total = 0.0
    for gid in admm.group_ids:
        for (_, _, z, u), s in zip(admm.slots(gid), admm._groups[admm.group_ids.index(gid)][2], strict=True):
            z.assign(rng.normal(size=z.shape).astype("float32"))
            u.assign(rng.normal(size=u.shape).astype("float32"))
            total += np.sum((s.read().numpy() - z.numpy() + u.numpy()) ** 2, dtype=np.float64)
    np.testing.assert_allclose(float(admm()), 0.5 * 0.5 * total, rtol=1e-5)


def test_penalty_gradient_flows_to_student_weights_only_on_regularised_slices():
    model = _tiny()
    admm = admm_lib.ADMM(model, {"stem_conv": 2}, rho=1.0, update_every=1)
    with tf.GradientTape() as tape:
        penalty = admm()
    grads = tape.gradient(penalty, [v.value for v in model.trainable_variables])
    touched = {v.path for v, g in zip(model.trainable_variables, grads, strict=True) if g is not None and np.any(g.numpy())}
    assert "stem_conv/kernel" in touched
    assert not any(p.startswith("stage1_block1_conv1/") for p in touched)


def test_tfmot_polynomial_decay_drives_admm_sparsity():
    saved_env = dict(os.environ)
    try:
        import tensorflow_model_optimization as tfmot

        model = _tiny()
        groups = {g.id: g for g in channel_groups(model)}
        removed = sum(groups[g].size - k for g, k in KEEP.items())
        target = removed / sum(groups[g].size for g in KEEP)
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=8, frequency=1
        )
        admm = admm_lib.ADMM(model, KEEP, sparsity_schedule=schedule, rho=0.1, update_every=2)
        assert admm.target_sparsity == pytest.approx(target)
        for step in (0, 2, 4, 6, 8, 10):
            if step:
                admm.on_train_step_end(tf.constant(step, tf.int64))
            sparsity = float(schedule(tf.constant(step, tf.int64))[1])
            for gid, k in KEEP.items():
                size = groups[gid].size
                want = size - int(np.round(min(1.0, sparsity / target) * (size - k)))
                assert admm.mask(gid).numpy().sum() == want, (step, gid)
        assert admm.mask("stage3_block1_conv2").numpy().sum() == KEEP["stage3_block1_conv2"]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    # Keras 3 is still the Keras in use after tfmot's import.
    assert "TF_USE_LEGACY_KERAS" not in os.environ or saved_env.get("TF_USE_LEGACY_KERAS")
    after = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert after(np.ones((1, 3), "float32")).shape == (1, 2)
    assert keras.__version__.startswith("3.")


def _distiller(teacher, student, admm):
    from tfkdp.distill.distiller import Distiller
    from tfkdp.train.recipe import make_optimizer

    distiller = Distiller(teacher, student, sparsity=admm)
    distiller.compile(
        optimizer=make_optimizer(8, learning_rate=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
        steps_per_execution=2,
    )
    return distiller


def _setup(teacher_weights):
    keras.utils.set_random_seed(7)
    teacher = _tiny()
    teacher.set_weights(teacher_weights)
    student = _tiny()
    student.set_weights(teacher_weights)
    rho = schedules.ExponentialRho(0.01, 2.0, 2, 1.0)
    schedule = schedules.PolynomialDecay(0.0, 0.5, 0, 6, frequency=2)
    admm = admm_lib.ADMM(student, KEEP, sparsity_schedule=schedule, rho=rho, update_every=2)
    return teacher, student, admm


def test_stop_restore_continue_keeps_z_u_and_step(tiny_images, tmp_path):
    x, y = tiny_images
    ds = data.make_dataset(x, y, batch_size=16, training=False)  # 4 batches, fixed order
    weights = _tiny().get_weights()

    teacher, student, admm = _setup(weights)
    straight = _distiller(teacher, student, admm)
    straight.fit(ds, epochs=2, verbose=0)
    want = [v.numpy() for v in admm.weights] + [v.numpy() for v in student.weights]
    assert int(admm.step.numpy()) == 8

    teacher, student, admm = _setup(weights)
    first = _distiller(teacher, student, admm)
    first.fit(ds, epochs=1, verbose=0)
    first.save_training_state(str(tmp_path / "state.weights.h5"))

    teacher, student, admm = _setup(weights)  # fresh objects, as in a new process
    resumed = _distiller(teacher, student, admm)
    resumed.load_training_state(str(tmp_path / "state.weights.h5"))
    assert int(admm.step.numpy()) == 4
    assert int(resumed.optimizer.iterations.numpy()) == 4
    resumed.fit(ds, epochs=2, initial_epoch=1, verbose=0)
    got = [v.numpy() for v in admm.weights] + [v.numpy() for v in student.weights]
    assert int(admm.step.numpy()) == 8
    for g, w in zip(got, want, strict=True):
        # Same ops on the same data in the same order; only summation order may differ.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep": {"nope": 2}}, "'nope'"),
        ({"keep": {"stem_conv": 0}}, r"keep\['stem_conv'\]"),
        ({"keep": {"stem_conv": 5}}, r"\[1, 4\]"),
        ({"update_every": 0}, "update_every=0"),
        ({"rho": -1.0}, "rho=-1.0"),
        ({"keep": [1, 2]}, "list"),
    ],
)
def test_admm_bad_arguments_name_the_value(kwargs, message):
    args = {"keep": {"stem_conv": 2}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        admm_lib.ADMM(_tiny(), **args)


def test_admm_runs_inside_an_xla_compiled_step_with_steps_per_execution(tiny_images):
    from tfkdp.distill.distiller import Distiller
    from tfkdp.train.recipe import make_optimizer

    x, y = tiny_images
    ds = data.make_dataset(x, y, batch_size=16, training=False)
    teacher = _tiny()
    student = _tiny()
    schedule = schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2)
    admm = admm_lib.ADMM(student, KEEP, sparsity_schedule=schedule, rho=0.1, update_every=2)
    distiller = Distiller(teacher, student, sparsity=admm)
    distiller.compile(
        optimizer=make_optimizer(8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,  # fails on any NumPy/py_function round trip
        steps_per_execution=4,  # batch hooks run once per 4 steps; ADMM counts iterations
    )
    history = distiller.fit(ds, epochs=2, verbose=0)
    assert int(admm.step.numpy()) == 8
    assert history.history["sparsity_loss"][-1] > 0.0
    assert admm.mask("stage3_block1_conv2").numpy().sum() == KEEP["stage3_block1_conv2"]


def _plain_net(name, seed):
    """Two convs and a Dense, no batch norm: per-replica results are those of one device."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name=name)


def test_admm_under_mirrored_strategy_matches_single_device(tiny_images):
    from tfkdp.distill.distiller import Distiller

    x, y = tiny_images  # 64 images; 4 global batches of 16, 8 per replica
    strategy = runtime.mirrored_strategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    init = [_plain_net("teacher", 3).get_weights(), _plain_net("student", 4).get_weights()]
    runs = []
    for scope in (strategy, None):
        with scope.scope() if scope else tf.distribute.get_strategy().scope():
            teacher, student = _plain_net("teacher", 3), _plain_net("student", 4)
            teacher.set_weights(init[0])
            student.set_weights(init[1])
            schedule = schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2)
            admm = admm_lib.ADMM(
                student, {"conv1": 3, "conv2": 4}, sparsity_schedule=schedule,
                rho=schedules.ExponentialRho(0.1, 2.0, 2, 1.0), update_every=2,
            )  # fmt: skip
            distiller = Distiller(teacher, student, sparsity=admm, sparsity_weight=1.0)
            distiller.compile(
                optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False).history
        if scope:  # every replica holds the same ADMM state
            for v in admm.weights:
                first, second = strategy.experimental_local_results(v.value)
                np.testing.assert_array_equal(first.numpy(), second.numpy())
        runs.append(
            (history, [keras.ops.convert_to_numpy(v) for v in admm.weights + student.weights],
             admm.sparsity_plan())
        )  # fmt: skip
    (dist_hist, dist_values, dist_plan), (single_hist, single_values, single_plan) = runs
    assert int(dist_values[0]) == int(single_values[0]) == 8  # ADMM step = optimizer steps
    np.testing.assert_allclose(dist_hist["sparsity_loss"], single_hist["sparsity_loss"], rtol=1e-4)
    assert single_hist["sparsity_loss"][-1] > 0.0
    for a, b in zip(dist_values, single_values, strict=True):  # Z, U, rho, masks, weights
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert dist_plan == single_plan
    assert {gid: len(single_plan[gid]) for gid in single_plan} == {"conv1": 3, "conv2": 4}


def test_normalized_penalty_is_invariant_to_the_scale_of_the_regularised_weights():
    """`normalize=True` divides each group's term by its mean square weight: scale-free.

    Every regularised slice times 8 multiplies the raw penalty by 64 and leaves
    the normalised one unchanged (ρ fixed, U = 0, Z = Π(W) at the target).
    """
    model = _tiny()
    scaled = keras.models.clone_model(model)
    scaled.set_weights(model.get_weights())
    probe = admm_lib.ADMM(scaled, KEEP, rho=1.0)
    for group_id in probe.group_ids:
        for _, variable, _, _ in probe.slots(group_id):
            variable.assign(variable * 8.0)
    penalties = {}
    for name, m in (("base", model), ("scaled", scaled)):
        for normalize in (False, True):
            admm = admm_lib.ADMM(m, KEEP, rho=1.0, normalize=normalize)
            penalties[name, normalize] = float(admm.penalty())
    np.testing.assert_allclose(penalties["scaled", False], 64 * penalties["base", False], rtol=1e-4)
    np.testing.assert_allclose(penalties["scaled", True], penalties["base", True], rtol=1e-4)
    # The normalised term is a sum of fractions of each group's energy, times its size.
    assert penalties["base", True] > 0
    admm = admm_lib.ADMM(model, KEEP, normalize=True)
    assert admm.get_config()["normalize"] is True
    with pytest.raises(ValueError, match=r"normalize must be one of \[False, True, 'mean'\]; received normalize='yes'"):
        admm_lib.ADMM(model, KEEP, normalize="yes")


def test_mean_normalized_penalty_is_the_group_normalized_one_over_the_weight_count():
    """`normalize="mean"`: ρ/2 · Σ_g ‖W_g − Z_g + U_g‖²/ms_g / N, scale-free and small."""
    model = _tiny()
    group = admm_lib.ADMM(model, KEEP, rho=1.0, normalize=True)
    mean = admm_lib.ADMM(model, KEEP, rho=1.0, normalize="mean")
    count = sum(int(np.prod(z.shape)) for gid in mean.group_ids for _, _, z, _ in mean.slots(gid))
    assert mean.regularised_weights() == count > 0
    np.testing.assert_allclose(float(mean.penalty()), float(group.penalty()) / count, rtol=1e-5)
    # By hand: each group's squared distance in units of its own mean square, averaged over N.
    total = 0.0
    for gid in mean.group_ids:
        slots = mean.slots(gid)
        values = [keras.ops.convert_to_numpy(v) for _, v, _, _ in slots]
        ms = sum(np.sum(v**2) for v in values) / sum(v.size for v in values)
        diffs = [
            v - keras.ops.convert_to_numpy(z) + keras.ops.convert_to_numpy(u)
            for v, (_, _, z, u) in zip(values, slots, strict=True)
        ]
        total += sum(np.sum(d**2) for d in diffs) / ms
    np.testing.assert_allclose(float(mean.penalty()), 0.5 * total / count, rtol=1e-4)
    # Right after reset U = W − Z, so the term is 4× the removed share of the energy: < 2·ρ.
    assert 0.0 < float(mean.penalty()) < 2.0
    scaled = keras.models.clone_model(model)
    scaled.set_weights([w * 8.0 for w in model.get_weights()])
    np.testing.assert_allclose(
        float(admm_lib.ADMM(scaled, KEEP, rho=1.0, normalize="mean").penalty()), float(mean.penalty()), rtol=1e-4
    )
    config = mean.get_config()
    assert config["normalize"] == "mean"
    again = admm_lib.ADMM.from_student_config(model, config)
    np.testing.assert_allclose(float(again.penalty()), float(mean.penalty()), rtol=1e-6)
