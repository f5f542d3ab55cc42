"""The one interface every task distribution implements.

A task source is a pure function of ``(seed, step, task index)``: task ``i``
of meta-batch ``step`` is the same whichever process samples it and however
often it is sampled. That makes the data stream resumable after a crash (no
iterator state to save) and lets each host of a multi-host run sample only its
own slice of the global meta-batch, ``first_task = process_index * local_tasks``,
while the union equals the single-process meta-batch.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from metajax.types import Task


@runtime_checkable
class TaskSource(Protocol):
    """A task distribution over one split (meta-train, meta-validation or meta-test).

    metajax's sources subclass it, which gives them ``traceable = False``; a source that
    does not must declare ``traceable`` itself.
    """

    traceable: ClassVar[bool] = False
    """Whether ``sample`` can be traced with ``step`` a traced int32 scalar (``jax.random``
    rather than numpy): the runner's train loop then samples inside its compiled step,
    several meta-steps per dispatch, instead of sampling on the host every meta-step."""

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        """Tasks ``first_task .. first_task + num_tasks - 1`` of meta-batch ``step``.

        Returns a :class:`metajax.Task` whose leaves have a leading task axis of
        size ``num_tasks`` (numpy or jax arrays).
        """
        ...


def task_rng(seed: int, split_id: int, step: int, task: int) -> np.random.Generator:
    """The numpy generator of one task: independent across seeds, splits, steps and tasks."""
    return np.random.default_rng([seed, split_id, step, task])


# The three meta-splits every task source knows, and the ids ``task_rng`` folds in.
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def split_id(split: str) -> int:
    """The id of a meta-split for :func:`task_rng`; a clear error for an unknown name."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IDS)}.")
    return SPLIT_IDS[split]
