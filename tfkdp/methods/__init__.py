"""Compression recipes on one method layer (`Method`, registry, `Budget`).

- `kdp`: ADMM knowledge distillation with pruning; `prune_only` and
  `kd_only`: its baselines (`tfkdp.methods.kdp`).

Third parties register their own `Method` subclasses with `register`.
"""

from tfkdp.methods import kdp
from tfkdp.methods.base import (
    Budget,
    CompressionResult,
    Method,
    Pruned,
    get,
    names,
    register,
)

__all__ = [
    "Budget",
    "CompressionResult",
    "Method",
    "Pruned",
    "get",
    "names",
    "register",
    "kdp",
]
