"""The experiment runner's train loop: one loop for every config, resumable.

Workdir layout::

    WORKDIR/config.json          the config the run is (now) trained with
    WORKDIR/config_history.jsonl one line per start or resume: its step and the changes
    WORKDIR/metrics.jsonl        one JSON line per logged step (means over the log window)
    WORKDIR/checkpoints/<step>   orbax checkpoints of the TrainState and its config
    WORKDIR/plots/*.png          learning curves and the family's figure
    WORKDIR/eval.json            held-out evaluation (``metajax eval``, or after training)

The task stream is a pure function of the step, so resuming from the latest checkpoint
replays exactly the batches an uninterrupted run would have seen. Everything is checked
before anything is written: a config error leaves no workdir behind.

The loop never waits for the device between log lines. A source whose ``sample`` is
jittable in the step (``traceable = True``, e.g. sinusoid) is sampled inside the compiled
program, several meta-steps per dispatch (a ``lax.scan``; the count divides the log and
checkpoint intervals, so both land where configured); any other source is sampled and put
on the devices by a background thread (:func:`metajax.tasks.prefetch`). Metrics are
fetched once per log window, after the next dispatch has been issued. The traced step is
kept in :mod:`metajax.run.step_cache`, so a new process of the same config starts fast.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from metajax import parallel
from metajax.run import logs, step_cache
from metajax.run.build import Experiment, build
from metajax.run.checkpoint import Checkpointer
from metajax.run.config import Config, ConfigError, changed_keys, to_dict, validate
from metajax.run.evaluate import run_eval
from metajax.run.logs import NonFiniteError
from metajax.run.workdir import read_config, record_start
from metajax.tasks.prefetch import prefetch
from metajax.train import TrainState, all_finite, make_train_step, place_state, train_state

# Settings a resume may change without --allow-changes: how long, how often, where, and
# what is evaluated; never the model, the algorithm, the optimizer or the data stream.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.devices", "train.parallel")
# Meta-steps per dispatch at most, for sources sampled inside the compiled step.
MAX_STEPS_PER_CALL = 100
# Config keys that do not change the compiled step (the steps per call are keyed apart).
_NOT_IN_PROGRAM = ("name", "eval")
_TRAIN_NOT_IN_PROGRAM = ("log_every", "checkpoint_every", "keep_checkpoints")


class PeerFailedError(RuntimeError):
    """A cross-process collective failed: another process of a multi-host run died."""


def train(config: Config, workdir: str | Path, *, progress: bool = True, bar: bool | None = None,
          echo=print, evaluate: bool | None = None, allow_changes: bool = False,
          fast_path: bool = True, step_cache_dir: str | Path | None = "auto") -> TrainState:
    """Trains (or resumes) ``config`` in ``workdir``; then evaluates if ``config.eval.after_train``.

    Args:
      config: the experiment.
      workdir: the run directory; an existing one is resumed from its latest checkpoint.
      progress: show progress (a bar on a terminal, else one line per log step).
      bar: force the bar on or off (None: on when stderr is a terminal).
      echo: where messages go.
      evaluate: evaluate at the end (None: ``config.eval.after_train``).
      allow_changes: resume even if the model, algorithm, optimizer or data changed (the
        change is recorded in ``config_history.jsonl``).
      fast_path: False: one dispatch per meta-step, sampled in this thread, traced anew
        (the plain loop, the reference the fast path is tested against). ``parallel="pmap"``
        always runs it.
      step_cache_dir: where traced steps are kept for the next process; ``"auto"``:
        :func:`metajax.run.step_cache.default_directory`; None: nowhere.

    Returns:
      The final train state (host-fetchable, replicated over the mesh).

    Raises:
      ConfigError: anything wrong with the config or the workdir, before anything is written.
      NonFiniteError: a metric or the parameters stopped being finite; the last checkpoint
        written is the last good one.
    """
    workdir = Path(workdir)
    tc = config.train
    validate(config)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory.")
    previous = read_config(workdir)
    changes = [] if previous is None else changed_keys(previous, config)
    refused = [k for k in changes if k not in RESUMABLE_KEYS and not k.startswith("eval.")]
    if refused and not allow_changes:
        described = _describe_changes(previous, config, refused)
        raise ConfigError(
            f"{workdir} was trained with other settings ({described}); "
            "resume with --allow-changes to train on with them, or use a new --workdir.")
    exp = build(config)
    mesh = _mesh(tc)
    lead = jax.process_index() == 0
    first_task, local_tasks = parallel.local_task_range(tc.meta_batch)
    step_fn = make_train_step(exp.algo, exp.optimizer, mesh=mesh, parallel=tc.parallel)
    state = place_state(train_state(exp.algo, exp.params, exp.optimizer), mesh)
    # Every config check is done: the checkpoint manager may create its folder now. One
    # manager, made the same way by every process (orbax synchronises its construction).
    ckpt = Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
    start = ckpt.latest_step() or 0
    try:
        if start > tc.steps:
            raise ConfigError(f"{workdir} is at step {start}, past train.steps={tc.steps}.")
        if start:
            state = ckpt.restore(state)
    except ConfigError:
        ckpt.close()
        raise

    # Checked: from here on, files are written.
    metrics_path = workdir / "metrics.jsonl"
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        record_start(workdir, config, start, changes)
        logs.truncate_log(metrics_path, start)
    if start:
        echo(f"resuming {workdir} from step {start}" +
             (f" with changes: {', '.join(changes)}" if changes else ""))
    config_json = to_dict(config)
    pmap = tc.parallel == "pmap"
    canonical = parallel.unreplicate if pmap else (lambda s: s)
    prepare = (lambda t: t) if pmap else (lambda t: parallel.shard_tasks(t, mesh))
    source = exp.setup.train_source
    bar = logs.Progress(config.name, tc.steps, start, enabled=progress and lead, bar=bar,
                        echo=echo)
    sample = (source, local_tasks, first_task)
    if not fast_path or pmap:
        steps = _reference_steps(step_fn, state, sample, prepare, tc.steps, start, bar)
    else:
        cache_dir = step_cache.default_directory() if step_cache_dir == "auto" else (
            None if step_cache_dir is None else Path(step_cache_dir))
        steps = fast_steps(config, step_fn, state, sample, prepare, mesh, start, bar, cache_dir)

    window = logs.MetricsWindow(start) if not fast_path or pmap else StepWindow(start)
    lagging = None  # a finished log window, flushed once the next dispatch is on its way
    try:
        for done, state, metrics, count in steps:
            if lagging is not None:
                _log(lagging, metrics_path if lead else None, bar)
                window.time, lagging = lagging[0].time, None
            elif done == start + count:  # the first dispatch has finished: start the clock
                window.time = time.perf_counter()
            _add(window, metrics, count)
            log_now = done % tc.log_every == 0 or done == tc.steps
            checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.steps
            if log_now and not checkpoint_now and isinstance(window, StepWindow):
                # Logging waits for this dispatch's metrics: dispatch the next one first.
                lagging, window = (window, done), StepWindow(done)
            elif log_now:
                _log((window, done), metrics_path if lead else None, bar)
            if checkpoint_now:
                window.check()  # never checkpoint past a non-finite metric
                if not all_finite(canonical(state).meta_params):
                    raise NonFiniteError(
                        f"step {done}: the meta-parameters are not finite; stopping.")
                ckpt.save(done, canonical(state), config_json)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} {_last_good(ckpt)}") from None
    finally:
        steps.close()
        bar.close()
        ckpt.close()
    state = canonical(state)
    if lead:
        from metajax.run.plots import learning_curves

        for path in learning_curves(metrics_path, workdir / "plots"):
            echo(f"learning curve: {path}")
    if config.eval.after_train if evaluate is None else evaluate:
        run_eval(exp, state.meta_params, workdir, step=int(jax.device_get(state.step)), echo=echo)
    return state


def _add(window, metrics, count: int) -> None:
    if isinstance(window, StepWindow):
        window.add(metrics, count)
    else:
        window.add(metrics)


def _log(pending, metrics_path: Path | None, bar: logs.Progress) -> None:
    window, done = pending
    row = window.flush(done)
    if metrics_path is not None:
        logs.append_row(metrics_path, row)
    bar.update(done, row)


def _reference_steps(step_fn, state, sample, prepare, steps: int, start: int, bar):
    """One dispatch per meta-step, sampled in this thread: the plain form of the loop.

    Yields ``(steps done, state, metrics, count)`` after each dispatch of ``count`` steps;
    the first only once its step has run.
    """
    source, local_tasks, first_task = sample
    for step in range(start, steps):
        tasks = source.sample(step, local_tasks, first_task)
        if step == start:
            bar.note("compiling the meta-step")
            t0 = time.perf_counter()
        state, metrics = _run_step(step_fn, state, prepare(tasks), step)
        if step == start:
            jax.block_until_ready(metrics)
            bar.note(f"meta-step ready in {time.perf_counter() - t0:.2f} s")
        yield step + 1, state, metrics, 1


def _run_step(step_fn, state, tasks, step):
    try:
        return step_fn(state, tasks)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:
            raise PeerFailedError(
                f"process {jax.process_index()}: step {step + 1} failed in a cross-process "
                f"collective; another process has probably died. {e}") from e
        raise


class StepWindow:
    """Metrics since the last log line, as :class:`metajax.run.logs.MetricsWindow` keeps them,
    but each entry may hold several meta-steps (metrics with a leading step axis).

    Fetched lazily, once per log window; the means and the message naming the first
    non-finite step are the plain window's.
    """

    def __init__(self, start: int):
        self.first = start + 1  # step number of the oldest metrics held
        self.pending, self.fetched, self.count = [], {}, 0
        self.time = time.perf_counter()

    def add(self, metrics: dict, count: int = 1) -> None:
        """``metrics`` of ``count`` meta-steps: scalars for one, else arrays ``(count,)``."""
        self.pending.append((metrics, count))

    def check(self) -> None:
        """Fetches pending metrics; raises :class:`NonFiniteError` naming a bad step."""
        host = jax.device_get([metrics for metrics, _ in self.pending])
        for metrics, (_, count) in zip(host, self.pending, strict=True):
            values = {name: np.reshape(v, (count,)) for name, v in metrics.items()}
            finite = np.all([np.isfinite(v) for v in values.values()], axis=0)
            if not finite.all():
                i = int(np.argmin(finite))
                name = next(n for n, v in values.items() if not np.isfinite(v[i]))
                raise NonFiniteError(f"step {self.first + self.count + i}: meta-train metric "
                                     f"{name!r} is {float(values[name][i])}; stopping.")
            for name, v in values.items():
                self.fetched.setdefault(name, []).append(v)
            self.count += count
        self.pending = []

    def flush(self, step: int) -> dict:
        """The mean of each metric since the last flush, and the steps per second."""
        self.check()
        now = time.perf_counter()
        row = {"step": step}
        for name, parts in self.fetched.items():
            row[name] = float(np.mean(np.concatenate(parts).astype(np.float64)))
        row["steps_per_s"] = self.count / max(now - self.time, 1e-9)
        self.first, self.fetched, self.count, self.time = step + 1, {}, 0, now
        return row


def steps_per_call(tc, start: int) -> int:
    """Meta-steps per dispatch for a source sampled inside the step: the largest divisor of
    the log and checkpoint intervals, the start and the end step, up to
    :data:`MAX_STEPS_PER_CALL`, so that every log line and checkpoint ends a dispatch."""
    common = math.gcd(tc.log_every, tc.checkpoint_every, start, tc.steps)
    return max(d for d in range(1, min(common, MAX_STEPS_PER_CALL) + 1) if common % d == 0)


def program_identity(config: Config, loop: str, steps: int) -> dict:
    """What the step cache keys a train program by, beyond its inputs' shapes: the config
    (less what never reaches the program), the loop form and the meta-steps per dispatch."""
    data = to_dict(config)
    for key in _NOT_IN_PROGRAM:
        data.pop(key)
    for key in _TRAIN_NOT_IN_PROGRAM:
        data["train"].pop(key)
    return {"runner": "metajax.run.loop", "loop": loop, "steps_per_call": steps,
            "config": data}


def fast_steps(config, step_fn, state, sample, prepare, mesh, start, bar, cache_dir):
    """The fast path's dispatches: fused and sampled on the devices when the source is
    traceable, else one step per dispatch over prefetched batches. Yields as
    :func:`_reference_steps` does."""
    source, local_tasks, first_task = sample
    tc = config.train
    rep = parallel.replicated(mesh)
    if getattr(source, "traceable", False):
        k = steps_per_call(tc, start)

        def chunk(state, _):
            def one(state, _):
                # Every process samples the global meta-batch's values (a pure function of
                # the step and the task index); the program keeps each device's shard.
                return step_fn(state, source.sample(state.step, tc.meta_batch))

            return jax.lax.scan(one, state, None, length=k)

        bar.note("compiling the meta-step")
        t0 = time.perf_counter()
        run, how = step_cache.cached_step(
            chunk, state, (), state_shardings=_shardings(state), extra_shardings=(),
            metric_sharding=rep, identity=program_identity(config, "fused", k),
            directory=cache_dir)
        for first in range(start, tc.steps, k):
            state, metrics = _run_step(run, state, (), first)
            if first == start:
                jax.block_until_ready(metrics)
                bar.note(f"meta-step ready in {time.perf_counter() - t0:.2f} s ({how}; "
                         f"{k} meta-steps per dispatch)")
            yield first + k, state, metrics, k
        return
    with prefetch(source, start, local_tasks, first_task, num_steps=tc.steps - start,
                  transform=prepare) as batches:
        for step, tasks in batches:
            if step == start:
                bar.note("compiling the meta-step")
                t0 = time.perf_counter()
                run, how = step_cache.cached_step(
                    step_fn, state, tasks, state_shardings=_shardings(state),
                    extra_shardings=_shardings(tasks), metric_sharding=rep,
                    identity=program_identity(config, "prefetched", 1), directory=cache_dir)
            state, metrics = _run_step(run, state, tasks, step)
            if step == start:
                jax.block_until_ready(metrics)
                bar.note(f"meta-step ready in {time.perf_counter() - t0:.2f} s ({how})")
            yield step + 1, state, metrics, 1


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _mesh(tc):
    available = jax.device_count()
    if tc.devices > available:
        raise ConfigError(f"train.devices={tc.devices}, but only {available} device(s) are "
                          "available (0: use all).")
    mesh = parallel.task_mesh(tc.devices or None)
    try:
        parallel.check_divisible(tc.meta_batch, mesh.size)
    except ValueError as e:
        raise ConfigError(f"{e} (set train.meta_batch or train.devices)") from None
    return mesh


def _describe_changes(old: Config, new: Config, keys: list[str]) -> str:
    from metajax.run.config import flat_items

    a, b = flat_items(old), flat_items(new)
    parts = []
    for key in keys:
        if key in ("name", "family", "task"):
            parts.append(f"{key} {getattr(old, key, '?')!s:.40} -> {getattr(new, key, '?')!s:.40}")
        else:
            parts.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return ", ".join(parts)


def _last_good(ckpt: Checkpointer) -> str:
    step = ckpt.latest_step()
    if step is None:
        return "No checkpoint was written."
    return f"The last good checkpoint (step {step}) is kept in {ckpt.directory}."


def restore_latest(exp: Experiment, workdir: Path) -> tuple[TrainState, int]:
    """The latest checkpoint of ``workdir`` as a host train state, and its step."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"no checkpoint in {directory}: run `metajax train` with this workdir.")
    ckpt = Checkpointer(directory, exp.config.train.keep_checkpoints, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint in {directory}: run `metajax train` first.")
        state = ckpt.restore(train_state(exp.algo, exp.params, exp.optimizer))
    finally:
        ckpt.close()
    return jax.device_get(state), step


def evaluate_workdir(workdir: str | Path, overrides=(), *, name: str | None = None,
                     echo=print) -> dict:
    """Evaluates the latest checkpoint of ``workdir`` with the config it was trained with.

    Args:
      workdir: a ``metajax train`` run directory.
      overrides: ``--set`` items; only what evaluation uses may change (``eval.*``, the
        adaptation rate, the family's test data and split).
      name: the config name given on the command line, which must be the workdir's.

    Raises:
      ConfigError: no config or checkpoint in ``workdir``, a name that is not the workdir's,
        or an override of a training setting.
    """
    from metajax.run import families
    from metajax.run.evaluate import eval_config

    workdir = Path(workdir)
    trained = read_config(workdir)
    if trained is None:
        raise ConfigError(f"{workdir / 'config.json'} does not exist: is {workdir} a "
                          "metajax train workdir?")
    if name is not None and name != trained.name:
        raise ConfigError(f"{workdir} holds a {trained.name!r} run, not {name!r}: give its own "
                          "name, or none.")
    family_keys = getattr(families.load(trained.family), "EVAL_KEYS", ())
    config = eval_config(trained, overrides, family_keys)
    validate(config)
    exp = build(config)
    state, step = restore_latest(exp, workdir)
    echo(f"evaluating {workdir} at step {step}")
    return run_eval(exp, state.meta_params, workdir, step=step, echo=echo)
