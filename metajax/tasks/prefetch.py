"""Background prefetch of meta-batches from any :class:`~metajax.tasks.base.TaskSource`.

Host-side sampling (numpy) runs in a thread while the device runs the previous step: numpy's
copies and the transfer started by ``jax.device_put`` release the GIL, so the two overlap.
Because a source is a pure function of the step, the stream needs no saved state: resuming at
step ``s`` is ``prefetch(source, start_step=s, ...)``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from metajax.tasks.base import TaskSource
from metajax.types import Task

_DONE = object()


class prefetch(Iterator[tuple[int, Any]]):  # noqa: N801 - used like a function
    """Iterates ``(step, source.sample(step, num_tasks, first_task))`` from ``start_step`` on.

    A daemon thread keeps up to ``depth`` meta-batches ready. Items are exactly what direct
    sampling gives, in step order. An exception in the thread is re-raised by ``next``.
    Use as a context manager (or call :meth:`close`) to stop the thread early.

    Args:
      source: any TaskSource.
      start_step: the first step (resume from here).
      num_tasks: tasks per meta-batch on this host.
      first_task: index of this host's first task in the global meta-batch.
      depth: meta-batches kept ready (memory: depth + 2 meta-batches at most).
      num_steps: stop after this many steps; ``None`` runs forever.
      transform: applied to each Task in the thread, e.g.
        ``lambda t: jax.device_put(t, sharding)`` to overlap the host-to-device copy too.

    Example:
      >>> with prefetch(Omniglot(), start_step=0, num_tasks=32) as it:  # doctest: +SKIP
      ...     for step, task in it:
      ...         state, metrics = train_step(state, task)
    """

    def __init__(
        self,
        source: TaskSource,
        start_step: int,
        num_tasks: int,
        first_task: int = 0,
        depth: int = 3,
        num_steps: int | None = None,
        transform: Callable[[Task], Any] | None = None,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        args = (source, start_step, num_tasks, first_task, num_steps, transform)
        self._thread = threading.Thread(
            target=self._work, args=args, daemon=True, name="metajax-prefetch"
        )
        self._thread.start()

    def _work(self, source, start_step, num_tasks, first_task, num_steps, transform):
        step = start_step
        try:
            while not self._stop.is_set() and (num_steps is None or step < start_step + num_steps):
                task = source.sample(step, num_tasks, first_task)
                if transform is not None:
                    task = transform(task)
                if not self._put((step, task)):
                    return
                step += 1
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, not swallowed
            self._put(e)

    def _put(self, item) -> bool:
        # Time out regularly so that close() is noticed while the queue is full.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the thread and waits for it (at most the time of one ``sample`` call)."""
        self._stop.set()
        self._finished = True
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
