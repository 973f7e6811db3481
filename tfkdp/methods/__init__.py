"""Compression recipes on one method layer (`Method`, registry, `Budget`).

- `kdp`: ADMM knowledge distillation with pruning; `prune_only` and
  `kd_only`: its baselines (`tfkdp.methods.kdp`).
- `weight`: weight (unstructured) pruning with KD (`tfkdp.methods.weight`).

Third parties register their own `Method` subclasses with `register`.
"""

from tfkdp.methods import ddsl, kdp, mskd, pdc, weight
from tfkdp.methods.base import (
    Budget,
    CompressionResult,
    Method,
    Pruned,
    Recipe,
    get,
    get_class,
    names,
    register,
)

__all__ = [
    "Budget",
    "CompressionResult",
    "Method",
    "Pruned",
    "Recipe",
    "get",
    "get_class",
    "names",
    "register",
    "ddsl",
    "kdp",
    "mskd",
    "pdc",
    "weight",
]
