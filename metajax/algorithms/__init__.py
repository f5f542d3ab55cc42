"""Meta-learning algorithms, one per file, all of the :class:`MetaLearner` shape."""

from metajax.algorithms._base import MetaLearner, make_meta_learner, mean_over_tasks
from metajax.algorithms.anil import anil
from metajax.algorithms.imaml import imaml
from metajax.algorithms.maml import maml
from metajax.algorithms.mamlpp import mamlpp, mamlpp_weights
from metajax.algorithms.meta_sgd import meta_sgd
from metajax.algorithms.pretrain import pretrain
from metajax.algorithms.proto_maml import (
    head_logits,
    proto_maml,
    proto_maml_logits,
    prototype_head,
)
from metajax.algorithms.protonets import (
    Prototypes,
    centered_cosine,
    protonet_logits,
    protonets,
    squared_euclidean,
)
from metajax.algorithms.reptile import reptile

__all__ = [
    "MetaLearner",
    "Prototypes",
    "anil",
    "centered_cosine",
    "head_logits",
    "imaml",
    "maml",
    "make_meta_learner",
    "mamlpp",
    "mamlpp_weights",
    "mean_over_tasks",
    "meta_sgd",
    "pretrain",
    "proto_maml",
    "proto_maml_logits",
    "prototype_head",
    "protonet_logits",
    "protonets",
    "reptile",
    "squared_euclidean",
]
