"""Knowledge-distillation losses on the `keras.distillation.DistillationLoss` protocol.

Every loss here subclasses `keras.distillation.DistillationLoss`, so it works in
`tfkdp.Distiller` and, for the logit losses, in Keras' own
`keras.distillation.Distiller` too; Keras' `LogitsDistillation` and
`FeatureDistillation` plug into `tfkdp.Distiller` unchanged.

The protocol, as `tfkdp.Distiller` uses it:

- `validate_model_compatibility(teacher, student)` is called once when the
  loss is bound to a teacher and a student. The losses here check layer names
  and shapes there and create their connector layers (built, so checkpoints can
  be restored before the first step).
- Which features a loss receives: `teacher_layer_name`/`student_layer_name`
  (one layer, Keras' convention; `None` means the final output) or
  `teacher_layer_names`/`student_layer_names` (a list of layers; the loss then
  receives lists of tensors in that order).
- `compute_loss(teacher_outputs, student_outputs, **kwargs)` returns a scalar.
  `tfkdp.Distiller` passes `y_true=` (the labels, or `None`) and
  `sample_weight=` (or `None`) as keyword arguments; the losses here weight
  each sample as Keras' `"sum_over_batch_size"` reduction does
  (`sum(w_i * l_i) / batch_size`). Keras' own losses ignore both.
- `connectors`: trainable layers the loss owns; the Distiller tracks and trains
  them and checkpoints their weights.

All losses compute in float32 whatever the inputs' dtype (mixed precision).

Why one module of ~750 lines: it holds one concept, the family of KD losses
on one protocol with its registry (`get`, `names`); the four losses share the
validation and weighting helpers at the top, and most of the length is their
docstrings with formulas and references.
"""

import difflib

import keras
from absl import logging
from keras import ops

from tfkdp.checks import check_number

__all__ = [
    "AttentionTransfer",
    "DecoupledKD",
    "HintLoss",
    "SoftTargetKD",
    "deserialize",
    "get",
    "names",
    "serialize",
]

_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area")
_ELEMENT_LOSSES = ("mse", "mae")


# --------------------------------------------------------------------------- helpers


def get_layer_or_raise(model, layer_name, role):
    """Returns `model.get_layer(layer_name)` or raises a ValueError listing candidates.

    Args:
        model: a `keras.Model`.
        layer_name: the name to look up.
        role: `"teacher"` or `"student"`, used in the message.

    Returns:
        The layer.

    Raises:
        ValueError: if `model` has no layer of that name; the message lists the
            closest names and every layer name of the model.
    """
    names_ = [layer.name for layer in getattr(model, "layers", [])]
    if layer_name in names_:
        return model.get_layer(layer_name)
    close = difflib.get_close_matches(str(layer_name), names_, n=5, cutoff=0.5)
    raise ValueError(
        f"The {role} model {model.name!r} has no layer named {layer_name!r}. "
        f"Closest matches: {close}. Available layers ({len(names_)}): {names_}"
    )


def _layer_output_shape(model, layer_name, role):
    layer = get_layer_or_raise(model, layer_name, role)
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Cannot read the output shape of {role} layer {layer_name!r} of model "
            f"{model.name!r} (feature losses need Functional or Sequential models whose "
            f"layers are called once): {error}"
        ) from error


def _model_output_shape(model, role):
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return None  # subclassed model: nothing to check before the first step
    if len(outputs) != 1:
        raise ValueError(
            f"Logit distillation needs a single-output {role}; model {model.name!r} has "
            f"{len(outputs)} outputs with shapes {[tuple(o.shape) for o in outputs]}"
        )
    return tuple(outputs[0].shape)


def _check_positive(name, value):
    return check_number(name, value, 0, strict=True)


def _check_non_negative(name, value):
    return check_number(name, value, 0)


def _check_resize(resize):
    if resize is not None and resize not in _RESIZE_METHODS:
        raise ValueError(
            f"resize must be None or one of {_RESIZE_METHODS}; received resize={resize!r}"
        )
    return resize


def _as_float32(x):
    return ops.cast(x, "float32")


def weighted_batch_mean(per_sample, sample_weight=None):
    """Reduces per-sample losses like Keras' `"sum_over_batch_size"`.

    Args:
        per_sample: tensor of shape `(batch,)`.
        sample_weight: `None` or a tensor with `batch` elements.

    Returns:
        `sum(w_i * l_i) / batch` as a float32 scalar (`mean(l)` without weights).
    """
    per_sample = _as_float32(per_sample)
    if sample_weight is not None:
        per_sample = per_sample * ops.reshape(_as_float32(sample_weight), (-1,))
    return ops.mean(per_sample)


def _mean_over_non_batch_axes(x):
    if len(x.shape) <= 1:
        return x
    return ops.mean(x, axis=tuple(range(1, len(x.shape))))


def _class_count_check(loss, teacher, student):
    t_shape = _model_output_shape(teacher, "teacher")
    s_shape = _model_output_shape(student, "student")
    if t_shape is None or s_shape is None:
        return
    if len(t_shape) != len(s_shape) or any(
        t is not None and s is not None and t != s for t, s in zip(t_shape[1:], s_shape[1:], strict=True)
    ):
        raise ValueError(
            f"{type(loss).__name__} compares teacher and student logits, whose shapes must "
            f"match: teacher output shape {t_shape}, student output shape {s_shape}"
        )


def _sparse_labels(y_true, num_classes):
    """Integer class ids of shape (batch,) from sparse or one-hot labels."""
    if len(y_true.shape) >= 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        return ops.argmax(y_true, axis=-1)
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


# --------------------------------------------------------------------------- logit losses


@keras.saving.register_keras_serializable(package="tfkdp")
class SoftTargetKD(keras.distillation.DistillationLoss):
    """Soft-target knowledge distillation: KL between softened distributions, × T².

    For teacher logits `t` and student logits `s`, per sample

        KL(softmax(t / T) || softmax(s / T)) * T**2

    averaged over the batch (weighted by `sample_weight` when given). The `T²`
    factor keeps the gradient scale independent of `T` (Hinton et al., Sec. 2).

    Args:
        temperature: softening temperature `T` > 0. Defaults to 4.0.

    Raises:
        ValueError: for a non-positive temperature; at binding, when teacher and
            student logits have different shapes (the message names both).

    Example:
        >>> loss = SoftTargetKD(temperature=4.0)
        >>> t = np.array([[2.0, 0.0, -1.0]], "float32")
        >>> float(loss.compute_loss(t, t))
        0.0

    Reference:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
        NIPS Deep Learning Workshop 2015.
    """

    def __init__(self, temperature=4.0):
        self.temperature = _check_positive("temperature", temperature)

    def validate_model_compatibility(self, teacher, student):
        _class_count_check(self, teacher, student)

    def validate_outputs(self, teacher_outputs, student_outputs):
        if tuple(teacher_outputs.shape[1:]) != tuple(student_outputs.shape[1:]):
            raise ValueError(
                f"SoftTargetKD needs teacher and student logits of the same shape; teacher "
                f"{tuple(teacher_outputs.shape)}, student {tuple(student_outputs.shape)}"
            )

    def compute_loss(self, teacher_outputs, student_outputs, sample_weight=None, **kwargs):
        """KL(teacher ‖ student) at temperature T, × T², batch-averaged.

        Args:
            teacher_outputs: teacher logits `(batch, classes)`.
            student_outputs: student logits `(batch, classes)`.
            sample_weight: optional per-sample weights.
            **kwargs: ignored (`y_true`).

        Returns:
            A float32 scalar.
        """
        del kwargs
        t = _as_float32(teacher_outputs) / self.temperature
        s = _as_float32(student_outputs) / self.temperature
        log_p_t = ops.log_softmax(t, axis=-1)
        log_p_s = ops.log_softmax(s, axis=-1)
        per_sample = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
        return weighted_batch_mean(per_sample, sample_weight) * self.temperature**2

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfkdp")
class DecoupledKD(keras.distillation.DistillationLoss):
    """Decoupled KD: target-class (TCKD) and non-target-class (NCKD) terms weighted apart.

    With `b = [p_target, 1 - p_target]` the binary target/non-target
    probabilities and `p̂` the distribution over the non-target classes
    (renormalised), both at temperature `T`, per sample

        loss = (alpha * KL(b_teacher || b_student)
                + beta * KL(p̂_teacher || p̂_student)) * T**2

    averaged over the batch. The target class is the label (`y_true`, sparse
    ids or one-hot); without labels (unlabelled distillation) it is the
    teacher's arg-max.

    Args:
        alpha: weight of the TCKD term, >= 0. Defaults to 1.0.
        beta: weight of the NCKD term, >= 0. Defaults to 8.0 (the paper's CIFAR
            setting).
        temperature: softening temperature > 0. Defaults to 4.0.

    Raises:
        ValueError: for negative weights or a non-positive temperature; at
            binding, when teacher and student logits have different shapes.

    Example:
        >>> loss = DecoupledKD(alpha=1.0, beta=8.0, temperature=4.0)
        >>> t = np.array([[2.0, 0.0, -1.0]], "float32")
        >>> float(loss.compute_loss(t, t, y_true=np.array([0])))
        0.0

    Reference:
        Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
    """

    # Subtracting this from the target logit (after /T) removes it from the
    # non-target softmax while keeping log-probabilities finite (as the
    # reference implementation does; -inf would give 0 * inf = NaN).
    _MASK_OFFSET = 1000.0

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0):
        self.alpha = _check_non_negative("alpha", alpha)
        self.beta = _check_non_negative("beta", beta)
        self.temperature = _check_positive("temperature", temperature)

    def validate_model_compatibility(self, teacher, student):
        _class_count_check(self, teacher, student)
        shape = _model_output_shape(student, "student")
        if shape is not None and shape[-1] is not None and shape[-1] < 2:
            raise ValueError(
                f"DecoupledKD needs at least 2 classes; student output shape {shape}"
            )

    def validate_outputs(self, teacher_outputs, student_outputs):
        if tuple(teacher_outputs.shape[1:]) != tuple(student_outputs.shape[1:]):
            raise ValueError(
                f"DecoupledKD needs teacher and student logits of the same shape; teacher "
                f"{tuple(teacher_outputs.shape)}, student {tuple(student_outputs.shape)}"
            )

    def compute_loss(
        self, teacher_outputs, student_outputs, y_true=None, sample_weight=None, **kwargs
    ):
        """alpha·TCKD + beta·NCKD at temperature T, × T², batch-averaged.

        Args:
            teacher_outputs: teacher logits `(batch, classes)`.
            student_outputs: student logits `(batch, classes)`.
            y_true: labels (sparse ids or one-hot) or `None` (teacher arg-max).
            sample_weight: optional per-sample weights.
            **kwargs: ignored.

        Returns:
            A float32 scalar.
        """
        del kwargs
        t = _as_float32(teacher_outputs) / self.temperature
        s = _as_float32(student_outputs) / self.temperature
        num_classes = t.shape[-1]
        if y_true is None:
            target = ops.argmax(t, axis=-1)
        else:
            target = _sparse_labels(y_true, num_classes)
        gt = ops.one_hot(target, num_classes, dtype="float32")

        # TCKD: binary KL on [p_target, 1 - p_target], in log space for stability:
        # log p_target = z_target - LSE(z), log(1 - p_target) = LSE(z_nontarget) - LSE(z).
        def binary_log_probs(z):
            lse_all = ops.logsumexp(z, axis=-1)
            z_target = ops.sum(z * gt, axis=-1)
            lse_other = ops.logsumexp(z - self._MASK_OFFSET * gt, axis=-1)
            return z_target - lse_all, lse_other - lse_all

        t_in, t_out = binary_log_probs(t)
        s_in, s_out = binary_log_probs(s)
        tckd = ops.exp(t_in) * (t_in - s_in) + ops.exp(t_out) * (t_out - s_out)

        # NCKD: KL between the renormalised non-target distributions.
        log_q_t = ops.log_softmax(t - self._MASK_OFFSET * gt, axis=-1)
        log_q_s = ops.log_softmax(s - self._MASK_OFFSET * gt, axis=-1)
        nckd = ops.sum(ops.exp(log_q_t) * (log_q_t - log_q_s) * (1.0 - gt), axis=-1)

        per_sample = (self.alpha * tckd + self.beta * nckd) * self.temperature**2
        return weighted_batch_mean(per_sample, sample_weight)

    def get_config(self):
        return {"alpha": self.alpha, "beta": self.beta, "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------- feature losses


@keras.saving.register_keras_serializable(package="tfkdp")
class HintLoss(keras.distillation.DistillationLoss):
    """FitNets hint loss between a teacher layer and a student layer.

    The student feature is resized to the teacher's spatial size when they
    differ (`resize`) and mapped by a learned 1×1 connector (a bias-free 1×1
    `Conv2D` for 4-D features, a bias-free `Dense` otherwise) when channel
    counts differ; the loss is the per-sample mean squared (or absolute) error,
    averaged over the batch. The connector is created, already built, when the
    loss is bound to a teacher and a student
    (`validate_model_compatibility`, done by `tfkdp.Distiller`), which then
    trains and checkpoints it. Resizing and a 1×1 map commute, so the order only
    affects cost: resizing happens first, on the student's channel count.

    Args:
        teacher_layer_name: name of the teacher layer that gives the hint.
        student_layer_name: name of the student ("guided") layer.
        connector: `"auto"` (a connector only when channel counts differ), `True`
            (always, as in FitNets) or `False` (never; a channel mismatch is an
            error).
        resize: interpolation used when spatial sizes differ, one of
            `"bilinear"`, `"nearest"`, `"bicubic"`, `"area"`, or `None` (a size
            mismatch is an error). Defaults to `"bilinear"`.
        loss: `"mse"` (FitNets' L2) or `"mae"`.

    Raises:
        ValueError: for bad arguments; at binding, for an unknown layer name
            (the message lists the candidates) or incompatible shapes (the
            message names both shapes).

    Example:
        >>> hint = HintLoss("stage2_block1_out", "stage2_block1_out")
        >>> distiller = tfkdp.Distiller(teacher, student, [SoftTargetKD(), hint])

    Reference:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """

    def __init__(
        self, teacher_layer_name, student_layer_name, connector="auto", resize="bilinear", loss="mse"
    ):
        for arg, value in (
            ("teacher_layer_name", teacher_layer_name),
            ("student_layer_name", student_layer_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{arg} must be a non-empty layer name; received {arg}={value!r}")
        if connector not in ("auto", True, False):
            raise ValueError(
                f"connector must be 'auto', True or False; received connector={connector!r}"
            )
        if loss not in _ELEMENT_LOSSES:
            raise ValueError(f"loss must be one of {_ELEMENT_LOSSES}; received loss={loss!r}")
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        self.connector_mode = connector
        self.resize = _check_resize(resize)
        self.loss = loss
        self.connector = None
        self._target_size = None
        self._bound_shapes = None

    @property
    def connectors(self):
        """The trainable connector layers (empty before binding or when not needed)."""
        return [] if self.connector is None else [self.connector]

    def validate_model_compatibility(self, teacher, student):
        """Checks names and shapes and creates the 1×1 connector if needed.

        Raises:
            ValueError: for an unknown layer name or incompatible shapes.
        """
        t_shape = _layer_output_shape(teacher, self.teacher_layer_name, "teacher")
        s_shape = _layer_output_shape(student, self.student_layer_name, "student")
        described = (
            f"teacher layer {self.teacher_layer_name!r} output shape {t_shape}, "
            f"student layer {self.student_layer_name!r} output shape {s_shape}"
        )
        if len(t_shape) != len(s_shape) or len(t_shape) < 2:
            raise ValueError(f"HintLoss needs features of the same rank (>= 2): {described}")
        if t_shape[-1] is None or s_shape[-1] is None:
            raise ValueError(f"HintLoss needs a known channel count: {described}")
        t_space, s_space = t_shape[1:-1], s_shape[1:-1]
        if any(d is None for d in t_space + s_space):
            raise ValueError(f"HintLoss needs known spatial sizes: {described}")
        target_size = None
        if t_space != s_space:
            if len(t_shape) != 4 or self.resize is None:
                raise ValueError(
                    f"HintLoss: spatial sizes differ and cannot be resized (resize="
                    f"{self.resize!r}, only 4-D features are resized): {described}"
                )
            target_size = tuple(int(d) for d in t_space)
        needs_connector = self.connector_mode is True or (
            self.connector_mode == "auto" and t_shape[-1] != s_shape[-1]
        )
        if t_shape[-1] != s_shape[-1] and not needs_connector:
            raise ValueError(f"HintLoss with connector=False needs equal channel counts: {described}")

        connector_in = (s_shape[0],) + (target_size or s_space) + (s_shape[-1],)
        if needs_connector:
            reuse = (
                self.connector is not None
                and self._bound_shapes is not None
                and self._bound_shapes == (t_shape[1:], s_shape[1:])
            )
            if not reuse:
                if self.connector is not None:
                    logging.info(
                        "HintLoss %s->%s: new shapes %s, creating a new connector",
                        self.student_layer_name, self.teacher_layer_name, described,
                    )
                name = f"hint_connector_{self.student_layer_name}_to_{self.teacher_layer_name}"
                if len(t_shape) == 4:
                    self.connector = keras.layers.Conv2D(
                        int(t_shape[-1]), 1, use_bias=False, name=name
                    )
                else:
                    self.connector = keras.layers.Dense(int(t_shape[-1]), use_bias=False, name=name)
                self.connector.build(connector_in)
        else:
            self.connector = None
        self._target_size = target_size
        self._bound_shapes = (t_shape[1:], s_shape[1:])

    def validate_outputs(self, teacher_outputs, student_outputs):
        t_shape, s_shape = tuple(teacher_outputs.shape), tuple(student_outputs.shape)
        if self._bound_shapes is None:
            if t_shape[1:] != s_shape[1:]:
                raise ValueError(
                    f"HintLoss was not bound to models (validate_model_compatibility) and "
                    f"shapes differ: teacher {t_shape}, student {s_shape}"
                )
        elif self._bound_shapes != (t_shape[1:], s_shape[1:]):
            raise ValueError(
                f"HintLoss was bound to teacher/student feature shapes {self._bound_shapes} "
                f"but received teacher {t_shape}, student {s_shape}"
            )

    def compute_loss(self, teacher_outputs, student_outputs, sample_weight=None, **kwargs):
        """Per-sample feature error after resize and connector, batch-averaged.

        Args:
            teacher_outputs: the teacher layer's output.
            student_outputs: the student layer's output.
            sample_weight: optional per-sample weights.
            **kwargs: ignored (`y_true`).

        Returns:
            A float32 scalar.
        """
        del kwargs
        s = student_outputs
        if self._target_size is not None:
            s = ops.image.resize(s, self._target_size, interpolation=self.resize)
        if self.connector is not None:
            s = self.connector(s)
        diff = _as_float32(s) - _as_float32(teacher_outputs)
        elementwise = ops.square(diff) if self.loss == "mse" else ops.abs(diff)
        return weighted_batch_mean(_mean_over_non_batch_axes(elementwise), sample_weight)

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "connector": self.connector_mode,
            "resize": self.resize,
            "loss": self.loss,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfkdp")
class AttentionTransfer(keras.distillation.DistillationLoss):
    """Activation-based attention transfer over pairs of (teacher, student) layers.

    For a 4-D feature `A` (batch, H, W, C) the attention map is
    `Q = vec(mean_c |A_c|**p)`, L2-normalised per sample. Channel counts may
    differ. Per pair the loss is `beta / 2 * mean_hw (Q_s - Q_t)**2`; pairs are
    summed and the result is averaged over the batch — the authors' code, where
    `beta = 1000` is "divided by the number of elements in the attention map".
    When spatial sizes differ the student's map is resized to the teacher's.

    Args:
        layer_pairs: list of `(teacher_layer_name, student_layer_name)`; a single
            pair may be given as a 2-tuple of names.
        p: exponent of the attention map, > 0. Defaults to 2.
        beta: weight of the attention term, >= 0. Defaults to 1000.
        resize: interpolation when spatial sizes differ (see `HintLoss`), or
            `None` to make a size mismatch an error.

    Raises:
        ValueError: for bad arguments; at binding, for an unknown layer name
            (lists the candidates) or non-4-D / mismatched features (names both
            shapes).

    Example:
        >>> at = AttentionTransfer([("stage1_block1_out", "stage1_block1_out"),
        ...                         ("stage2_block1_out", "stage2_block1_out")])

    Reference:
        Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    """

    def __init__(self, layer_pairs, p=2.0, beta=1000.0, resize="bilinear"):
        if (
            isinstance(layer_pairs, (list, tuple))
            and len(layer_pairs) == 2
            and all(isinstance(n, str) for n in layer_pairs)
        ):
            layer_pairs = [tuple(layer_pairs)]
        if not isinstance(layer_pairs, (list, tuple)) or not layer_pairs:
            raise ValueError(
                "layer_pairs must be a non-empty list of (teacher_layer_name, "
                f"student_layer_name) pairs; received layer_pairs={layer_pairs!r}"
            )
        pairs = []
        for pair in layer_pairs:
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(n, str) and n for n in pair)
            ):
                raise ValueError(
                    "each entry of layer_pairs must be a (teacher_layer_name, "
                    f"student_layer_name) pair of strings; received {pair!r} in "
                    f"layer_pairs={layer_pairs!r}"
                )
            pairs.append((pair[0], pair[1]))
        self.layer_pairs = pairs
        self.p = _check_positive("p", p)
        self.beta = _check_non_negative("beta", beta)
        self.resize = _check_resize(resize)
        self._map_sizes = None

    @property
    def teacher_layer_names(self):
        return [t for t, _ in self.layer_pairs]

    @property
    def student_layer_names(self):
        return [s for _, s in self.layer_pairs]

    def validate_model_compatibility(self, teacher, student):
        """Checks names and that every pair is 4-D with resizable spatial sizes."""
        sizes = []
        for t_name, s_name in self.layer_pairs:
            t_shape = _layer_output_shape(teacher, t_name, "teacher")
            s_shape = _layer_output_shape(student, s_name, "student")
            described = (
                f"teacher layer {t_name!r} output shape {t_shape}, "
                f"student layer {s_name!r} output shape {s_shape}"
            )
            if len(t_shape) != 4 or len(s_shape) != 4:
                raise ValueError(
                    f"AttentionTransfer needs 4-D (batch, H, W, C) features: {described}"
                )
            if any(d is None for d in t_shape[1:3] + s_shape[1:3]):
                raise ValueError(f"AttentionTransfer needs known spatial sizes: {described}")
            if t_shape[1:3] != s_shape[1:3] and self.resize is None:
                raise ValueError(
                    f"AttentionTransfer: spatial sizes differ and resize=None: {described}"
                )
            sizes.append((tuple(t_shape[1:3]), tuple(s_shape[1:3])))
        self._map_sizes = sizes

    def validate_outputs(self, teacher_outputs, student_outputs):
        if len(teacher_outputs) != len(self.layer_pairs) or len(student_outputs) != len(
            self.layer_pairs
        ):
            raise ValueError(
                f"AttentionTransfer expects {len(self.layer_pairs)} teacher and student "
                f"features; received {len(teacher_outputs)} and {len(student_outputs)}"
            )

    def _attention(self, a):
        a = _as_float32(a)
        a = ops.square(a) if self.p == 2.0 else ops.power(ops.abs(a), self.p)
        return ops.mean(a, axis=-1, keepdims=True)  # (batch, H, W, 1)

    @staticmethod
    def _normalise(q):
        q = ops.reshape(q, (ops.shape(q)[0], -1))
        # Same epsilon as torch.nn.functional.normalize in the authors' code.
        return q / ops.maximum(ops.sqrt(ops.sum(ops.square(q), axis=-1, keepdims=True)), 1e-12)

    def compute_loss(self, teacher_outputs, student_outputs, sample_weight=None, **kwargs):
        """Sum over pairs of `beta/2 * mean_hw (Q_s - Q_t)**2`, batch-averaged.

        Args:
            teacher_outputs: list of teacher features, one per pair.
            student_outputs: list of student features, one per pair.
            sample_weight: optional per-sample weights.
            **kwargs: ignored (`y_true`).

        Returns:
            A float32 scalar.
        """
        del kwargs
        per_sample = 0.0
        for t, s in zip(teacher_outputs, student_outputs, strict=True):
            q_t = self._attention(t)
            q_s = self._attention(s)
            if tuple(q_s.shape[1:3]) != tuple(q_t.shape[1:3]):
                q_s = ops.image.resize(q_s, tuple(q_t.shape[1:3]), interpolation=self.resize)
            diff = self._normalise(q_s) - self._normalise(q_t)
            per_sample = per_sample + ops.mean(ops.square(diff), axis=-1)
        return weighted_batch_mean(per_sample, sample_weight) * (self.beta / 2.0)

    def get_config(self):
        return {
            "layer_pairs": [list(pair) for pair in self.layer_pairs],
            "p": self.p,
            "beta": self.beta,
            "resize": self.resize,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------- registry

_REGISTRY = {
    "soft_target": SoftTargetKD,
    "hint": HintLoss,
    "attention": AttentionTransfer,
    "dkd": DecoupledKD,
    "logits": keras.distillation.LogitsDistillation,
    "feature": keras.distillation.FeatureDistillation,
}


def names():
    """The names `get` accepts."""
    return sorted(_REGISTRY)


def get(identifier, **kwargs):
    """Returns a distillation loss from a name, a config dict or an instance.

    Args:
        identifier: a registered name (see `names()`: `"soft_target"`, `"hint"`,
            `"attention"`, `"dkd"`, and Keras' `"logits"`, `"feature"`), a dict
            from `serialize`, or a `keras.distillation.DistillationLoss`
            (returned as is).
        **kwargs: constructor arguments when `identifier` is a name, e.g.
            `get("hint", teacher_layer_name="a", student_layer_name="b")`.

    Returns:
        A `keras.distillation.DistillationLoss`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an
            unsupported identifier type.

    Example:
        >>> get("soft_target", temperature=2.0).temperature
        2.0
    """
    if isinstance(identifier, keras.distillation.DistillationLoss):
        if kwargs:
            raise ValueError(
                f"Constructor arguments {sorted(kwargs)} given with a loss instance "
                f"{identifier!r}; pass them only with a name"
            )
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(
                f"Unknown distillation loss {identifier!r}; valid names: {names()}"
            )
        return _REGISTRY[key](**kwargs)
    raise ValueError(
        "A distillation loss must be a name, a config dict or a "
        f"keras.distillation.DistillationLoss; received {identifier!r} of type "
        f"{type(identifier).__name__}"
    )


def serialize(loss):
    """Serializes a distillation loss with `keras.saving.serialize_keras_object`."""
    return keras.saving.serialize_keras_object(loss)


def deserialize(config):
    """Inverse of `serialize`."""
    return keras.saving.deserialize_keras_object(config)
