"""Knowledge distillation: `Distiller` (per-term API), teacher loading, KD losses."""

from tfkdp.distill import distiller, losses, teacher
from tfkdp.distill.distiller import Distiller
from tfkdp.distill.teacher import load_teacher

__all__ = ["distiller", "losses", "teacher", "Distiller", "load_teacher"]
