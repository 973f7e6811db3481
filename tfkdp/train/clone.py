"""The self-compression copy: a trainable copy of a (possibly frozen) teacher."""

import keras

__all__ = ["copy_model"]


def copy_model(model, name=None):
    """A trainable copy of a functional model with the same weights (self-compression)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    # A frozen source (a Distiller freezes its teacher) clones frozen, layer by layer;
    # `Model.trainable = True` does not reach the layers of a functional model.
    _unfreeze(clone)
    if name:
        clone.name = name
    return clone


def _unfreeze(model):
    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _unfreeze(layer)
        layer.trainable = True
