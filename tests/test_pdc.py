"""PDC: k-means clusters, the centripetal update, hard averaging, merge, method and pipeline."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tfkdp import data, methods, metrics, models
from tfkdp.methods import Budget
from tfkdp.pruning import plan_macs
from tfkdp.pruning.clustering import (
    cluster_channels,
    intra_cluster_distance,
    validate_clusters,
)
from tfkdp.pruning.sparsity.centripetal import Centripetal
from tfkdp.train.phases import Training

EPS = 0.5


def _toy():
    inputs = keras.Input((4, 4, 2))
    x = layers.Conv2D(4, 1, name="c1")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


CLUSTERS = {"c1": [[0, 2], [1], [3]]}


def _reference(g, w, clusters, eps, axis=-1):
    """NumPy C-SGD: member gradient = cluster mean gradient + eps·(w − cluster mean w)."""
    g, w = np.moveaxis(g, axis, 0).copy(), np.moveaxis(w, axis, 0)
    out = g.copy()
    for members in clusters:
        out[members] = g[members].mean(0) + eps * (w[members] - w[members].mean(0))
    return np.moveaxis(out, 0, axis)


def test_centripetal_gradients_match_numpy_reference_in_graph_mode():
    model = _toy()
    rng = np.random.default_rng(0)
    model.get_layer("bn").gamma.assign(rng.uniform(0.5, 1.5, 4).astype("float32"))
    rule = Centripetal(model, CLUSTERS, epsilon=EPS, bn_factor=0.1)
    variables = model.trainable_variables
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    out = tf.function(lambda g: rule.transform_gradients(g, variables))(
        [tf.constant(g) for g in grads]
    )
    members = CLUSTERS["c1"]
    for v, g, o in zip(variables, grads, out, strict=True):
        if v.path.startswith("c1/"):
            expected = _reference(g, v.numpy(), members, EPS)
        elif v.path.startswith("bn/"):
            expected = _reference(g, v.numpy(), members, 0.1 * EPS)  # γ/β at 0.1·ε
        else:
            expected = g  # consumers are not touched
        np.testing.assert_allclose(np.asarray(o), expected, rtol=1e-5, atol=1e-6)
    assert len(rule.clustered_variables) == 4  # kernel, bias, gamma, beta
    assert float(rule()) == 0.0


def test_centripetal_sgd_collapses_members_while_their_mean_follows_the_mean_gradient():
    model = _toy()
    rule = Centripetal(model, CLUSTERS, epsilon=EPS)
    kernel = model.get_layer("c1").kernel
    lr, steps = 0.1, 20
    optimizer = keras.optimizers.SGD(lr)
    rng = np.random.default_rng(1)
    w0 = kernel.numpy().copy()
    d0 = intra_cluster_distance(model, CLUSTERS)
    task = [rng.normal(size=kernel.shape).astype("float32") for _ in range(steps)]
    for g in task:
        (new,) = rule.transform_gradients([tf.constant(g)], [kernel])
        optimizer.apply_gradients([(new, kernel)])
    w = kernel.numpy()
    # Difference between members: (1 − lr·ε)^steps of the start (the task gradients cancel).
    np.testing.assert_allclose(
        w[..., 0] - w[..., 2], (1 - lr * EPS) ** steps * (w0[..., 0] - w0[..., 2]), rtol=1e-4,
        atol=1e-6,
    )  # fmt: skip
    # The members' mean moved by −lr · Σ (mean task gradient); channel 1 by its own.
    mean_grad = sum(g[..., [0, 2]].mean(-1) for g in task)
    np.testing.assert_allclose(
        w[..., [0, 2]].mean(-1), w0[..., [0, 2]].mean(-1) - lr * mean_grad, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(w[..., 1], w0[..., 1] - lr * sum(g[..., 1] for g in task), rtol=1e-4, atol=1e-5)
    # 0.95^20 = 0.36 of the member difference is left (the norm moves a little).
    assert intra_cluster_distance(model, CLUSTERS) < 0.45 * d0


def test_cluster_channels_groups_near_identical_filters_with_kmeans():
    model = _toy()
    kernel = model.get_layer("c1").kernel
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1, 1, 2)), rng.normal(size=(1, 1, 2))
    noise = 1e-3 * rng.normal(size=(1, 1, 2, 4))
    kernel.assign((np.stack([a, b, a, b], axis=-1) + noise).astype("float32"))
    clusters = cluster_channels(model, {"c1": 2}, seed=0)
    assert clusters == {"c1": [[0, 2], [1, 3]]}
    assert 0 < intra_cluster_distance(model, clusters) < 0.05
    # Full-size counts leave the group alone; bad counts are refused with the range.
    assert cluster_channels(model, {"c1": 4}) == {}
    with pytest.raises(ValueError, match="group 'c1': 5 clusters requested; must lie in \\[1, 4\\]"):
        cluster_channels(model, {"c1": 5})


@pytest.mark.parametrize(
    "clusters, message",
    [
        ({"c1": [[0, 2], [2, 1], [3]]}, "group 'c1': channel 2 is in clusters 0 and 1"),
        ({"c1": [[0, 2], [1, 3, 7]]}, "group 'c1': cluster 1 holds channel 7.*cannot span groups"),
        ({"c1": [[0, 1, 2, 3], []]}, "group 'c1': cluster 1 is empty"),
    ],
    ids=["channel_in_two_clusters", "cluster_across_groups", "empty_cluster"],
)  # fmt: skip
def test_bad_clusters_are_value_errors_naming_the_group(clusters, message):
    model = _toy()
    with pytest.raises(ValueError, match=message):
        validate_clusters(model, clusters)
    with pytest.raises(ValueError, match=message):
        Centripetal(model, clusters)


def _setup(tiny_images):
    x, y = tiny_images
    teacher = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3, name="t")
    train = data.make_dataset(x[:48], y[:48], batch_size=8, training=False)
    val = data.make_dataset(x[:32], y[:32], batch_size=16, training=False)
    return teacher, train, val


def _pdc(**kwargs):
    training = Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False)
    return methods.get("pdc", admm_epochs=2, epsilon=2.0, training=training, **kwargs)


def test_pdc_compress_merges_exactly_to_the_planned_macs(tiny_images, tmp_path):
    teacher, train, val = _setup(tiny_images)
    method = _pdc()
    result = method.compress(teacher, None, train, val, Budget.macs(0.5))
    record = result.record
    curve = record["pdc_distance"]
    # The pull collapses the clusters; with Nesterov momentum 0.9 the member differences
    # oscillate (|root| 0.95, period ~20 steps at lr·ε = 0.1) while they decay: not monotone per epoch.
    assert len(curve) == 3 and min(curve[1:]) < 0.5 * curve[0]
    accuracy = record["accuracy"]
    assert accuracy["before_merge"] == accuracy["after_merge"]  # the merge is exact
    assert record["merge_max_abs_diff"] < 1e-4
    x = tiny_images[0][:16]
    expected = np.asarray(result.masked(x, training=False))
    got = np.asarray(result.model(x, training=False))
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()
    # MACs after the merge are the plan's (representatives kept), about half the teacher's.
    assert metrics.count_macs(result.model) == plan_macs(result.masked, result.plan)
    assert metrics.count_macs(result.model) <= 0.55 * metrics.count_macs(teacher)
    for gid, members in record["clusters"].items():
        assert sorted(result.plan[gid]) == [c[0] for c in members]
    # The report: a PNG of the curve and the accuracies around the merge.
    parts = method.report(json.loads(json.dumps(record)), str(tmp_path))
    assert os.path.getsize(parts["plots"]["pdc_distance"]) > 1000
    assert "after merge" in parts["markdown"]
    assert type(method).from_config(method.get_config()).get_config() == method.get_config()


def test_pdc_rejects_finetune_epochs_and_maps_pipeline_flags():
    with pytest.raises(ValueError, match="no fine-tune phase.*finetune_epochs=2"):
        methods.get("pdc", finetune_epochs=2)
    flags = {"compress_epochs": 3, "finetune_epochs": 1, "criterion": "l1", "round_to": 4,
             "pdc_epsilon": 1e-2}  # fmt: skip
    options = methods.get_class("pdc").pipeline_options(flags, Training())
    assert (options["admm_epochs"], options["finetune_epochs"], options["epsilon"]) == (3, 0, 1e-2)


def test_pdc_resumes_after_a_crash_with_the_same_clusters_and_weights(tiny_images, tmp_path):
    teacher, train, val = _setup(tiny_images)

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt("simulated kill after epoch 1")

    uninterrupted = _pdc().prune(teacher, methods.Method.prepare_student(teacher, None),
                                 train, val, Budget.macs(0.5))  # fmt: skip
    crashing = _pdc()
    crashing.training = Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False,
                                 callbacks=(Crash(),))  # fmt: skip
    crashing.state_dir = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        crashing.prune(teacher, methods.Method.prepare_student(teacher, None), train, val, 0.5)
    with open(tmp_path / "state" / "pdc_state.json") as f:
        saved = json.load(f)
    assert len(saved["curve"]) == 2  # clustering + epoch 1
    resumed_method = _pdc()
    resumed_method.state_dir = str(tmp_path / "state")
    resumed = resumed_method.prune(teacher, methods.Method.prepare_student(teacher, None),
                                   train, val, 0.5)  # fmt: skip
    assert resumed.record["clusters"] == uninterrupted.record["clusters"] == saved["clusters"]
    assert len(resumed.record["pdc_distance"]) == 3
    np.testing.assert_allclose(resumed.record["pdc_distance"], uninterrupted.record["pdc_distance"],
                               rtol=1e-3)  # fmt: skip
    for a, b in zip(resumed.model.weights, uninterrupted.model.weights, strict=True):
        # Same data order, same optimizer state restored: float32 noise only.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)


def test_pipeline_runs_pdc_end_to_end(tmp_path, tiny_teacher):
    from test_pipeline import _values

    from tfkdp.pipelines import workflow

    values = _values(tmp_path, method="pdc", teacher=tiny_teacher, pdc_epsilon=3.0, formats=["tflite"], teacher_epochs=1,
                     finetune_epochs=0)  # fmt: skip
    workflow.run(values)
    out = values["output_dir"]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    student = report["student"]
    assert student["macs"] <= 0.55 * report["teacher"]["macs"]
    record = student["record"]
    assert record["accuracy"]["before_merge"] == record["accuracy"]["after_merge"]
    assert record["pdc_distance"][-1] < record["pdc_distance"][0]
    assert os.path.exists(os.path.join(out, "pdc_distance.png"))
    assert report["artifacts"][0]["top1_agreement"] == 1.0


def test_auto_epsilon_closes_a_deviation_to_the_residual_under_the_house_optimizer():
    """ε from `auto_epsilon`, fed to the house SGD as the pull ε·d, leaves ~residual of d."""
    import keras

    from tfkdp.methods.pdc import auto_epsilon
    from tfkdp.train.recipe import make_optimizer

    steps, lr, residual = 300, 0.05, 1e-2
    epsilon = auto_epsilon(steps, lr, residual=residual)
    d = keras.Variable(np.ones(4, "float32"))
    optimizer = make_optimizer(steps, lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.apply_gradients([(epsilon * d.value, d)])
    left = float(np.abs(d.numpy()).max())
    assert residual / 1.5 < left <= residual * 1.01, (epsilon, left)


def test_epsilon_auto_and_its_errors():
    from tfkdp.methods.pdc import auto_epsilon
    from tfkdp.train.phases import Training

    assert methods.get("pdc").get_config()["epsilon"] == "auto"
    assert methods.get("pdc", epsilon="0.01").epsilon == 0.01  # a flag's string
    with pytest.raises(ValueError, match="'auto' or a number"):
        methods.get("pdc", epsilon="strong")
    with pytest.raises(ValueError, match="adamw"):
        methods.get("pdc", training=Training(optimizer="adamw"))
    with pytest.raises(ValueError, match="residual"):
        auto_epsilon(100, 0.05, residual=1.5)
    # More steps or a higher learning rate need a weaker pull.
    assert auto_epsilon(2000, 0.05) < auto_epsilon(200, 0.05)
    assert auto_epsilon(200, 0.1) == pytest.approx(auto_epsilon(200, 0.05) / 2, rel=1e-5)


def test_auto_pulls_distinct_batch_norms_together_too(tiny_images):
    """A trained model's γ/β differ per channel: under `auto` they close with the kernels."""
    from tfkdp.pruning.clustering import intra_cluster_distance

    teacher, train, _ = _setup(tiny_images)
    rng = np.random.default_rng(0)
    for layer in teacher.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.2, layer.beta.shape).astype("float32"))
    training = Training(learning_rate=0.05, recalibrate_bn=2, jit_compile=False)
    left = {}
    for bn_factor in (None, 0.1):
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        method = methods.get("pdc", admm_epochs=2, training=training, bn_factor=bn_factor)
        assert method.bn_factor == (1.0 if bn_factor is None else 0.1)
        pruned = method.prune(teacher, student, train, None, Budget.macs(0.5))
        curve = pruned.record["pdc_distance"]
        left[bn_factor] = intra_cluster_distance(pruned.model, pruned.record["clusters"]) / curve[0]
    assert left[None] < 0.01, left  # closed: the hard average loses (almost) nothing
    assert left[0.1] > 3 * left[None], left  # C-SGD's weaker BN pull leaves the γ/β spread
    assert methods.get("pdc", epsilon=3e-3).bn_factor == 0.1  # C-SGD's setting with a number
