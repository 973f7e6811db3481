"""Reusable training phases and the pieces they share.

- `recipe`: the house supervised recipe (optimizer, LR schedule, `train_classifier`);
- `phases`: `Training` settings and the KD / fine-tune / hard-prune / BN phases;
- `guard`: `NonFiniteGuard`, `NonFiniteLossError`;
- `batchnorm`: `recalibrate_batchnorm`;
- `clone`: `copy_model` (self-compression copy);
- `runtime`: XLA and device choice, strategies (`mirrored_strategy`, `multiworker_strategy`), mixed precision, `call_once_cross_replica`, `free_ports`.
"""

from tfkdp.train import batchnorm, clone, guard, phases, recipe, runtime
from tfkdp.train.batchnorm import recalibrate_batchnorm
from tfkdp.train.clone import copy_model
from tfkdp.train.guard import NonFiniteGuard, NonFiniteLossError
from tfkdp.train.phases import Training

__all__ = [
    "batchnorm",
    "clone",
    "guard",
    "phases",
    "recipe",
    "runtime",
    "recalibrate_batchnorm",
    "copy_model",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "Training",
]
