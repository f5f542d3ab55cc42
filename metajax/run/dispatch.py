"""How the train loop's meta-steps run: where tasks are sampled, how many meta-steps one
dispatch runs, and which program runs them.

The loop never waits for the device between log lines. :func:`choose_form` picks one of
three forms:

- ``fused``: a source whose ``sample`` traces (:attr:`TaskSource.traceable
  <metajax.tasks.base.TaskSource.traceable>`) is sampled inside the program,
  :func:`steps_per_call` meta-steps per dispatch (a ``lax.scan``), so the host does no work
  per meta-step;
- ``prefetched``: any other source is sampled and placed on the devices by a background
  thread (:class:`metajax.tasks.prefetch`), one meta-step per dispatch;
- ``plain``: sampled the same way, but the train step is called as it is, compiled on its
  first call and never cached: the reference the other two are tested against, and the
  only form of the legacy ``pmap`` path.

:func:`start` compiles the step (the fused and prefetched programs through
:mod:`metajax.run.program_cache`) and returns the dispatches as :class:`MetaSteps`; the loop
times its steps from then on.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

from metajax import parallel
from metajax.run import program_cache
from metajax.run.config import Config, TrainConfig, to_dict
from metajax.tasks.prefetch import prefetch

# Meta-steps per dispatch at most, for sources sampled inside the compiled step.
MAX_STEPS_PER_CALL = 100
# Config keys that do not change the compiled step (the steps per call are keyed apart).
_NOT_IN_PROGRAM = ("name", "eval")
_TRAIN_NOT_IN_PROGRAM = ("log_every", "checkpoint_every", "keep_checkpoints")


class Plan(NamedTuple):
    """What the loop hands :func:`start`: the step, the state and the task stream.

    Attributes:
      step_fn: ``make_train_step``'s ``step(state, tasks) -> (state, metrics)``.
      state: the placed (or restored) train state; donated to the first dispatch.
      source: the meta-train task source.
      local_tasks: tasks per meta-batch on this process.
      first_task: this process's first task in the global meta-batch.
      prepare: ``prepare(tasks)``: this process's tasks to the step's global input.
      start: the first step.
    """

    step_fn: Callable
    state: Any
    source: Any
    local_tasks: int
    first_task: int
    prepare: Callable
    start: int


class Form(NamedTuple):
    """How the meta-steps run: ``name`` is ``"fused"``, ``"prefetched"`` or ``"plain"``."""

    name: str
    steps_per_call: int


def choose_form(tc: TrainConfig, source, start: int, *, fast_path: bool) -> Form:
    """The fused form for a traceable source, else the prefetched one; the plain form when
    ``fast_path`` is off or the step is the legacy ``pmap`` one."""
    if not fast_path or tc.parallel == "pmap":
        return Form("plain", 1)
    if source.traceable:
        return Form("fused", steps_per_call(tc, start))
    return Form("prefetched", 1)


def steps_per_call(tc: TrainConfig, start: int) -> int:
    """Meta-steps per dispatch for a source sampled inside the step: the largest divisor of
    the log and checkpoint intervals, the start and the end step, up to
    :data:`MAX_STEPS_PER_CALL`, so that every log line and checkpoint ends a dispatch."""
    common = math.gcd(tc.log_every, tc.checkpoint_every, start, tc.steps)
    return max(d for d in range(1, min(common, MAX_STEPS_PER_CALL) + 1) if common % d == 0)


def program_identity(config: Config, form: Form) -> dict:
    """What a runner's train program is keyed by beyond its inputs' shapes: the config
    (less what never reaches the program), the form and the meta-steps per dispatch."""
    data = to_dict(config)
    for key in _NOT_IN_PROGRAM:
        data.pop(key)
    for key in _TRAIN_NOT_IN_PROGRAM:
        data["train"].pop(key)
    return {
        "runner": "metajax.run.loop",
        "loop": form.name,
        "steps_per_call": form.steps_per_call,
        "config": data,
    }


class MetaSteps:
    """The loop's dispatches, from a compiled step.

    Iterating yields ``(steps done, state, metrics, count)`` after issuing each dispatch of
    ``count`` meta-steps (not waiting for it); the fused form's metrics have a leading axis
    ``count``. :meth:`close` stops the sampling thread.

    Args:
      state: the state the next dispatch takes.
      inputs: ``(step, extra)`` of each dispatch: its first step and the step's second
        argument (the placed tasks, or ``()`` for the fused program).
      run: ``run(state, extra) -> (state, metrics)``.
      per_call: meta-steps per dispatch.
      close: stops what produces ``inputs``.
      ran: dispatches already run while compiling, yielded first.
    """

    def __init__(self, state, inputs: Iterator, run: Callable, per_call: int, close, ran=()):
        self._state, self._inputs, self._run, self._per_call = state, inputs, run, per_call
        self._close, self._ran = close, ran

    def __iter__(self):
        yield from self._ran
        state = self._state
        for step, extra in self._inputs:
            state, metrics = self._run(state, extra)
            yield step + self._per_call, state, metrics, self._per_call

    def close(self) -> None:
        self._close()


def start(
    config: Config,
    plan: Plan,
    form: Form,
    *,
    mesh,
    cache_dir,
    note: Callable[[str], None],
) -> MetaSteps:
    """The meta-steps of ``form`` from ``plan.start`` on, their step compiled (or read from
    ``cache_dir``); ``note`` hears what is compiling and when it is ready.

    The plain form compiles on its first call, so its first meta-step runs here and is
    waited for. Either way the meta-steps still to run are the ones to time.
    """
    tc = config.train
    k = form.steps_per_call
    if plan.start >= tc.steps:
        return MetaSteps(plan.state, iter(()), plan.step_fn, k, close=_nothing)
    inputs, close = _inputs(tc, plan, form)
    try:
        first = next(inputs)
        note("compiling the meta-step")
        t0 = time.perf_counter()
        if form.name == "plain":
            state, metrics = plan.step_fn(plan.state, first[1])
            jax.block_until_ready(metrics)
            note(f"meta-step ready in {time.perf_counter() - t0:.2f} s")
            ran = [(first[0] + 1, state, metrics, 1)]
            return MetaSteps(state, inputs, plan.step_fn, 1, close, ran=ran)
        run, how = program_cache.compiled_step(
            _fused_step(plan, k, tc.meta_batch) if form.name == "fused" else plan.step_fn,
            plan.state,
            first[1],
            metric_sharding=parallel.replicated(mesh),
            identity=program_identity(config, form),
            directory=cache_dir,
        )
    except BaseException:
        close()
        raise
    per_call = f"; {k} meta-steps per dispatch" if k > 1 else ""
    note(f"meta-step ready in {time.perf_counter() - t0:.2f} s ({how}{per_call})")
    return MetaSteps(plan.state, itertools.chain([first], inputs), run, k, close)


def _inputs(tc: TrainConfig, plan: Plan, form: Form) -> tuple[Iterator, Callable[[], None]]:
    """``(step, extra)`` of each dispatch, and how to stop producing them."""
    if form.name == "fused":
        # The program samples its own tasks: a dispatch needs only its first step.
        steps = range(plan.start, tc.steps, form.steps_per_call)
        return ((step, ()) for step in steps), _nothing
    batches = prefetch(
        plan.source,
        plan.start,
        plan.local_tasks,
        plan.first_task,
        num_steps=tc.steps - plan.start,
        transform=plan.prepare,
    )
    return batches, batches.close


def _nothing() -> None:
    pass


def _fused_step(plan: Plan, k: int, meta_batch: int) -> Callable:
    """``k`` meta-steps in one program, each sampling its own tasks."""

    def one(state, _):
        # Every process samples the global meta-batch's values (a pure function of the
        # step and the task index); the program keeps each device's shard.
        return plan.step_fn(state, plan.source.sample(state.step, meta_batch))

    def chunk(state, _):
        return jax.lax.scan(one, state, None, length=k)

    return chunk
