"""metajax: gradient-based meta-learning in JAX."""

from metajax.algorithms import MetaLearner, maml, reptile
from metajax.inner import adapt, adapt_trace, mask_by_path
from metajax.types import Task

__version__ = "0.1.0"

__all__ = ["MetaLearner", "Task", "adapt", "adapt_trace", "maml", "mask_by_path", "reptile"]
