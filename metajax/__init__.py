"""metajax: gradient-based meta-learning in JAX."""

from metajax import parallel, predict
from metajax.algorithms import (
    MetaLearner,
    anil,
    imaml,
    maml,
    mamlpp,
    mamlpp_outer_optimizer,
    meta_sgd,
    pretrain,
    protonets,
    reptile,
)
from metajax.inner import adapt, adapt_trace, mask_by_path
from metajax.train import TrainState, evaluate, make_train_step, train_state
from metajax.types import Task

__version__ = "0.1.0"

__all__ = [
    "MetaLearner",
    "Task",
    "TrainState",
    "adapt",
    "adapt_trace",
    "anil",
    "evaluate",
    "imaml",
    "maml",
    "make_train_step",
    "mamlpp",
    "mamlpp_outer_optimizer",
    "mask_by_path",
    "meta_sgd",
    "parallel",
    "predict",
    "pretrain",
    "protonets",
    "reptile",
    "train_state",
]
