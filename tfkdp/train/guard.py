"""The non-finite guard: stop on NaN/inf, restore the last good weights, raise."""

import keras
import numpy as np

__all__ = ["NonFiniteLossError", "NonFiniteGuard"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good weights were restored."""


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops on a non-finite loss, restores the last good weights, and raises.

    `keras.callbacks.TerminateOnNaN` only stops; the weights it leaves are the
    broken ones. This callback snapshots `variables` at the start of training
    and at every epoch end whose loss is finite, and on a non-finite batch loss
    writes the snapshot back and raises `NonFiniteLossError`.

    Args:
        variables: the variables to protect (e.g. `student.weights` plus ADMM state).
        phase: a name for the error message.
    """

    def __init__(self, variables, phase="training"):
        super().__init__()
        self._variables = list(variables)
        self._phase = phase
        self._snapshot = None
        self._snapshot_epoch = None

    def _take(self, epoch):
        self._snapshot = [np.array(keras.ops.convert_to_numpy(v)) for v in self._variables]
        self._snapshot_epoch = epoch

    def on_train_begin(self, logs=None):
        self._take("start")

    def on_epoch_end(self, epoch, logs=None):
        if _finite((logs or {}).get("loss")):
            self._take(epoch + 1)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or _finite(loss):
            return
        for variable, value in zip(self._variables, self._snapshot, strict=True):
            variable.assign(value)
        if self.model is not None:
            self.model.stop_training = True
        where = "the start" if self._snapshot_epoch == "start" else f"epoch {self._snapshot_epoch}"
        raise NonFiniteLossError(
            f"{self._phase}: the loss became {float(keras.ops.convert_to_numpy(loss))} at batch "
            f"{batch}; weights restored to {where}. Lower the learning rate or rho, or check "
            "the data for NaN/inf"
        )


def _finite(value):
    if value is None:
        return True
    return bool(np.all(np.isfinite(keras.ops.convert_to_numpy(value))))
