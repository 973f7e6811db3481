"""Distillation losses against hand (numpy) computations, their checks and their configs."""

import keras
import numpy as np
import pytest

from tfkdp import losses as kd


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


# Fixed logits: 4 samples, 5 classes; labels include a class the teacher does not favour.
T_LOGITS = np.array(
    [
        [3.0, 1.0, 0.2, -1.0, 0.5],
        [0.1, 2.5, -0.3, 0.0, 1.2],
        [-1.0, 0.0, 1.0, 2.0, 0.3],
        [0.7, 0.7, 0.7, -2.0, 1.5],
    ],
    "float32",
)
S_LOGITS = np.array(
    [
        [1.0, 0.5, 0.0, -0.5, 0.2],
        [0.3, 1.0, 0.2, -0.1, 0.4],
        [0.0, 0.2, 0.1, 1.1, -0.3],
        [1.2, -0.4, 0.3, 0.0, 0.9],
    ],
    "float32",
)
LABELS = np.array([0, 1, 3, 2])


def _np_dkd(t, s, labels, alpha, beta, temperature):
    """Decoupled KD straight from the paper's definitions (Zhao et al. 2022, Eq. 1-6)."""
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    out = []
    for i, g in enumerate(labels):
        b_t = np.array([p_t[i, g], 1 - p_t[i, g]])
        b_s = np.array([p_s[i, g], 1 - p_s[i, g]])
        others = [c for c in range(t.shape[1]) if c != g]
        q_t = p_t[i, others] / p_t[i, others].sum()
        q_s = p_s[i, others] / p_s[i, others].sum()
        out.append(alpha * _kl(b_t, b_s) + beta * _kl(q_t, q_s))
    return np.array(out) * temperature**2


def _feature_models():
    """Teacher feature (None, 4, 4, 6), student feature (None, 2, 2, 3); 3 logits each."""
    t_in = keras.Input((4, 4, 1))
    t_feat = keras.layers.Conv2D(6, 1, name="t_feat")(t_in)
    t_out = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(t_feat))
    s_in = keras.Input((4, 4, 1))
    s_feat = keras.layers.Conv2D(3, 1, strides=2, name="s_feat")(s_in)
    s_flat = keras.layers.Flatten(name="s_flat")(s_feat)
    s_out = keras.layers.Dense(3, name="logits")(s_flat)
    return keras.Model(t_in, t_out, name="t"), keras.Model(s_in, s_out, name="s")


def test_soft_target_kd_equals_hand_computation_on_fixed_logits():
    temperature = 4.0
    per_sample = _kl(_softmax(T_LOGITS / temperature), _softmax(S_LOGITS / temperature))
    expected = per_sample.mean() * temperature**2
    got = float(kd.SoftTargetKD(temperature).compute_loss(T_LOGITS, S_LOGITS))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    weights = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    expected_weighted = (per_sample * weights).sum() / 4 * temperature**2  # sum_over_batch_size
    got_weighted = kd.SoftTargetKD(temperature).compute_loss(
        T_LOGITS, S_LOGITS, sample_weight=weights
    )
    np.testing.assert_allclose(float(got_weighted), expected_weighted, rtol=1e-5)
    assert float(kd.SoftTargetKD(2.0).compute_loss(T_LOGITS, T_LOGITS)) == pytest.approx(0, abs=1e-6)


def test_soft_target_kd_matches_keras_logits_distillation():
    ours = float(kd.SoftTargetKD(3.0).compute_loss(T_LOGITS, S_LOGITS))
    # Keras 3.15 softmaxes only for a KLDivergence *instance*: its default string
    # "kl_divergence" resolves to a function and is applied to raw (clipped) logits.
    keras_kd = keras.distillation.LogitsDistillation(3.0, loss=keras.losses.KLDivergence())
    theirs = float(keras_kd.compute_loss(T_LOGITS, S_LOGITS))
    # Keras clips probabilities at 1e-7 inside KLDivergence; nothing here is that small.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("one_hot", [False, True])
def test_decoupled_kd_equals_numpy_reference(one_hot):
    labels = np.eye(5, dtype="float32")[LABELS] if one_hot else LABELS
    loss = kd.DecoupledKD(alpha=0.5, beta=6.0, temperature=2.0)
    expected = _np_dkd(T_LOGITS, S_LOGITS, LABELS, 0.5, 6.0, 2.0).mean()
    got = float(loss.compute_loss(T_LOGITS, S_LOGITS, y_true=labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_decoupled_kd_decomposes_soft_target_kd_per_sample():
    # The paper's identity KD = TCKD + (1 - p_target^teacher) * NCKD, sample by sample.
    temperature = 3.0
    for i in range(len(LABELS)):
        t, s, g = T_LOGITS[i : i + 1], S_LOGITS[i : i + 1], LABELS[i : i + 1]
        p_target = _softmax(t / temperature)[0, g[0]]
        dkd = kd.DecoupledKD(alpha=1.0, beta=float(1 - p_target), temperature=temperature)
        np.testing.assert_allclose(
            float(dkd.compute_loss(t, s, y_true=g)),
            float(kd.SoftTargetKD(temperature).compute_loss(t, s)),
            rtol=1e-4,
        )


def test_decoupled_kd_without_labels_uses_teacher_argmax_and_honours_sample_weight():
    argmax = T_LOGITS.argmax(axis=-1)
    weights = np.array([0.0, 1.0, 1.0, 3.0], "float32")
    expected = (_np_dkd(T_LOGITS, S_LOGITS, argmax, 1.0, 8.0, 4.0) * weights).sum() / 4
    got = kd.DecoupledKD().compute_loss(T_LOGITS, S_LOGITS, sample_weight=weights)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_hint_loss_connector_and_resize_equal_numpy():
    teacher, student = _feature_models()
    hint = kd.HintLoss("t_feat", "s_feat", resize="nearest")
    hint.validate_model_compatibility(teacher, student)
    assert hint.connector is not None and hint.connector.kernel.shape == (1, 1, 3, 6)

    rng = np.random.default_rng(0)
    t_feat = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    s_feat = rng.normal(size=(2, 2, 2, 3)).astype("float32")
    kernel = keras.ops.convert_to_numpy(hint.connector.kernel)[0, 0]  # (3, 6)
    # Nearest 2x upsampling is pixel repetition.
    upsampled = s_feat.repeat(2, axis=1).repeat(2, axis=2)
    expected = ((upsampled @ kernel - t_feat) ** 2).mean()
    np.testing.assert_allclose(float(hint.compute_loss(t_feat, s_feat)), expected, rtol=1e-5)

    # Same channels and size: no connector, the loss is the plain MSE (here the MAE).
    same = kd.HintLoss("t_feat", "t_feat", loss="mae")
    same.validate_model_compatibility(teacher, teacher)
    assert same.connector is None
    np.testing.assert_allclose(
        float(same.compute_loss(t_feat, t_feat + 0.25)), 0.25, rtol=1e-5
    )


def test_attention_transfer_equals_numpy_reference():
    rng = np.random.default_rng(1)
    t = [rng.normal(size=(3, 4, 4, 6)).astype("float32"), rng.normal(size=(3, 2, 2, 5)).astype("float32")]
    s = [rng.normal(size=(3, 4, 4, 2)).astype("float32"), rng.normal(size=(3, 2, 2, 7)).astype("float32")]

    def att(a):
        q = (a**2).mean(axis=-1).reshape(a.shape[0], -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    per_sample = sum(((att(sa) - att(ta)) ** 2).mean(axis=1) for ta, sa in zip(t, s, strict=True))
    expected = 1000.0 / 2 * per_sample.mean()
    loss = kd.AttentionTransfer([("a", "a"), ("b", "b")])
    np.testing.assert_allclose(float(loss.compute_loss(t, s)), expected, rtol=1e-5)


def test_attention_transfer_resizes_student_map_to_teacher_size():
    teacher, student = _feature_models()
    loss = kd.AttentionTransfer(("t_feat", "s_feat"), resize="nearest")
    loss.validate_model_compatibility(teacher, student)
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    s = rng.normal(size=(2, 2, 2, 3)).astype("float32")
    q_s = (s**2).mean(-1).repeat(2, axis=1).repeat(2, axis=2).reshape(2, -1)
    q_t = (t**2).mean(-1).reshape(2, -1)
    q_s /= np.linalg.norm(q_s, axis=1, keepdims=True)
    q_t /= np.linalg.norm(q_t, axis=1, keepdims=True)
    expected = 500.0 * ((q_s - q_t) ** 2).mean()
    np.testing.assert_allclose(float(loss.compute_loss([t], [s])), expected, rtol=1e-5)


def test_unknown_layer_name_lists_candidates():
    teacher, student = _feature_models()
    with pytest.raises(ValueError, match=r"no layer named 't_fet'.*'t_feat'"):
        kd.HintLoss("t_fet", "s_feat").validate_model_compatibility(teacher, student)
    with pytest.raises(ValueError, match=r"student model 's' has no layer named 'nope'.*'s_flat'"):
        kd.AttentionTransfer([("t_feat", "nope")]).validate_model_compatibility(teacher, student)


def test_shape_mismatches_name_both_shapes():
    teacher, student = _feature_models()
    both = r"\(None, 4, 4, 6\).*\(None, 2, 2, 3\)"
    with pytest.raises(ValueError, match=r"connector=False.*" + both):
        kd.HintLoss("t_feat", "s_feat", connector=False).validate_model_compatibility(
            teacher, student
        )
    with pytest.raises(ValueError, match=r"resize=None.*" + both):
        kd.HintLoss("t_feat", "s_feat", resize=None).validate_model_compatibility(teacher, student)
    with pytest.raises(ValueError, match=r"4-D.*\(None, 12\)"):
        kd.AttentionTransfer([("t_feat", "s_flat")]).validate_model_compatibility(teacher, student)
    with pytest.raises(ValueError, match="resize=None"):
        kd.AttentionTransfer([("t_feat", "s_feat")], resize=None).validate_model_compatibility(
            teacher, student
        )
    four_classes = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
    for loss in (kd.SoftTargetKD(), kd.DecoupledKD()):
        with pytest.raises(ValueError, match=r"teacher output shape \(None, 3\).*\(None, 4\)"):
            loss.validate_model_compatibility(teacher, four_classes)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: kd.SoftTargetKD(0.0), "temperature must be a positive number; received temperature=0.0"),
        (lambda: kd.SoftTargetKD("4"), "temperature must be a positive number"),
        (lambda: kd.SoftTargetKD(True), "temperature must be a positive number"),
        (lambda: kd.SoftTargetKD(float("inf")), "temperature must be finite"),
        (lambda: kd.DecoupledKD(alpha=-1.0), "alpha must be a number >= 0; received alpha=-1.0"),
        (lambda: kd.DecoupledKD(beta=float("nan")), "beta must be a number >= 0"),
        (lambda: kd.HintLoss("", "b"), "teacher_layer_name must be a non-empty layer name"),
        (lambda: kd.HintLoss("a", "b", connector="yes"), "connector must be 'auto', True or False"),
        (lambda: kd.HintLoss("a", "b", loss="huber"), r"loss must be one of \('mse', 'mae'\)"),
        (lambda: kd.HintLoss("a", "b", resize="cubic"), "resize must be None or one of"),
        (lambda: kd.AttentionTransfer([]), "layer_pairs must be a non-empty list"),
        (lambda: kd.AttentionTransfer([("a", "b", "c")]), r"received \('a', 'b', 'c'\)"),
        (lambda: kd.AttentionTransfer([("a", "b")], p=0), "p must be a positive number"),
        (lambda: kd.get("fitnet"), r"Unknown distillation loss 'fitnet'; valid names: \['attention'"),
        (lambda: kd.get(3), "received 3 of type int"),
        (lambda: kd.get(kd.SoftTargetKD(), temperature=2.0), "pass them only with a name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "loss",
    [
        kd.SoftTargetKD(temperature=2.5),
        kd.DecoupledKD(alpha=0.5, beta=4.0, temperature=3.0),
        kd.HintLoss("t", "s", connector=True, resize="nearest", loss="mae"),
        kd.AttentionTransfer([("t1", "s1"), ("t2", "s2")], p=1.0, beta=10.0, resize=None),
    ],
    ids=["soft_target", "dkd", "hint", "attention"],
)
def test_config_round_trips_through_keras_serialization(loss):
    config = loss.get_config()
    assert type(loss).from_config(config).get_config() == config
    serialized = kd.serialize(loss)
    assert serialized["registered_name"] == f"tfkdp>{type(loss).__name__}"
    restored = kd.deserialize(serialized)
    assert type(restored) is type(loss) and restored.get_config() == config
    assert kd.get(serialized).get_config() == config


def test_registry_builds_losses_by_name():
    assert kd.names() == ["attention", "dkd", "feature", "hint", "logits", "soft_target"]
    assert kd.get("soft_target", temperature=2.0).get_config() == {"temperature": 2.0}
    assert isinstance(kd.get("DKD"), kd.DecoupledKD)
    hint = kd.get("hint", teacher_layer_name="a", student_layer_name="b")
    assert (hint.teacher_layer_name, hint.student_layer_name) == ("a", "b")
    assert isinstance(kd.get("logits"), keras.distillation.LogitsDistillation)
