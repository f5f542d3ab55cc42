"""metajax: gradient-based meta-learning in JAX.

``import metajax`` gives the primitives (inner loop, algorithms, train step, parallelism);
:mod:`metajax.blocks` the pieces to write a new algorithm with.
The experiment runner lives in :mod:`metajax.run` and is imported only when asked for.
"""

from metajax import blocks, lora, parallel
from metajax.algorithms import (
    MetaLearner,
    anil,
    imaml,
    make_meta_learner,
    maml,
    mamlpp,
    mean_over_tasks,
    meta_sgd,
    pretrain,
    proto_maml,
    protonets,
    reptile,
)
from metajax.inner import adapt, adapt_trace
from metajax.paths import mask_by_path, path_str
from metajax.train import TrainState, evaluate, make_train_step, summarize, train_state
from metajax.types import Task

__version__ = "0.1.0"

__all__ = [
    "MetaLearner",
    "Task",
    "TrainState",
    "adapt",
    "adapt_trace",
    "anil",
    "blocks",
    "evaluate",
    "imaml",
    "lora",
    "make_meta_learner",
    "maml",
    "make_train_step",
    "mamlpp",
    "mask_by_path",
    "mean_over_tasks",
    "meta_sgd",
    "parallel",
    "path_str",
    "pretrain",
    "proto_maml",
    "protonets",
    "reptile",
    "summarize",
    "train_state",
]
