"""The experiment runner's train loop: one loop for every config, resumable.

Workdir layout::

    WORKDIR/config.json          the config the run is (now) trained with
    WORKDIR/config_history.jsonl one line per start or resume: its step and the changes
    WORKDIR/metrics.jsonl        one JSON line per logged step (means over the log window)
    WORKDIR/checkpoints/<step>   orbax checkpoints of the TrainState and its config
    WORKDIR/plots/*.png          learning curves and the family's figure
    WORKDIR/eval.json            held-out evaluation (``metajax eval``, or after training)
    WORKDIR/.metajax.lock        the process training in it (:func:`metajax.run.workdir.lock`)
    WORKDIR/checkpoints_unreadable/<step>  checkpoints that did not read, moved aside

The task stream is a pure function of the step, so resuming from the latest checkpoint
that reads replays exactly the batches an uninterrupted run would have seen. Everything is
checked before anything is written, the task sources' own checks against their data
included: a config error leaves no workdir behind. A workdir without a checkpoint (a first
start that failed) is started anew. Ctrl-C stops at the next step boundary after writing a
checkpoint there.

The loop never waits for the device between log lines: :mod:`metajax.run.dispatch` runs
several meta-steps per call for sources sampled on the device (the count divides the log
and checkpoint intervals, so both land where configured) and prefetches host-sampled
batches in a thread; metrics are fetched once per log window, after the next dispatch has
been issued. :mod:`metajax.run.program_cache` keeps the traced step for the next process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

from metajax import parallel
from metajax.run import dispatch, logs, program_cache
from metajax.run.build import Experiment, build
from metajax.run.checkpoint import Checkpointer, resume
from metajax.run.config import Config, ConfigError, changed_keys, to_dict, validate
from metajax.run.evaluate import check_eval_config, check_sources, run_eval
from metajax.run.interrupt import Interrupted, StopRequest
from metajax.run.logs import NonFiniteError
from metajax.run.workdir import has_checkpoint, read_config, record_start
from metajax.run.workdir import lock as workdir_lock
from metajax.train import TrainState, all_finite, make_train_step, place_state, train_state

# Settings a resume may change without --allow-changes: how long, how often, where, and
# what is evaluated; never the model, the algorithm, the optimizer or the data stream.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.devices",
    "train.parallel",
    "train.mesh",
)


class PeerFailedError(RuntimeError):
    """A cross-process collective failed: another process of a multi-host run died."""


def train(
    config: Config,
    workdir: str | Path,
    *,
    progress: bool = True,
    bar: bool | None = None,
    echo=print,
    evaluate: bool | None = None,
    allow_changes: bool = False,
    fast_path: bool = True,
    program_cache_dir: str | Path | None = "auto",
) -> TrainState:
    """Trains (or resumes) ``config`` in ``workdir``; then evaluates if ``config.eval.after_train``.

    Args:
      config: the experiment.
      workdir: the run directory; an existing one is resumed from its latest checkpoint
        that reads. One without a checkpoint (a start that failed before its first) is
        started anew.
      progress: show progress (a bar on a terminal, else one line per log step).
      bar: force the bar on or off (None: on when stderr is a terminal).
      echo: where messages go.
      evaluate: evaluate at the end (None: ``config.eval.after_train``).
      allow_changes: resume even if the model, algorithm, optimizer or data changed (the
        change is recorded in ``config_history.jsonl``).
      fast_path: False: the plain form of :mod:`metajax.run.dispatch`, one dispatch per
        meta-step of the train step as it is, traced anew (the reference the fast path is
        tested against). ``parallel="pmap"`` always runs it.
      program_cache_dir: where traced steps are kept for the next process; ``"auto"``:
        :func:`metajax.run.program_cache.default_directory`; None: nowhere.

    Returns:
      The final train state (host-fetchable, replicated over the mesh).

    Raises:
      ConfigError: anything wrong with the config, the data or the workdir (another
        process training in it included), before anything is written.
      NonFiniteError: a metric or the parameters stopped being finite; the last checkpoint
        written is the last good one.
      Interrupted: SIGINT (Ctrl-C); says where the run resumes.
    """
    workdir = Path(workdir)
    tc = config.train
    validate(config)
    check_eval_config(config)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory.")
    # A workdir without a checkpoint trained nothing: its config binds nothing.
    previous = read_config(workdir) if has_checkpoint(workdir) else None
    changes = [] if previous is None else _unique(changed_keys(previous, config))
    refused = [k for k in changes if k not in RESUMABLE_KEYS and not k.startswith("eval.")]
    if refused and not allow_changes:
        described = _describe_changes(previous, config, refused)
        raise ConfigError(
            f"{workdir} was trained with other settings ({described}); "
            "resume with --allow-changes to train on with them, or use a new --workdir."
        )
    exp = build(config)
    mesh = _mesh(tc)
    will_evaluate = config.eval.after_train if evaluate is None else evaluate
    check_sources(exp, train=True, evaluate=will_evaluate)
    lead = jax.process_index() == 0
    first_task, local_tasks = parallel.local_task_range(tc.meta_batch)
    step_fn = make_train_step(exp.algo, exp.optimizer, mesh=mesh, parallel=tc.parallel)
    state = place_state(train_state(exp.algo, exp.params, exp.optimizer), mesh)
    created = not workdir.exists()
    with contextlib.ExitStack() as held:
        if lead:  # the only process that writes to the workdir
            held.enter_context(workdir_lock(workdir, "train", echo=echo))
        try:
            state, start = resume(workdir, state, tc.keep_checkpoints, tc.steps, lead, echo)
            # Every config check is done: the checkpoint manager may create its folder
            # now. One manager, made the same way by every process (orbax synchronises
            # its construction).
            ckpt = Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
        except ConfigError:
            if created:
                held.close()
                _remove_empty(workdir)
            raise
        plan = dispatch.Plan(
            step_fn,
            state,
            exp.setup.train_source,
            local_tasks,
            first_task,
            (lambda t: t) if tc.parallel == "pmap" else (lambda t: parallel.shard_tasks(t, mesh)),
            start,
        )
        return _train_from(
            exp,
            workdir,
            ckpt,
            plan,
            changes=changes,
            mesh=mesh,
            lead=lead,
            progress=progress,
            bar=bar,
            echo=echo,
            evaluate=will_evaluate,
            fast_path=fast_path,
            program_cache_dir=program_cache_dir,
        )


def _train_from(
    exp: Experiment,
    workdir: Path,
    ckpt: Checkpointer,
    plan: dispatch.Plan,
    *,
    changes,
    mesh,
    lead,
    progress,
    bar,
    echo,
    evaluate,
    fast_path,
    program_cache_dir,
) -> TrainState:
    """The train loop from ``plan.start`` on, once every check has passed."""
    state, start, will_evaluate = plan.state, plan.start, evaluate
    config, tc = exp.config, exp.config.train
    # Checked: from here on, files are written.
    metrics_path = workdir / "metrics.jsonl"
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        record_start(workdir, config, start, changes)
        logs.truncate_log(metrics_path, start)
    if start:
        echo(
            f"resuming {workdir} from step {start}"
            + (f" with changes: {', '.join(changes)}" if changes else "")
        )
    config_json = to_dict(config)
    pmap = tc.parallel == "pmap"
    canonical = parallel.unreplicate if pmap else (lambda s: s)
    bar = logs.Progress(config.name, tc.steps, start, enabled=progress and lead, bar=bar, echo=echo)
    form = dispatch.choose_form(tc, plan.source, start, fast_path=fast_path)
    if program_cache_dir == "auto":
        program_cache_dir = program_cache.default_directory()
    log_path = metrics_path if lead else None
    lagging = None  # a finished log window, flushed once the next dispatch is on its way
    done, saved = start, start
    steps = None
    stop = StopRequest()
    try:
        with stop:
            steps = dispatch.start(
                config,
                plan,
                form,
                mesh=mesh,
                cache_dir=program_cache_dir and Path(program_cache_dir),
                note=bar.note,
            )
            window = logs.MetricsWindow(start)  # the step is compiled: rates count from now
            for done, state, metrics, count in steps:
                if lagging is not None:
                    _log(*lagging, log_path, bar)
                    lagging = None
                window.add(metrics, count)
                log_now = done % tc.log_every == 0 or done == tc.steps
                checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.steps
                if log_now:
                    # Each row's rate covers the whole interval since the previous row,
                    # timed at the same point of the loop, checkpoints included.
                    now = logs.now()
                    if not checkpoint_now:
                        # Logging waits for this dispatch's metrics: dispatch the next first.
                        lagging, window = (window, done, now), logs.MetricsWindow(done, now)
                    else:
                        _log(window, done, now, log_path, bar)
                if checkpoint_now:
                    _save(ckpt, done, state, window, canonical, config_json)
                    saved = done
                if stop.requested:
                    break
                stop.armed = True  # a step is done: Ctrl-C now stops after a checkpoint
            if stop.requested:
                if lagging is not None:
                    _log(*lagging, log_path, bar)
                if window.pending:
                    _log(window, done, logs.now(), log_path, bar)
                if done > saved:
                    _save(ckpt, done, state, window, canonical, config_json)
                    saved = done
                if done == tc.steps:
                    raise Interrupted(
                        f"interrupted after the last step ({done}); training is complete: "
                        f"`metajax eval --workdir {workdir}` evaluates it."
                    )
                raise Interrupted(
                    f"interrupted at step {done}; checkpoint written: `metajax train` on "
                    f"{workdir} resumes from step {done}."
                )
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} {_last_good(ckpt)}") from None
    except KeyboardInterrupt:
        last = ckpt.latest_step()
        where = f"resumes from step {last}" if last else "starts from step 0"
        raise Interrupted(
            f"interrupted at step {done}; `metajax train` on {workdir} {where}."
        ) from None
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise PeerFailedError(
            f"process {jax.process_index()}: a meta-step after step {done} failed in a "
            f"cross-process collective; another process has probably died. {e}"
        ) from e
    finally:
        if steps is not None:
            steps.close()
        bar.close()
        ckpt.close()
    state = canonical(state)
    if lead:
        from metajax.run.plots import learning_curves

        for path in learning_curves(metrics_path, workdir / "plots"):
            echo(f"learning curve: {path}")
    if will_evaluate:
        try:
            run_eval(
                exp, state.meta_params, workdir, step=int(jax.device_get(state.step)), echo=echo
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted during the evaluation; training is complete (step {done}): "
                f"`metajax eval --workdir {workdir}` evaluates it."
            ) from None
    return state


def _save(ckpt, done, state, window, canonical, config_json) -> None:
    window.check()  # never checkpoint past a non-finite metric
    if not all_finite(canonical(state).meta_params):
        raise NonFiniteError(f"step {done}: the meta-parameters are not finite; stopping.")
    ckpt.save(done, canonical(state), config_json)


def _remove_empty(workdir: Path) -> None:
    """Removes what a refused first start created, if it holds nothing else."""
    for path in (workdir / "checkpoints", workdir):
        with contextlib.suppress(OSError):
            path.rmdir()


def _unique(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _log(window, done: int, now: float, metrics_path: Path | None, bar: logs.Progress) -> None:
    row = window.flush(done, now)
    if metrics_path is not None:
        logs.append_row(metrics_path, row)
    bar.update(done, row)


# fmt: off
def _mesh(tc):
    available = jax.device_count()
    wanted = tc.mesh[0] * tc.mesh[1] if tc.mesh else tc.devices
    if wanted > available:
        raise ConfigError(f"train.{'mesh' if tc.mesh else 'devices'} asks for {wanted} "
                          f"devices, but only {available} device(s) are available.")
    if tc.mesh:
        mesh = parallel.task_model_mesh(*tc.mesh)
        tasks = parallel.task_axis_size(mesh)
    else:
        mesh = parallel.task_mesh(tc.devices or None)
        tasks = mesh.size
    try:
        parallel.check_divisible(tc.meta_batch, tasks)
    except ValueError as e:
        raise ConfigError(f"{e} (set train.meta_batch, train.devices or train.mesh)") from None
    return mesh
# fmt: on


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
