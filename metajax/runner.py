"""The experiment runner: one train loop for every config, resumable, with logs and plots.

Workdir layout::

    WORKDIR/config.json         the config of the latest (re)start
    WORKDIR/metrics.jsonl       one JSON line per logged step (means over the log window)
    WORKDIR/checkpoints/<step>  orbax checkpoints of the TrainState (the last few)
    WORKDIR/plots/*.png         learning curves and the family's figure
    WORKDIR/eval.json           held-out evaluation (``metajax eval``, or after training)

The task stream is a pure function of the step, so resuming from the latest
checkpoint replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from metajax import parallel
from metajax.checkpoint import Checkpointer
from metajax.evaluation import run_eval
from metajax.experiment import Config, ConfigError, Experiment, build, config_dict
from metajax.plots import learning_curves
from metajax.train import TrainState, all_finite, make_train_step, place_state, train_state


class NonFiniteError(RuntimeError):
    """A meta-train metric or the parameters became NaN or infinite."""


class PeerFailedError(RuntimeError):
    """A cross-process collective failed: another process of a multi-host run died."""


def train(config: Config, workdir: str | Path, *, progress: bool = True, echo=print,
          evaluate: bool | None = None) -> TrainState:
    """Trains (or resumes) ``config`` in ``workdir``; then evaluates if ``config.eval.after_train``.

    Returns:
      The final train state (host-fetchable, replicated over the mesh).

    Raises:
      NonFiniteError: a metric or the parameters stopped being finite; the
        last checkpoint written is the last good one.
    """
    workdir = Path(workdir)
    tc = config.train
    _validate(config)
    exp = build(config)
    lead = jax.process_index() == 0
    mesh = parallel.task_mesh(tc.devices or None)
    try:
        parallel.check_divisible(tc.meta_batch, mesh.size)
    except ValueError as e:
        raise ConfigError(f"{e} (--set train.meta_batch=... or train.devices=...)") from None
    first_task, local_tasks = parallel.local_task_range(tc.meta_batch)
    step_fn = make_train_step(exp.algo, exp.optimizer, mesh=mesh, parallel=tc.parallel)

    state = place_state(train_state(exp.algo, exp.setup.params, exp.optimizer), mesh)
    ckpt = Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state = _restore(ckpt, state)
        echo(f"resuming {workdir} from step {start}")
    metrics_path = workdir / "metrics.jsonl"
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_dict(config), indent=2) + "\n")
        _truncate_log(metrics_path, start)

    pmap = tc.parallel == "pmap"
    if pmap:
        state = parallel.replicate(jax.device_get(state), jax.local_devices()[: mesh.size])
    canonical = (lambda s: parallel.unreplicate(s)) if pmap else (lambda s: s)
    prepare = (lambda t: t) if pmap else (lambda t: parallel.shard_tasks(t, mesh))

    bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (progress and lead), desc=config.name)
    window = _Window(start)
    try:
        for step in range(start, tc.steps):
            tasks = exp.setup.train_source.sample(step, local_tasks, first_task)
            try:
                state, metrics = step_fn(state, prepare(tasks))
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() > 1:
                    raise PeerFailedError(
                        f"process {jax.process_index()}: step {step + 1} failed in a cross-process "
                        f"collective; another process has probably died. {e}") from e
                raise
            window.add(metrics)
            done = step + 1
            is_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps
            if done % tc.log_every == 0 or done == tc.steps:
                row = window.flush(done)
                if lead:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.update(done - bar.n)
                bar.set_postfix(_postfix(row), refresh=False)
            if is_ckpt:
                window.check()  # never checkpoint past a non-finite metric
                if not all_finite(canonical(state).meta_params):
                    raise NonFiniteError(
                        f"step {done}: the meta-parameters are not finite; stopping.")
                ckpt.save(done, canonical(state))
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} {_last_good(ckpt)}") from None
    finally:
        bar.close()
        ckpt.close()
    state = canonical(state)
    if lead:
        for path in learning_curves(metrics_path, workdir / "plots"):
            echo(f"learning curve: {path}")
    if config.eval.after_train if evaluate is None else evaluate:
        run_eval(exp, state.meta_params, workdir, step=int(jax.device_get(state.step)), echo=echo)
    return state


def evaluate_workdir(config: Config, workdir: str | Path, *, echo=print) -> dict:
    """Evaluates the latest checkpoint of ``workdir`` (``metajax eval``)."""
    workdir = Path(workdir)
    exp: Experiment = build(config)
    directory = workdir / "checkpoints"
    ckpt = Checkpointer(directory, config.train.keep_checkpoints) if directory.is_dir() else None
    if ckpt is None or ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {directory}: run `metajax train` with this workdir.")
    try:
        step = ckpt.latest_step()
        state = _restore(ckpt, train_state(exp.algo, exp.setup.params, exp.optimizer))
    finally:
        ckpt.close()
    echo(f"evaluating {workdir} at step {step}")
    return run_eval(exp, state.meta_params, workdir, step=step, echo=echo)


def _restore(ckpt: Checkpointer, like: TrainState) -> TrainState:
    try:
        return ckpt.restore(like)
    except ValueError as e:  # orbax: the tree on disk differs from this config's state
        raise ConfigError(
            f"the checkpoint in {ckpt.directory} does not fit this config's train state (was the "
            f"model, algorithm or optimizer changed? use a new --workdir): {e}") from None


class _Window:
    """Metrics since the last log line, fetched lazily so steps stay asynchronous."""

    def __init__(self, start: int):
        self.first = start + 1  # step number of the oldest metrics held
        self.pending, self.fetched = [], []
        self.time = time.perf_counter()

    def add(self, metrics):
        self.pending.append(metrics)

    def check(self):
        host = jax.device_get(self.pending)
        for i, m in enumerate(host):
            for name, value in m.items():
                if not np.all(np.isfinite(value)):
                    raise NonFiniteError(
                        f"step {self.first + len(self.fetched) + i}: meta-train metric "
                        f"{name!r} is {float(value)}; stopping.")
        self.fetched += host
        self.pending = []

    def flush(self, step: int) -> dict:
        self.check()
        now = time.perf_counter()
        row = {"step": step}
        for name in self.fetched[0]:
            row[name] = float(np.mean([float(m[name]) for m in self.fetched]))
        row["steps_per_s"] = len(self.fetched) / max(now - self.time, 1e-9)
        self.first, self.fetched, self.time = step + 1, [], now
        return row


def _postfix(row: dict) -> dict:
    out = {"loss": f"{row.get('loss_after', math.nan):.4g}"}
    if "accuracy_after" in row:
        out["acc"] = f"{row['accuracy_after']:.3f}"
    return out


def _last_good(ckpt: Checkpointer) -> str:
    step = ckpt.latest_step()
    if step is None:
        return "No checkpoint was written."
    return f"The last good checkpoint (step {step}) is kept in {ckpt.directory}."


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines past the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _validate(config: Config) -> None:
    tc = config.train
    for name in ("steps", "meta_batch", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(tc, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(tc, name)}.")
    if tc.parallel not in ("sharding", "pmap"):
        raise ConfigError(f"train.parallel must be 'sharding' or 'pmap', got {tc.parallel!r}.")
    if config.eval.num_tasks < 1 or config.eval.inner_steps < 0:
        raise ConfigError("eval.num_tasks must be >= 1 and eval.inner_steps >= 0.")
