"""The background prefetch iterator: same items as direct sampling, resumable, stoppable."""

import dataclasses
import threading
import time
from typing import ClassVar

import jax
import numpy as np
import pytest

from metajax.tasks import TaskSource, prefetch, task_rng
from metajax.types import Task


@dataclasses.dataclass(frozen=True)
class Toy:
    """A numpy TaskSource: x ~ N(0, 1), y = w x with w drawn per task."""

    seed: int = 0
    fail_at: int | None = None
    delay: float = 0.0
    traceable: ClassVar[bool] = False  # declared: Toy does not subclass TaskSource

    def sample(self, step, num_tasks, first_task=0):
        if step == self.fail_at:
            raise RuntimeError(f"boom at {step}")
        time.sleep(self.delay)
        xs, ys = [], []
        for t in range(num_tasks):
            rng = task_rng(self.seed, 0, step, first_task + t)
            w, x = rng.normal(), rng.normal(size=(6, 1))
            xs.append(x)
            ys.append(w * x)
        x, y = np.stack(xs), np.stack(ys)
        return Task(support=(x[:, :3], y[:, :3]), query=(x[:, 3:], y[:, 3:]))


def same(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_is_a_task_source():
    assert isinstance(Toy(), TaskSource)

    class Undeclared:
        sample = Toy.sample

    class Subclass(TaskSource):
        sample = Toy.sample

    # A source says whether it traces: a subclass inherits False, others must declare it.
    assert not isinstance(Undeclared(), TaskSource)
    assert isinstance(Subclass(), TaskSource) and Subclass.traceable is False


@pytest.mark.parametrize("start,first_task,depth", [(0, 0, 1), (7, 4, 3)])
def test_yields_exactly_direct_sampling(start, first_task, depth):
    src = Toy()
    with prefetch(src, start, num_tasks=4, first_task=first_task, depth=depth, num_steps=6) as it:
        items = list(it)
    assert [s for s, _ in items] == list(range(start, start + 6))
    for step, task in items:
        assert same(task, src.sample(step, 4, first_task))
    # Resuming mid-stream gives the tail of the uninterrupted stream.
    with prefetch(src, start + 3, num_tasks=4, first_task=first_task, num_steps=3) as it:
        assert all(same(t, items[3 + i][1]) for i, (_, t) in enumerate(it))


def test_transform_runs_in_thread_and_errors_propagate():
    names = []

    def transform(task):
        names.append(threading.current_thread().name)
        return jax.tree.map(lambda a: a * 2, task)

    with prefetch(Toy(), 0, 2, num_steps=2, transform=transform) as it:
        (_, task), _ = list(it)
    assert same(task, jax.tree.map(lambda a: a * 2, Toy().sample(0, 2)))
    assert names == ["metajax-prefetch"] * 2
    it = prefetch(Toy(fail_at=2), 0, 2)
    assert [next(it)[0], next(it)[0]] == [0, 1]
    with pytest.raises(RuntimeError, match="boom at 2"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_an_endless_stream():
    it = prefetch(Toy(delay=0.01), 0, 2, depth=2)
    assert next(it)[0] == 0
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
