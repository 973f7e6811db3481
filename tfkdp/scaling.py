"""Input scaling: how pixel values in [0, 255] become what a model expects.

One registry (`get(name)`, `names()`, `register`) of `InputScaling` objects,
used for training, verification, int8 calibration and latency inputs alike
(`tfkdp.batching.preprocess`), and a Keras layer (`ScaleInputs`) that bakes a
scaling into an exported model so a device feeds raw 0–255 images
(`with_scaling`, `tfkdp.export.export_model(..., bake_scaling=...)`).

Built in (the conventions of `keras.applications`' `preprocess_input`):

| name | maps a pixel p in [0, 255] to | for |
|---|---|---|
| `unit` | p / 255, in [0, 1] (the default) | tfkdp's zoo |
| `raw` | p, as float (0–255) | models that rescale inside (EfficientNet, MobileNetV3) |
| `symmetric` | p / 127.5 − 1, in [−1, 1] | MobileNetV2 (Keras' `"tf"` mode) |
| `caffe` | BGR order, p − ImageNet mean (103.939, 116.779, 123.68 for B, G, R) | ResNet50 (`"caffe"`) |
| `torch` | (p / 255 − mean) / std, ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) | torchvision-style (`"torch"`; DenseNet) |

Grayscale (1-channel) images with `caffe` or `torch` use the mean of the
three channel means (and of the three stds): 114.799 for `caffe`, mean
0.449 and std 0.226 for `torch`; there is no channel order to reverse. Other
channel counts than 1 and 3 are refused by the per-channel scalings.

Reference: ImageNet channel statistics as in Keras'
`keras.applications.imagenet_utils.preprocess_input` (modes `tf`, `caffe`,
`torch`) and torchvision's `transforms.Normalize` for ImageNet models.
"""

import keras
import numpy as np

__all__ = [
    "DEFAULT",
    "AffineScaling",
    "InputScaling",
    "ScaleInputs",
    "get",
    "names",
    "register",
    "with_scaling",
]

DEFAULT = "unit"


class InputScaling:
    """Base class of an input scaling: pixel values in [0, 255] to model inputs.

    Subclasses implement `__call__(pixels)` with `keras.ops` (it runs on
    numpy arrays, on tensors inside `tf.data`, and inside the `ScaleInputs`
    layer of an exported model), and register an instance with `register`.

    Attributes:
        name: the registry key (`--input_scaling` value).
    """

    name = None

    def __call__(self, pixels):
        """Scales `pixels` (float or integer, values in [0, 255], channels last) to float32."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__()")

    def from_unit(self, x):
        """Scales float images already in [0, 1] (`pixels / 255`): `self(x * 255)` by default."""
        return self(keras.ops.multiply(keras.ops.cast(x, "float32"), 255.0))

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class AffineScaling(InputScaling):
    """`(pixels[..., order] / divisor − mean) / std`, per channel.

    Args:
        name: registry key.
        divisor: pixels are divided by this first (255 → [0, 1]).
        mean, std: a scalar or 3 per-channel values (in the channel order
            after `bgr`), applied after the division. A 1-channel image uses
            the mean of the three; other channel counts are refused.
        bgr: reverse RGB to BGR first (3-channel images only).

    Example:
        >>> import numpy as np
        >>> float(get("symmetric")(np.array([[0.0, 255.0]]))[0, 1])
        1.0
    """

    def __init__(self, name, divisor=1.0, mean=0.0, std=1.0, bgr=False):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; received {name!r}")
        if not float(divisor) > 0:
            raise ValueError(f"divisor must be > 0; received divisor={divisor!r}")
        self.name = name
        self.divisor = float(divisor)
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        for label, values in (("mean", self.mean), ("std", self.std)):
            if values.size not in (1, 3):
                raise ValueError(
                    f"{label} must be a scalar or 3 per-channel values; received {label}={values}"
                )
        if np.any(self.std <= 0):
            raise ValueError(f"std must be > 0; received std={self.std}")
        self.bgr = bool(bgr)

    def constants(self, channels):
        """`(mean, std)` as float32 arrays for `channels` channels (1-channel: the mean of three).

        Raises:
            ValueError: for per-channel constants and a channel count other than 1 or 3.
        """
        out = []
        for values in (self.mean, self.std):
            if values.size == 3 and channels == 1:
                values = values.mean(keepdims=True)
            elif values.size == 3 and channels != 3:
                raise ValueError(
                    f"input scaling {self.name!r} has per-channel constants for 3 (RGB) or 1 "
                    f"(grayscale) channels; the images have {channels}"
                )
            out.append(values.astype(np.float32))
        return tuple(out)

    def _affine(self, x, divide):
        channels = int(x.shape[-1])
        mean, std = self.constants(channels)
        if self.bgr and channels == 3:
            x = keras.ops.flip(x, axis=-1)
        if divide and self.divisor != 1.0:
            x = keras.ops.divide(x, self.divisor)
        if np.any(mean != 0):
            x = keras.ops.subtract(x, mean)
        if np.any(std != 1):
            x = keras.ops.divide(x, std)
        return x

    def __call__(self, pixels):
        return self._affine(keras.ops.cast(pixels, "float32"), divide=True)

    def from_unit(self, x):
        x = keras.ops.cast(x, "float32")
        if self.divisor == 255.0:
            # x is already pixels / 255: skip the ×255 ÷255 round trip (exact for `unit`).
            return self._affine(x, divide=False)
        return super().from_unit(x)


_SCALINGS = {}


def register(scaling, override=False):
    """Adds an `InputScaling` instance to the registry under `scaling.name`; returns it.

    Raises:
        ValueError: for an object that is not an `InputScaling` with a name,
            or a name already taken (unless `override`).
    """
    if not isinstance(scaling, InputScaling) or not isinstance(scaling.name, str):
        raise ValueError(f"register takes a named InputScaling instance; received {scaling!r}")
    if scaling.name in _SCALINGS and not override:
        raise ValueError(
            f"input scaling {scaling.name!r} is already registered; pass override=True"
        )
    _SCALINGS[scaling.name] = scaling
    return scaling


def names():
    """The registered scaling names, built-ins first (`unit, raw, symmetric, caffe, torch`)."""
    return tuple(_SCALINGS)


def get(identifier):
    """The `InputScaling` named `identifier` (an `InputScaling` is returned as is).

    Raises:
        ValueError: for an unknown name, listing the valid ones.

    Example:
        >>> get("caffe").bgr
        True
    """
    if isinstance(identifier, InputScaling):
        return identifier
    if isinstance(identifier, str) and identifier in _SCALINGS:
        return _SCALINGS[identifier]
    raise ValueError(f"unknown input scaling {identifier!r}; valid names are {', '.join(names())}")


register(AffineScaling("unit", divisor=255.0))
register(AffineScaling("raw"))
register(AffineScaling("symmetric", divisor=127.5, mean=1.0))
register(AffineScaling("caffe", mean=(103.939, 116.779, 123.68), bgr=True))
register(
    AffineScaling("torch", divisor=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
)


@keras.saving.register_keras_serializable(package="tfkdp")
class ScaleInputs(keras.layers.Layer):
    """A layer applying a registered input scaling: raw 0–255 pixels in, model inputs out.

    Put in front of a model (`with_scaling`) so an exported artifact takes
    raw images. Stateless: no weights; the config holds the scaling's name.

    Args:
        scaling: a registered scaling name (see `names()`).

    Raises:
        ValueError: for an unknown scaling name (listing the valid ones).
    """

    def __init__(self, scaling=DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.scaling = get(scaling).name
        self.built = True

    def call(self, inputs):
        return get(self.scaling)(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scaling": self.scaling}


def with_scaling(model, scaling, input_name="pixels"):
    """A new model: raw pixels (float32, 0–255) → `ScaleInputs(scaling)` → `model`.

    The input model is untouched (it becomes a nested layer). Used by
    `tfkdp.export.export_model(..., bake_scaling=...)` so the artifacts take
    raw images.

    Args:
        model: a Keras model with one image input of a definite channel count.
        scaling: a name from `names()` or an `InputScaling` that is registered.
        input_name: name of the new `keras.Input` (the serving signature's input).

    Returns:
        A functional `keras.Model` with the same input shape and outputs.

    Raises:
        ValueError: for an unknown scaling, or a channel count it cannot scale.

    Example:
        >>> inner = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
        >>> baked = with_scaling(inner, "unit")
        >>> float(baked(np.full((1, 4, 4, 3), 255.0, "float32"))[0, 0])
        1.0
    """
    name = get(scaling).name
    if _SCALINGS.get(name) is not get(scaling):
        raise ValueError(f"input scaling {scaling!r} must be registered to be baked (see register)")
    if len(model.inputs) != 1:
        raise ValueError(
            f"with_scaling needs a model with one input; {model.name!r} has {len(model.inputs)}"
        )
    shape = tuple(model.inputs[0].shape[1:])
    if isinstance(get(name), AffineScaling):
        get(name).constants(int(shape[-1]))  # refuses a channel count it cannot scale, now
    pixels = keras.Input(shape, name=input_name, dtype="float32")
    return keras.Model(pixels, model(ScaleInputs(name, name=f"scale_{name}")(pixels)),
                       name=f"{model.name}_{name}_scaled")  # fmt: skip
