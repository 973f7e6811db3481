"""tfkdp: knowledge distillation with structured channel pruning for Keras 3.

Importing tfkdp has no global side effects: no environment variables, no
mixed-precision policy, no device settings.
"""

from tfkdp import data, metrics, models, runtime
from tfkdp.metrics import count_macs, count_params
from tfkdp.version import __version__

__all__ = [
    "__version__",
    "count_macs",
    "count_params",
    "data",
    "metrics",
    "models",
    "runtime",
]
