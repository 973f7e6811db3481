"""Weight (unstructured) pruning: exact sparsity, masks as state, schedules, round trips."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfkdp
from tfkdp import data, metrics, models
from tfkdp.pruning import unstructured
from tfkdp.pruning.sparsity import schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resnet(width=4, name=None):
    return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3, name=name)


def _expected_pruned(sparsity, n):
    # The documented count: floor(s·n + 1/2).
    return int(np.floor(sparsity * n + 0.5))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_per_layer_masks_hit_the_target_sparsity_exactly_in_every_layer(sparsity):
    masked = unstructured.apply_weight_masks(_resnet())
    pruner = unstructured.WeightPruner(masked, sparsity)
    before = {p: masked.get_layer(p).kernel.numpy() for p in pruner.paths}
    pruner.prune_to(sparsity)
    for path in pruner.paths:
        kernel = masked.get_layer(path).kernel.numpy()
        mask = unstructured.weight_masks(masked)[path].mask.numpy()
        assert int(np.sum(mask == 0)) == _expected_pruned(sparsity, mask.size), path
        assert np.all(kernel[mask == 0] == 0.0)
        np.testing.assert_array_equal(kernel[mask == 1], before[path][mask == 1])
        # the smallest magnitudes went: every kept entry is at least as large as every pruned one
        assert np.abs(before[path][mask == 1]).min() >= np.abs(before[path][mask == 0]).max()


def test_global_threshold_hits_the_target_over_all_layers_and_ranks_across_them():
    masked = unstructured.apply_weight_masks(_resnet())
    pruner = unstructured.WeightPruner(masked, 0.6, scope="global")
    before = {p: masked.get_layer(p).kernel.numpy() for p in pruner.paths}
    result = pruner.prune_to(0.6)
    total = sum(v.size for v in before.values())
    assert result["total"] == total
    assert result["pruned"] == _expected_pruned(0.6, total)
    masks = {p: m.mask.numpy() for p, m in unstructured.weight_masks(masked).items()}
    kept = np.concatenate([np.abs(before[p][masks[p] == 1]) for p in before])
    pruned = np.concatenate([np.abs(before[p][masks[p] == 0]) for p in before])
    assert kept.min() >= pruned.max()
    # one threshold, not one sparsity per layer: the layers end up unequal
    assert len({round(s, 3) for s in result["layers"].values()}) > 1


def test_magnitude_masks_count_is_exact_with_ties_broken_by_position():
    values = [tf.constant([1.0, 1.0, 1.0, 1.0, 2.0])]
    (mask,) = unstructured.magnitude_masks(values, 0.5)
    # floor(0.5·5 + 0.5) = 3 zeros among four tied entries: the first three.
    assert mask.numpy().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_default_selection_skips_the_first_conv_and_depthwise_kernels():
    model = models.mobilenet_v2_cifar(0.25, input_shape=(16, 16, 3), num_classes=3)
    paths = unstructured.prunable_layers(model)
    assert "stem_conv" not in paths
    assert "logits" in paths and "block2_expand" in paths
    assert not any(isinstance(model.get_layer(p), keras.layers.DepthwiseConv2D) for p in paths)
    conv_like = [
        layer.name for layer in model.layers
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)
    ]  # fmt: skip
    assert len(paths) == len(conv_like) - 1  # every conv/dense kernel but the stem


def test_layers_argument_selects_those_kernels_and_rejects_unknown_names():
    model = _resnet()
    masked = unstructured.apply_weight_masks(model, layers=["logits", "stem_conv"])
    assert list(unstructured.weight_masks(masked)) == ["stem_conv", "logits"]
    chosen = unstructured.prunable_layers(model, lambda layer: isinstance(layer, keras.layers.Dense))
    assert chosen == ["logits"]
    with pytest.raises(ValueError, match="'nope'.*not a layer"):
        unstructured.apply_weight_masks(model, layers=["nope"])
    with pytest.raises(ValueError, match="'pool'.*no kernel"):
        unstructured.apply_weight_masks(model, layers=["pool"])


def test_apply_and_remove_masks_preserve_outputs_and_leave_the_input_untouched():
    model = _resnet()
    original = [w.numpy().copy() for w in model.weights]
    x = np.random.default_rng(0).uniform(size=(4, 12, 12, 1)).astype("float32")
    masked = unstructured.apply_weight_masks(model)
    np.testing.assert_allclose(masked(x), model(x), rtol=0, atol=1e-6)
    unstructured.WeightPruner(masked, 0.5).prune_to(0.5)
    plain = unstructured.remove_weight_masks(masked)
    assert unstructured.weight_masks(plain) == {}
    assert metrics.count_params(plain) == metrics.count_params(model)
    np.testing.assert_allclose(plain(x), masked(x), rtol=0, atol=1e-6)
    pruned = unstructured.weight_sparsity(masked)["pruned"]
    assert metrics.count_nonzero_params(plain) == metrics.count_nonzero_params(model) - pruned
    for before, variable in zip(original, model.weights, strict=True):
        np.testing.assert_array_equal(before, variable.numpy())


def test_ramp_updates_masks_only_at_should_prune_steps_and_ends_on_target():
    masked = unstructured.apply_weight_masks(_resnet())
    schedule = schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=8, frequency=2)
    pruner = unstructured.WeightPruner(masked, schedule)
    n = pruner.sparsity()["total"]
    for step in range(1, 12):
        updated = bool(pruner.on_train_step_end(tf.constant(step, tf.int64)))
        assert updated == (step % 2 == 0 and step <= 8), step
        # the sparsity in force is the schedule's at the last update step
        last = min(8, step - step % 2)
        want = float(schedule(tf.constant(last, tf.int64))[1])
        per_layer = sum(_expected_pruned(want, m.mask.numpy().size)
                        for m in unstructured.weight_masks(masked).values())  # fmt: skip
        assert pruner.sparsity()["pruned"] == per_layer, step
    assert pruner.sparsity()["pruned"] == sum(
        _expected_pruned(0.8, m.mask.numpy().size) for m in unstructured.weight_masks(masked).values()
    )
    assert n == sum(m.mask.numpy().size for m in unstructured.weight_masks(masked).values())


def test_pruned_weights_stay_zero_through_kd_training_and_a_keras_round_trip(tiny_images, tmp_path):
    x, y = tiny_images
    train = data.make_dataset(x, y, batch_size=16, training=False)  # 4 steps per epoch
    teacher = _resnet(8, "teacher")
    masked = unstructured.apply_weight_masks(_resnet(4, "student"))
    schedule = schedules.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=4, frequency=2)
    pruner = unstructured.WeightPruner(masked, schedule)
    distiller = tfkdp.Distiller(teacher, masked, sparsity=pruner)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False,
    )  # fmt: skip
    distiller.fit(train, epochs=2, verbose=0)
    sizes = {p: m.mask.numpy().size for p, m in unstructured.weight_masks(masked).items()}
    assert pruner.sparsity()["pruned"] == sum(_expected_pruned(0.7, n) for n in sizes.values())

    def zeros_held(model):
        for path, mask in unstructured.weight_masks(model).items():
            kernel = model.get_layer(path).kernel.numpy()
            assert np.all(kernel[mask.mask.numpy() == 0] == 0.0), path
            assert np.any(kernel[mask.mask.numpy() == 1] != 0.0), path

    zeros_held(masked)
    path = str(tmp_path / "masked.keras")
    masked.save(path)
    loaded = keras.saving.load_model(path)
    for p, mask in unstructured.weight_masks(masked).items():
        np.testing.assert_array_equal(unstructured.weight_masks(loaded)[p].mask.numpy(), mask.mask.numpy())
    np.testing.assert_allclose(loaded(x[:4]), masked(x[:4]), rtol=0, atol=1e-6)
    # an optimizer step after the reload (dense random gradients on every weight):
    # the reloaded constraints put the zeros back
    optimizer = keras.optimizers.SGD(0.1)
    trainable = loaded.trainable_variables
    rng = np.random.default_rng(1)
    optimizer.apply_gradients(
        [(rng.normal(size=v.shape).astype("float32"), v) for v in trainable]
    )
    zeros_held(loaded)
    assert unstructured.weight_sparsity(loaded)["sparsity"] == pytest.approx(
        pruner.sparsity()["sparsity"]
    )


def test_pruning_hook_runs_once_cross_replica_under_a_mirrored_strategy(tiny_images):
    """The per-step prune under `MirroredStrategy` (2 CPU devices): a merge_call, not tf.cond per replica."""
    from tfkdp import runtime

    x, y = tiny_images
    train = data.make_dataset(x, y, batch_size=16, training=False)
    strategy = runtime.mirrored_strategy()
    with strategy.scope():
        teacher = _resnet(8, "teacher")
        masked = unstructured.apply_weight_masks(_resnet(4, "student"))
        pruner = unstructured.WeightPruner(
            masked, schedules.PolynomialDecay(0.0, 0.6, begin_step=0, end_step=4, frequency=2)
        )
        distiller = tfkdp.Distiller(teacher, masked, sparsity=pruner)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False,
        )  # fmt: skip
    distiller.fit(train, epochs=2, verbose=0)
    sizes = [m.mask.numpy().size for m in unstructured.weight_masks(masked).values()]
    assert pruner.sparsity()["pruned"] == sum(_expected_pruned(0.6, n) for n in sizes)


def test_callback_prunes_during_fit_without_a_teacher(tiny_images):
    x, y = tiny_images
    train = data.make_dataset(x, y, batch_size=16, training=False)
    masked = unstructured.apply_weight_masks(_resnet())
    pruner = unstructured.WeightPruner(
        masked, schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=1)
    )
    masked.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    masked.fit(train, epochs=2, verbose=0, callbacks=[unstructured.WeightPruningCallback(pruner)])
    sizes = [m.mask.numpy().size for m in unstructured.weight_masks(masked).values()]
    assert pruner.sparsity()["pruned"] == sum(_expected_pruned(0.5, n) for n in sizes)


def test_pruner_config_round_trips_on_a_new_student():
    masked = unstructured.apply_weight_masks(_resnet())
    schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, frequency=5)
    pruner = unstructured.WeightPruner(masked, schedule, scope="global")
    config = json.loads(json.dumps(pruner.get_config()))
    again = unstructured.WeightPruner.from_student_config(masked, config)
    assert again.scope == "global" and again.paths == pruner.paths
    assert again.sparsity_schedule.get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="from_student_config"):
        unstructured.WeightPruner.from_config(config)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: unstructured.WeightPruner(m, 0.5).prune_to(1.0), r"sparsity=1\.0"),
        (lambda m: unstructured.WeightPruner(m, 0.5).prune_to(-0.1), r"sparsity=-0\.1"),
        (lambda m: unstructured.WeightPruner(m, 0.5, scope="row"), "scope='row'"),
        (lambda m: unstructured.WeightPruner(m, 1.5), r"target_sparsity=1\.5"),
        (lambda m: unstructured.WeightPruner(_resnet(), 0.5), "no weight masks"),
        (lambda m: unstructured.weight_sparsity(_resnet()), "no weight masks"),
    ],
)
def test_bad_arguments_are_value_errors_naming_the_value(call, match):
    masked = unstructured.apply_weight_masks(_resnet())
    with pytest.raises(ValueError, match=match):
        call(masked)


_TFMOT_PROBE = r"""
import json, os
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot  # sets TF_USE_LEGACY_KERAS=1 in this process only
import keras
from tfkdp import models
from tfkdp.pruning import unstructured

model = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
masked = unstructured.apply_weight_masks(model)
schedule = tfmot.sparsity.keras.PolynomialDecay(
    initial_sparsity=0.0, final_sparsity=0.75, begin_step=0, end_step=6, frequency=2)
pruner = unstructured.WeightPruner(masked, schedule)
rows = []
for step in range(1, 9):
    updated = bool(pruner.on_train_step_end(tf.constant(step, tf.int64)))
    rows.append([step, updated, pruner.sparsity()["pruned"], float(schedule(tf.constant(step, tf.int64))[1])])
sizes = [int(m.mask.numpy().size) for m in unstructured.weight_masks(masked).values()]
print(json.dumps({"rows": rows, "sizes": sizes, "keras": keras.__version__}))
"""


def test_a_tfmot_polynomial_decay_drives_the_ramp():
    pytest.importorskip("tensorflow_model_optimization")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    # A subprocess: importing tfmot sets TF_USE_LEGACY_KERAS=1 for the whole process.
    out = subprocess.run([sys.executable, "-c", _TFMOT_PROBE], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=False)  # noqa: S603  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["keras"].startswith("3.")
    in_force = 0.0
    for step, updated, pruned, sparsity in result["rows"]:
        assert updated == (step % 2 == 0 and step <= 6), step
        if updated:
            in_force = sparsity
        assert pruned == sum(_expected_pruned(in_force, n) for n in result["sizes"]), step
    assert in_force == pytest.approx(0.75)
