"""Compression recipes that combine distillation, criteria, budgets and surgery.

- `kdp`: ADMM knowledge distillation with pruning (and its `prune_only` and
  `kd_only` baselines through the same entry point).
"""

from tfkdp.methods import kdp

__all__ = ["kdp"]
