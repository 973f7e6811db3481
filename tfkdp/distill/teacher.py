"""Teacher loading: a model, a `.keras`/`.h5` file or a SavedModel folder.

The caller's teacher model is never mutated: `Distiller` freezes a view of it
(see `tfkdp.distill.distiller`).
"""

import os

import keras

__all__ = ["load_teacher"]

_SAVEDMODEL_ENDPOINTS = ("serve", "serving_default")


def load_teacher(teacher, input_shape=None, input_dtype="float32"):
    """Returns a teacher `keras.Model` from a model or a path.

    Args:
        teacher: a `keras.Model`; a `.keras` or `.h5` file (loaded with
            `keras.saving.load_model(compile=False)`); or a SavedModel directory,
            wrapped in `keras.layers.TFSMLayer` (inference only; no intermediate
            layers, so only logit losses can use it).
        input_shape: input shape without the batch axis; needed for a SavedModel.
        input_dtype: input dtype for a SavedModel teacher.

    Returns:
        A `keras.Model`.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: for any other type, an unsupported file, or a SavedModel with
            no usable endpoint or more than one output.
    """
    if isinstance(teacher, keras.Model):
        return teacher
    if not isinstance(teacher, (str, os.PathLike)):
        raise ValueError(
            "teacher must be a keras.Model or a path to a .keras/.h5 file or a SavedModel "
            f"directory; received {teacher!r} of type {type(teacher).__name__}"
        )
    path = os.fspath(teacher)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Teacher path {path!r} does not exist; expected a .keras/.h5 file or a "
            "SavedModel directory"
        )
    if os.path.isfile(path) and path.endswith((".keras", ".h5")):
        model = keras.saving.load_model(path, compile=False)
        if not isinstance(model, keras.Model):
            raise ValueError(f"Teacher file {path!r} holds a {type(model).__name__}, not a Model")
        return model
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        if input_shape is None:
            raise ValueError(
                f"A SavedModel teacher ({path!r}) needs the student's input shape; the "
                "student must be a built Functional or Sequential model"
            )
        layer, last_error = None, None
        for endpoint in _SAVEDMODEL_ENDPOINTS:
            try:
                layer = keras.layers.TFSMLayer(
                    path, call_endpoint=endpoint, trainable=False, name="teacher_savedmodel"
                )
                break
            except ValueError as error:
                last_error = error
        if layer is None:
            raise ValueError(
                f"SavedModel {path!r} has none of the endpoints {_SAVEDMODEL_ENDPOINTS}: "
                f"{last_error}"
            )
        inputs = keras.Input(shape=tuple(input_shape), dtype=input_dtype, name="teacher_input")
        outputs = layer(inputs)
        flat = keras.tree.flatten(outputs)
        if len(flat) != 1:
            keys = sorted(outputs) if isinstance(outputs, dict) else len(flat)
            raise ValueError(
                f"A SavedModel teacher must have a single output (the logits); {path!r} "
                f"returns {keys}"
            )
        return keras.Model(inputs, flat[0], name="teacher")
    raise ValueError(
        f"Teacher path {path!r} is neither a .keras/.h5 file nor a SavedModel directory "
        "(a folder with saved_model.pb)"
    )
