"""`Distiller`: a Keras 3 model that trains a student from a frozen teacher.

Differences from `keras.distillation.Distiller`, whose signature it follows:

- The objective keeps what Keras guarantees: the student's `model.losses`
  (regularizers) and `sample_weight` (also passed to the distillation losses).
- Loss weights live in non-trainable variables (`student_loss_weight`,
  `distillation_loss_weights`, `sparsity_weight`) so a callback or a
  controller can change them between steps without retracing.
- A sparsity term supplied by a pruner (e.g. an ADMM penalty) is added and its
  `on_train_step_end` hook runs inside the compiled step.
- The teacher may be a path (`.keras`/`.h5`, or a SavedModel directory).
- Training state round-trips through `.weights.h5` (`save_training_state` /
  `load_training_state`, or `keras.callbacks.BackupAndRestore`).

Why one module of ~700 lines: it is one class, a `keras.Model` whose
construction checks, train/test steps, per-term API, state and config belong
together; teacher loading lives in `tfkdp.distill.teacher` and the losses in
`tfkdp.distill.losses`.
"""

import copy
import inspect
import math
import os
import tempfile

import keras
import tensorflow as tf
from absl import logging
from keras import ops

from tfkdp.distill import losses as losses_lib
from tfkdp.distill.teacher import load_teacher
from tfkdp.train import runtime

__all__ = ["Distiller", "load_teacher"]

_FINAL = "final_output"
def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0; received {name}={value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; received {name}={value!r}")
    return float(value)


def _layer_names(loss, role):
    """(names, is_list) of the features `loss` wants from `role` ('teacher'/'student')."""
    names = getattr(loss, f"{role}_layer_names", None)
    if names is not None:
        return list(names), True
    name = getattr(loss, f"{role}_layer_name", None)
    return ([name] if name else []), False


def _accepted_kwargs(loss):
    """Which of y_true/sample_weight `loss.compute_loss` accepts (users' losses may not)."""
    try:
        params = inspect.signature(loss.compute_loss).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"y_true", "sample_weight"})
    return frozenset({"y_true", "sample_weight"} & set(params))


def _feature_extractor(model, layer_names, role):
    """One multi-output model (final output + named layers), built once."""
    if not layer_names:
        return None
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"Feature losses need a Functional or Sequential {role}; model {model.name!r} "
            "has no symbolic inputs (subclassed or not built)"
        )
    outputs = {_FINAL: model.output}
    for name in layer_names:
        outputs[name] = losses_lib.get_layer_or_raise(model, name, role).output
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def _replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _shapes_compatible(a, b):
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


@keras.saving.register_keras_serializable(package="tfkdp")
class Distiller(keras.Model):
    """Trains `student` from a frozen `teacher` with task, distillation and sparsity terms.

    The training objective is

        loss = w_task * task(y, student(x))              # compiled `loss`, sample-weighted
             + sum_i w_i * distill_i(teacher, student)   # each sample-weighted
             + w_sparsity * sparsity()                   # e.g. ADMM penalty; 0 without
             + sum(student.losses)                        # regularizers, add_loss

    All `w` are non-trainable float32 variables, exposed as
    `student_loss_weight`, `distillation_loss_weights` (a list) and
    `sparsity_weight`; assign them from a callback (`v.assign(0.3)`) and the
    compiled step picks the new value up without retracing.

    Unlike `keras.distillation.Distiller` (`w_task * task + (1 - w_task) *
    sum_i w_i * distill_i`), the distillation weights are not multiplied by
    `1 - w_task`; to keep Keras' default behaviour, `distillation_loss_weights=None`
    sets every `w_i = 1 - student_loss_weight`.

    Teacher features for feature losses come from one multi-output model built
    at construction; the student's features and logits come from a single
    forward pass. The teachers are frozen without being changed: the distiller
    does not track them, so their variables are neither trained nor saved with
    the distiller, and the models passed in keep their `trainable` flag. They
    are always called with `training=False`. `distiller(x)` returns `student(x)`; `predict` predicts
    with the student.

    Metrics (History, TensorBoard): `loss`; the compiled student metrics;
    `student_loss` (unweighted task loss; 0 when `y` is absent);
    `distillation_loss` (`sum_i w_i * distill_i`); `distillation_loss_<i>`
    (unweighted term `i`, in the order of `distillation_losses`);
    `sparsity_loss` (unweighted, reported as 0 when `sparsity=None`);
    `regularization_loss` (`sum(student.losses)`). Validation adds `val_`.

    Args:
        teacher: a trained `keras.Model`, or a path: `.keras`/`.h5`, or a
            SavedModel directory (inference-only `TFSMLayer`; logit losses
            only); or a list of them (several teachers, see `loss_teachers`).
        student: the `keras.Model` to train (Functional/Sequential when feature
            losses are used). Saved alone with `distiller.student.save(...)`.
        distillation_losses: a `keras.distillation.DistillationLoss`, a name
            known to `tfkdp.losses.get`, or a list of them. `None` means
            `[SoftTargetKD(temperature=4.0)]`.
        distillation_loss_weights: one number >= 0 per loss, or `None` (each
            `1 - student_loss_weight`, which then must be <= 1).
        student_loss_weight: weight of the task loss, >= 0. Defaults to 0.5.
        sparsity: `None` or an object (e.g. a `keras.layers.Layer`) whose call
            `sparsity()` returns a scalar penalty computed from student
            variables; it is evaluated under the gradient tape of each step. An
            optional `sparsity.on_train_step_end(iterations)` runs inside the
            compiled train step right after the optimizer update with
            `optimizer.iterations` (so it works with `steps_per_execution > 1`).
            An optional `sparsity.transform_gradients(gradients, variables)`
            returns the gradients the optimizer applies (e.g. Centripetal SGD's
            cluster-averaged gradients); it runs in the compiled step after
            the tape, on the summed-over-replicas gradients' local share.
            Under `tf.distribute` it runs in replica context: create the
            variables it assigns with `aggregation="only_first_replica"`. A
            Layer's variables are tracked and checkpointed; a plain object's
            `variables` attribute, if any, is tracked.
        sparsity_weight: weight of the sparsity term, >= 0. Defaults to 1.0.
        loss_teachers: with several teachers (`teacher` a list), the teacher
            index of each distillation loss; `None` pairs loss `i` with
            teacher `i` when their counts match (one teacher: all losses).
        allow_shared_variables: allow a teacher that shares variables with
            the student (teaching assistants that share the student's
            kernels); the shared variables are trained through the student
            and the teacher's outputs are never differentiated.
        name: model name.
        **kwargs: passed to `keras.Model`.

    Raises:
        ValueError: for a bad teacher/student (not a model, the same model,
            shared weights, incompatible input shapes), bad losses or weights,
            or a loss that does not fit the models (unknown layer names are
            listed with candidates; shape mismatches name both shapes).
        FileNotFoundError: for a teacher path that does not exist.

    Example:
        >>> teacher = tfkdp.models.resnet_cifar(14, input_shape=(12, 12, 1), num_classes=3)  # trained
        >>> student = tfkdp.models.resnet_cifar(8, input_shape=(12, 12, 1), num_classes=3)
        >>> distiller = tfkdp.Distiller(
        ...     teacher, student,
        ...     distillation_losses=[tfkdp.losses.SoftTargetKD(4.0),
        ...                          tfkdp.losses.HintLoss("stage2_block1_out",
        ...                                                "stage2_block1_out")],
        ...     distillation_loss_weights=[0.5, 1.0])
        >>> distiller.compile(
        ...     optimizer="adam",
        ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...     metrics=["accuracy"])
        >>> history = distiller.fit(train_ds, validation_data=val_ds, epochs=2, verbose=0)
        >>> distiller.student.save(tmp + "/student.keras")

    Reference:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
        NIPS Deep Learning Workshop 2015.
    """

    def __init__(
        self,
        teacher,
        student,
        distillation_losses=None,
        distillation_loss_weights=None,
        student_loss_weight=0.5,
        sparsity=None,
        sparsity_weight=1.0,
        loss_teachers=None,
        allow_shared_variables=False,
        name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if not isinstance(student, keras.Model):
            raise ValueError(
                f"student must be a keras.Model; received {student!r} of type "
                f"{type(student).__name__}"
            )
        student_inputs = getattr(student, "inputs", None)
        input_shape = input_dtype = None
        if student_inputs and len(student_inputs) == 1:
            input_shape = tuple(student_inputs[0].shape[1:])
            input_dtype = student_inputs[0].dtype
        several = isinstance(teacher, (list, tuple))
        if several and not teacher:
            raise ValueError("teacher must be a model, a path or a non-empty list of them")
        teachers = [
            load_teacher(t, input_shape=input_shape, input_dtype=input_dtype or "float32")
            for t in (teacher if several else [teacher])
        ]  # fmt: skip
        for t in teachers:
            self._validate_pair(t, student, allow_shared_variables)

        student_loss_weight = _check_weight("student_loss_weight", student_loss_weight)
        sparsity_weight = _check_weight("sparsity_weight", sparsity_weight)
        loss_objects = self._standardize_losses(distillation_losses)
        weights = self._standardize_loss_weights(
            distillation_loss_weights, len(loss_objects), student_loss_weight
        )
        loss_teachers = self._standardize_loss_teachers(loss_teachers, len(loss_objects), len(teachers))
        if sparsity is not None and not callable(sparsity):
            raise ValueError(
                "sparsity must be None or a callable object returning a scalar penalty; "
                f"received {sparsity!r} of type {type(sparsity).__name__}"
            )

        for loss, j in zip(loss_objects, loss_teachers, strict=True):
            loss.validate_model_compatibility(teachers[j], student)

        teacher_names = [[] for _ in teachers]
        student_names = []
        self._feature_keys = []
        for loss, j in zip(loss_objects, loss_teachers, strict=True):
            t_names, t_list = _layer_names(loss, "teacher")
            s_names, s_list = _layer_names(loss, "student")
            teacher_names[j] += [n for n in t_names if n not in teacher_names[j]]
            student_names += [n for n in s_names if n not in student_names]
            self._feature_keys.append(
                (j, t_names if t_list else (t_names[0] if t_names else _FINAL),
                 s_names if s_list else (s_names[0] if s_names else _FINAL))
            )  # fmt: skip
        self._loss_kwargs = [_accepted_kwargs(loss) for loss in loss_objects]
        self.loss_teachers = loss_teachers
        self._allow_shared = bool(allow_shared_variables)

        # The teachers are frozen by not being tracked: their variables are neither
        # trainable nor saved by the distiller, and the caller's models are left as
        # they are (`trainable` untouched). Variables a teacher shares with the student
        # (teaching assistants) are tracked, and trained, through the student.
        object.__setattr__(self, "teachers", teachers)
        object.__setattr__(self, "teacher_features_list", [
            _feature_extractor(t, names, "teacher") for t, names in zip(teachers, teacher_names, strict=True)
        ])  # fmt: skip
        self.student = student
        self.student_features = _feature_extractor(student, student_names, "student")
        self.distillation_losses = loss_objects
        # Connectors are trained with the student and saved in the training state.
        self.connectors = [c for loss in loss_objects for c in getattr(loss, "connectors", ())]
        self._validate_symbolic_outputs()

        # Weights live in variables so that callbacks/controllers may assign them between
        # steps; "only_first_replica" lets in-step (replica context) updates work too.
        def weight_variable(value, var_name):
            return keras.Variable(
                value, dtype="float32", trainable=False, name=var_name,
                aggregation="only_first_replica",
            )  # fmt: skip

        self.student_loss_weight = weight_variable(student_loss_weight, "student_loss_weight")
        self.distillation_loss_weights = [
            weight_variable(w, f"distillation_loss_weight_{i}") for i, w in enumerate(weights)
        ]
        self.sparsity_weight = weight_variable(sparsity_weight, "sparsity_weight")

        self.sparsity = sparsity
        if sparsity is not None and not isinstance(sparsity, keras.layers.Layer):
            # Plain objects are not tracked by Keras; track their state explicitly so
            # checkpoints carry it.
            self.sparsity_variables = list(getattr(sparsity, "variables", ()) or ())
        self._sparsity_step_end = getattr(sparsity, "on_train_step_end", None)
        self._sparsity_transform = getattr(sparsity, "transform_gradients", None)

        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        self.distillation_term_trackers = [
            keras.metrics.Mean(name=f"distillation_loss_{i}") for i in range(len(loss_objects))
        ]
        self.sparsity_loss_tracker = keras.metrics.Mean(name="sparsity_loss")
        self.regularization_loss_tracker = keras.metrics.Mean(name="regularization_loss")
        if all(t.built for t in teachers) and student.built:
            self.built = True

    @property
    def teacher(self):
        """The (first) teacher model, as passed (not modified by the distiller)."""
        return self.teachers[0]

    @property
    def teacher_features(self):
        """The first teacher's feature extractor (None when no feature loss uses it)."""
        return self.teacher_features_list[0]

    # ----------------------------------------------------------------- validation

    @staticmethod
    def _validate_pair(teacher, student, allow_shared_variables=False):
        if teacher is student:
            raise ValueError(
                f"teacher and student are the same model ({student.name!r}); distilling a "
                "model into itself teaches nothing. Pass a separate student (e.g. "
                "keras.models.clone_model(teacher))"
            )
        student_ids = {id(v) for v in student.weights}
        shared = [v.path for v in teacher.weights if id(v) in student_ids]
        if shared and not allow_shared_variables:
            raise ValueError(
                f"teacher {teacher.name!r} and student {student.name!r} share {len(shared)} "
                f"variables (e.g. {shared[:3]}); training the student would move the teacher "
                "too. Clone the student (keras.models.clone_model), or pass "
                "allow_shared_variables=True when that is the point (teaching assistants "
                "that share the student's kernels)"
            )
        t_inputs = getattr(teacher, "inputs", None)
        s_inputs = getattr(student, "inputs", None)
        if t_inputs and s_inputs:
            t_shapes = [tuple(t.shape) for t in t_inputs]
            s_shapes = [tuple(s.shape) for s in s_inputs]
            if len(t_shapes) != len(s_shapes) or not all(
                _shapes_compatible(a, b) for a, b in zip(t_shapes, s_shapes, strict=True)
            ):
                raise ValueError(
                    "teacher and student must take the same inputs: teacher input shapes "
                    f"{t_shapes}, student input shapes {s_shapes}"
                )

    @staticmethod
    def _standardize_loss_teachers(loss_teachers, count, num_teachers):
        if loss_teachers is None:
            if num_teachers == 1:
                return [0] * count
            if num_teachers == count:
                return list(range(count))
            raise ValueError(
                f"{num_teachers} teachers and {count} distillation losses: pass loss_teachers, "
                "the teacher index of each loss"
            )
        if not isinstance(loss_teachers, (list, tuple)) or len(loss_teachers) != count:
            raise ValueError(
                f"loss_teachers must be a list of {count} teacher indices (one per distillation "
                f"loss); received loss_teachers={loss_teachers!r}"
            )
        for i, j in enumerate(loss_teachers):
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < num_teachers:
                raise ValueError(
                    f"loss_teachers[{i}] must be a teacher index in [0, {num_teachers}); "
                    f"received {j!r}"
                )
        return list(loss_teachers)

    @staticmethod
    def _standardize_losses(distillation_losses):
        if distillation_losses is None:
            return [losses_lib.SoftTargetKD(temperature=4.0)]
        if not isinstance(distillation_losses, (list, tuple)):
            distillation_losses = [distillation_losses]
        if not distillation_losses:
            raise ValueError(
                "distillation_losses must not be empty; pass None for the default "
                "SoftTargetKD(temperature=4.0)"
            )
        return [losses_lib.get(loss) for loss in distillation_losses]

    @staticmethod
    def _standardize_loss_weights(weights, count, student_loss_weight):
        if weights is None:
            if student_loss_weight > 1.0:
                raise ValueError(
                    "distillation_loss_weights=None means 1 - student_loss_weight for each "
                    f"loss, which needs student_loss_weight <= 1; received "
                    f"student_loss_weight={student_loss_weight}. Pass distillation_loss_weights"
                )
            return [1.0 - student_loss_weight] * count
        if isinstance(weights, (int, float)) and not isinstance(weights, bool):
            weights = [weights]
        if not isinstance(weights, (list, tuple)) or len(weights) != count:
            raise ValueError(
                f"distillation_loss_weights must be a list of {count} numbers (one per "
                f"distillation loss); received distillation_loss_weights={weights!r}"
            )
        return [_check_weight(f"distillation_loss_weights[{i}]", w) for i, w in enumerate(weights)]

    def _validate_symbolic_outputs(self):
        """Runs each loss' `validate_outputs` on symbolic features once, not per step."""
        t_feats = [
            self._symbolic_features(t, f)
            for t, f in zip(self.teachers, self.teacher_features_list, strict=True)
        ]  # fmt: skip
        s_feats = self._symbolic_features(self.student, self.student_features)
        if s_feats is None:
            return
        for loss, (j, t_key, s_key) in zip(self.distillation_losses, self._feature_keys, strict=True):
            if t_feats[j] is not None:
                loss.validate_outputs(_select(t_feats[j], t_key), _select(s_feats, s_key))

    @staticmethod
    def _symbolic_features(model, extractor):
        if extractor is not None:
            return dict(extractor.output)
        outputs = getattr(model, "outputs", None)
        if not outputs:
            return None
        return {_FINAL: model.output}

    # ----------------------------------------------------------------- Keras API

    def compile(self, optimizer="adam", loss=None, metrics=None, jit_compile="auto", **kwargs):
        """Configures training; `loss` is the student's task loss.

        Args:
            optimizer: optimizer name or instance (trains student and connectors).
            loss: the task loss on `(y, student(x))`, e.g.
                `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.
                May be `None` only when `student_loss_weight` is 0 (pure
                distillation).
            metrics: student metrics, as in `keras.Model.compile`.
            jit_compile: `"auto"` (XLA on GPU only, see
                `tfkdp.train.runtime.default_jit_compile`), `True` or `False`.
            **kwargs: passed to `keras.Model.compile` (`steps_per_execution`,
                `weighted_metrics`, `loss_weights`, `run_eagerly`, ...).

        Raises:
            ValueError: if `loss` is None while `student_loss_weight` is not 0,
                or for a bad `jit_compile`.
        """
        weight = float(ops.convert_to_numpy(self.student_loss_weight))
        if loss is None and weight != 0.0:
            raise ValueError(
                f"loss (the student's task loss) is None but student_loss_weight={weight}; "
                "pass e.g. loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), "
                "or set student_loss_weight=0.0 for pure distillation"
            )
        super().compile(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            jit_compile=runtime.default_jit_compile(jit_compile),
            **kwargs,
        )

    def call(self, inputs, training=None):
        """Returns `student(inputs)`."""
        return self.student(inputs, training=training)

    def _forward(self, x, training, y_pred=None):
        """(y_pred, student features, teacher features) from one pass of each model."""
        if self.student_features is not None:
            s_feats = self.student_features(x, training=training)
            y_pred = s_feats[_FINAL]
        else:
            if y_pred is None:
                y_pred = self.student(x, training=training)
            s_feats = {_FINAL: y_pred}
        t_feats = []
        used = set(self.loss_teachers)
        for j, (teacher, extractor) in enumerate(
            zip(self.teachers, self.teacher_features_list, strict=True)
        ):
            if j not in used:
                t_feats.append(None)
            elif extractor is not None:
                t_feats.append(extractor(x, training=False))
            else:
                t_feats.append({_FINAL: teacher(x, training=False)})
        t_feats = keras.tree.map_structure(ops.stop_gradient, t_feats)
        return y_pred, s_feats, t_feats

    def _objective(self, x, y, y_pred, s_feats, t_feats, sample_weight):
        """Total loss and its terms, in global (not per-replica-scaled) units."""
        zero = ops.zeros((), "float32")
        task = zero
        if self._compile_loss is not None and y is not None:
            task = self._compile_loss(y, y_pred, sample_weight)
            # Keras' losses divide by the replica count; undo it so every term is in the
            # same units and the total is scaled once below.
            task = ops.cast(task, "float32") * float(_replicas())

        terms = []
        weighted_sum = zero
        for i, loss in enumerate(self.distillation_losses):
            j, t_key, s_key = self._feature_keys[i]
            kwargs = {}
            if "y_true" in self._loss_kwargs[i]:
                kwargs["y_true"] = y
            if "sample_weight" in self._loss_kwargs[i]:
                kwargs["sample_weight"] = sample_weight
            value = loss.compute_loss(_select(t_feats[j], t_key), _select(s_feats, s_key), **kwargs)
            value = ops.cast(value, "float32")
            if len(value.shape) != 0:
                raise ValueError(
                    f"{type(loss).__name__}.compute_loss must return a scalar; returned "
                    f"shape {tuple(value.shape)}"
                )
            terms.append(value)
            weighted_sum = weighted_sum + self.distillation_loss_weights[i] * value

        sparsity = zero
        if self.sparsity is not None:
            sparsity = ops.cast(self.sparsity(), "float32")
        student_losses = self.student.losses
        regularization = zero
        for value in student_losses:
            regularization = regularization + ops.cast(ops.sum(value), "float32")
        total = (
            self.student_loss_weight * task
            + weighted_sum
            + self.sparsity_weight * sparsity
            + regularization
        )
        return total, {
            "task": task,
            "distillation": weighted_sum,
            "terms": terms,
            "sparsity": sparsity,
            "regularization": regularization,
        }

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The total objective for one batch, scaled per replica as Keras' losses are.

        Recomputes student features when feature losses need them (use
        `train_step`/`test_step` for the single-pass path).
        """
        y_pred, s_feats, t_feats = self._forward(x, training, y_pred=y_pred)
        total, _ = self._objective(x, y, y_pred, s_feats, t_feats, sample_weight)
        return total / float(_replicas())

    def compute_terms(self, x, y=None, sample_weight=None, training=False):
        """Every term of the objective for one batch, unweighted, for a controller.

        A controller (a meta-learned dean, a loss-weight schedule) takes the
        terms and, under its own `tf.GradientTape`, their gradients with
        respect to any variables; the weights it sets live in
        `student_loss_weight`, `distillation_loss_weights` and
        `sparsity_weight`.

        Args:
            x: a batch of inputs.
            y: its labels, or None (the task term is then 0).
            sample_weight: optional per-sample weights.
            training: the mode the student runs in (the teachers always run
                with `training=False`).

        Returns:
            A dict of float32 scalars: `task` (the compiled loss),
            `distill_<i>` (distillation loss `i`), `sparsity`,
            `regularization` (`sum(student.losses)`), and `total` (the
            weighted objective, global units). Call `compile` first when `y`
            is given.

        Example:
            >>> distiller = tfkdp.Distiller(teacher, student)
            >>> with tf.GradientTape() as tape:
            ...     terms = distiller.compute_terms(x, y)
            >>> grads = tape.gradient(terms["distill_0"], student.trainable_variables)
            >>> sorted(terms)
            ['distill_0', 'regularization', 'sparsity', 'task', 'total']
        """
        y_pred, s_feats, t_feats = self._forward(x, training)
        total, parts = self._objective(x, y, y_pred, s_feats, t_feats, sample_weight)
        terms = {"task": parts["task"]}
        for i, value in enumerate(parts["terms"]):
            terms[f"distill_{i}"] = value
        terms["sparsity"] = parts["sparsity"]
        terms["regularization"] = parts["regularization"]
        terms["total"] = total
        return terms

    def _update_trackers(self, x, total, parts):
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(total, sample_weight=batch)
        self.student_loss_tracker.update_state(parts["task"], sample_weight=batch)
        self.distillation_loss_tracker.update_state(parts["distillation"], sample_weight=batch)
        for tracker, value in zip(self.distillation_term_trackers, parts["terms"], strict=True):
            tracker.update_state(value, sample_weight=batch)
        self.sparsity_loss_tracker.update_state(parts["sparsity"], sample_weight=batch)
        self.regularization_loss_tracker.update_state(parts["regularization"], sample_weight=batch)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred, s_feats, t_feats = self._forward(x, training=True)
            total, parts = self._objective(x, y, y_pred, s_feats, t_feats, sample_weight)
            self._update_trackers(x, total, parts)
            # Gradients are summed over replicas, so each replica minimises its share.
            scaled = self.optimizer.scale_loss(total / float(_replicas()))
        trainable = self.trainable_weights
        gradients = tape.gradient(scaled, trainable)
        if self._sparsity_transform is not None:
            gradients = list(self._sparsity_transform(list(gradients), trainable))
        self.optimizer.apply_gradients(zip(gradients, trainable, strict=True))
        if self._sparsity_step_end is not None:
            self._sparsity_step_end(self.optimizer.iterations)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, s_feats, t_feats = self._forward(x, training=False)
        total, parts = self._objective(x, y, y_pred, s_feats, t_feats, sample_weight)
        self._update_trackers(x, total, parts)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Unlabelled batches (pure distillation) have no student metrics to update.
        if y is None:
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_metrics_result(self):
        results = {}
        for metric in self.metrics:
            if metric is self._compile_metrics and not metric.built:
                continue  # only unlabelled batches so far: nothing to report
            result = metric.result()
            results.update(result if isinstance(result, dict) else {metric.name: result})
        return results

    # ----------------------------------------------------------------- state

    def _ensure_optimizer_built(self):
        if getattr(self, "optimizer", None) is None:
            raise ValueError("Call compile() before saving or loading the training state")
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def save_training_state(self, filepath):
        """Writes student, connectors, optimizer, loss weights and sparsity state.

        The file is a Keras `.weights.h5` (the teachers are not in it: they are not trained);
        it is written to a temporary file in the same folder and then moved into
        place, so an interrupted save never leaves a half-written file.
        `keras.callbacks.BackupAndRestore` works with the Distiller as well.

        Args:
            filepath: path ending in `.weights.h5`.

        Raises:
            ValueError: for another suffix, or before `compile()`.
        """
        filepath = os.fspath(filepath)
        if not filepath.endswith(".weights.h5"):
            raise ValueError(f"filepath must end in .weights.h5; received filepath={filepath!r}")
        self._ensure_optimizer_built()
        folder = os.path.dirname(os.path.abspath(filepath))
        fd, tmp_path = tempfile.mkstemp(suffix=".weights.h5", dir=folder)
        os.close(fd)
        try:
            self.save_weights(tmp_path, overwrite=True)
            os.replace(tmp_path, filepath)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        logging.info("Saved distiller training state to %s", filepath)

    def load_training_state(self, filepath):
        """Restores what `save_training_state` wrote (compile first).

        Continue with `fit(..., initial_epoch=...)`; `optimizer.iterations` is
        restored, so step-based schedules resume where they stopped.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: before `compile()`, or if the file does not match.
        """
        filepath = os.fspath(filepath)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"No training state at {filepath!r}")
        self._ensure_optimizer_built()
        self.load_weights(filepath)

    def get_config(self):
        if self.sparsity is not None and not hasattr(self.sparsity, "get_config"):
            raise NotImplementedError(
                f"Distiller.get_config: the sparsity object of type "
                f"{type(self.sparsity).__name__} has no get_config"
            )
        teachers = [keras.saving.serialize_keras_object(t) for t in self.teachers]
        config = {
            "name": self.name,
            "teacher": teachers[0] if len(teachers) == 1 else teachers,
            "student": keras.saving.serialize_keras_object(self.student),
            "distillation_losses": [
                keras.saving.serialize_keras_object(loss) for loss in self.distillation_losses
            ],
            "distillation_loss_weights": [
                float(ops.convert_to_numpy(w)) for w in self.distillation_loss_weights
            ],
            "student_loss_weight": float(ops.convert_to_numpy(self.student_loss_weight)),
            "sparsity": (
                None if self.sparsity is None
                else keras.saving.serialize_keras_object(self.sparsity)
            ),
            "sparsity_weight": float(ops.convert_to_numpy(self.sparsity_weight)),
            "loss_teachers": list(self.loss_teachers),
            "allow_shared_variables": self._allow_shared,
        }  # fmt: skip
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization edits nested configs in place
        teacher = config["teacher"]
        if isinstance(teacher, list):
            config["teacher"] = [keras.saving.deserialize_keras_object(t) for t in teacher]
        else:
            config["teacher"] = keras.saving.deserialize_keras_object(teacher)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        sparsity = config.get("sparsity")
        if sparsity is not None:
            # A term built on the student (ADMM) is re-created on the new student.
            cls_ = keras.saving.get_registered_object(sparsity.get("registered_name"))
            if cls_ is not None and hasattr(cls_, "from_student_config"):
                config["sparsity"] = cls_.from_student_config(config["student"], sparsity["config"])
            else:
                config["sparsity"] = keras.saving.deserialize_keras_object(sparsity)
        config["distillation_losses"] = [
            keras.saving.deserialize_keras_object(loss) for loss in config["distillation_losses"]
        ]
        return cls(**config)


def _select(features, key):
    if isinstance(key, list):
        return [features[k] for k in key]
    return features[key]
