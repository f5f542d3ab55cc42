"""Meta-learning algorithms, one per file, all of the :class:`MetaLearner` shape."""

from metajax.algorithms.base import MetaLearner
from metajax.algorithms.maml import maml
from metajax.algorithms.reptile import reptile

__all__ = ["MetaLearner", "maml", "reptile"]
