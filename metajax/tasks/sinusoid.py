"""Sinusoid regression exactly as in the MAML paper (Finn et al., 2017, section 5.1).

Amplitude ~ U[0.1, 5.0], phase ~ U[0, pi], inputs ~ U[-5, 5]; a task is
``y = amplitude * sin(x - phase)`` with K support and Q query points. Sampled
on device with ``jax.random``: a whole meta-batch is one jitted call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from metajax.tasks.base import TaskSource, split_id
from metajax.types import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT = (-5.0, 5.0)


@dataclasses.dataclass(frozen=True)
class Sinusoid(TaskSource):
    """Sinusoid tasks; splits differ only by random stream (the distribution is continuous).

    Attributes:
      shots: K support points per task.
      queries: query points per task.
      split: "train", "validation" or "test".
      seed: the stream's seed.
    """

    shots: int = 5
    queries: int = 10
    split: str = "train"
    seed: int = 0
    traceable: ClassVar[bool] = True  # sampled with jax.random

    def __post_init__(self):
        if self.shots < 1 or self.queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got {self.shots}, {self.queries}.")
        split_id(self.split)  # a clear error for an unknown split

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        return _sample(
            self.shots, self.queries, split_id(self.split), self.seed, step, num_tasks, first_task
        )

    def sample_with_params(self, step: int, num_tasks: int, first_task: int = 0):
        """Like ``sample``, also returning each task's (amplitude, phase), for plots."""
        return _sample_full(
            self.shots, self.queries, split_id(self.split), self.seed, step, num_tasks, first_task
        )


def one_task(key: jax.Array, shots: int, queries: int):
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amplitude = jax.random.uniform(k_amp, (), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(k_phase, (), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(k_x, (shots + queries, 1), minval=INPUT[0], maxval=INPUT[1])
    y = amplitude * jnp.sin(x - phase)
    task = Task(support=(x[:shots], y[:shots]), query=(x[shots:], y[shots:]))
    return task, amplitude, phase


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _sample_full(shots, queries, split_id, seed, step, num_tasks, first_task):
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), split_id), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(first_task + jnp.arange(num_tasks))
    return jax.vmap(lambda k: one_task(k, shots, queries))(keys)


def _sample(shots, queries, split_id, seed, step, num_tasks, first_task):
    return _sample_full(shots, queries, split_id, seed, step, num_tasks, first_task)[0]
