"""Compression recipes on one method layer (`Method`, registry, `Budget`).

- `kdp`: ADMM knowledge distillation with pruning; `prune_only` and
  `kd_only`: its baselines (`tfkdp.methods.kdp`).
- `ddsl`, `mskd`, `pdc`, `cascade`: the recipes of the seed papers.
- `weight`: weight (unstructured) pruning with KD (`tfkdp.methods.weight`).

Third parties register their own `Method` subclasses with `register`.
"""

# kdp first: it and its baselines lead names(); the other recipes follow.
from tfkdp.methods import kdp  # noqa: I001
from tfkdp.methods import ddsl, mskd, pdc, weight, cascade
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
    "cascade",
    "ddsl",
    "kdp",
    "mskd",
    "pdc",
    "weight",
]
