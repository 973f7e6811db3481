"""Sparsity in training: ADMM (channel projection) and schedules on tfmot's protocol.

Element-wise masks live in `tfkdp.pruning.masks` (`WeightMask`).
"""

from tfkdp.pruning.sparsity import admm, schedules
from tfkdp.pruning.sparsity.admm import ADMM

__all__ = ["admm", "schedules", "ADMM"]
