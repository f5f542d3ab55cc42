"""Orbax checkpoints in ``WORKDIR/checkpoints/<step>``: the train state and its config.

Each checkpoint carries the config it was trained with (``config`` item, JSON), so a run
resumed with changed settings keeps the record of what every checkpoint came from.
:func:`resume` gives training its state, :func:`restore_checkpoint` gives evaluation and
prediction theirs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import orbax.checkpoint as ocp

from metajax.run.config import ConfigError
from metajax.run.workdir import has_checkpoint
from metajax.train import TrainState, train_state

if TYPE_CHECKING:
    from metajax.run.build import Experiment


class UnreadableCheckpointError(ConfigError):
    """A checkpoint whose files do not read (damaged, truncated, overwritten); ``reason``
    is the error in a few words."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class Checkpointer:
    """Saves and restores a :class:`metajax.train.TrainState` with an orbax CheckpointManager.

    Saves are synchronous: a run killed right after ``save`` returns keeps that step, and the
    next train step can donate the state's buffers safely. Orbax writes into a temporary
    directory and renames it when complete, so a checkpoint interrupted by SIGKILL is never
    restored: the latest complete one is.
    """

    def __init__(self, directory: Path, keep: int = 3, *, create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=False
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)
        )
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """The state at ``step`` (default: latest), shaped and sharded like ``like``.

        Raises:
          ConfigError: the checkpoint's tree does not fit ``like`` (another model,
            algorithm or optimizer), named in one line.
          UnreadableCheckpointError: its files do not read (damaged, truncated), named in
            one line.
        """
        step = self.latest_step() if step is None else step
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise self._unreadable(step, e) from None
        if stored is None:
            raise self._unreadable(step, FileNotFoundError("no state metadata"))
        _check_fits(stored, like, step, self.directory)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like,
        )
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as e:  # noqa: BLE001 - a damaged file fails in orbax or tensorstore
            raise self._unreadable(step, e) from None
        return out.state

    def restore_readable(self, like, echo=print) -> tuple[object, int, list[int]]:
        """The newest checkpoint that reads: ``(state, step, steps that did not read)``.

        Each newer one that does not read is named in one line through ``echo``.

        Raises:
          ConfigError: a checkpoint does not fit ``like`` (every one would refuse it).
          UnreadableCheckpointError: none reads (or there is none); one line.
        """
        broken, reasons = [], []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(like, step)
            except UnreadableCheckpointError as e:
                broken.append(step)
                reasons.append(e)
                continue
            for reason in reasons:
                echo(f"metajax: {reason}")
            return state, step, broken
        if broken:
            raise UnreadableCheckpointError(
                f"no checkpoint in {self.directory} reads (steps {sorted(broken)}; "
                f"{reasons[0].reason}); train again with a new --workdir, or restore the "
                "folder from a backup."
            )
        raise UnreadableCheckpointError(f"no checkpoint in {self.directory}.")

    def _unreadable(self, step: int, error: Exception) -> UnreadableCheckpointError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if len(first) > 120:
            first = first[:117] + "..."
        reason = f"{type(error).__name__}: {first}"
        return UnreadableCheckpointError(
            f"the checkpoint at step {step} in {self.directory} does not read ({reason}).",
            reason,
        )

    def config(self, step: int | None = None) -> dict | None:
        """The config a checkpoint was trained with (None for a checkpoint without one)."""
        step = self.latest_step() if step is None else step
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError):
            return None
        return out.config

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def close(self) -> None:
        self.manager.close()


def resume(workdir: Path, like, keep: int, total_steps: int, lead: bool, echo=print) -> tuple:
    """The state to train on and its step: the newest checkpoint in ``workdir/checkpoints``
    that reads, shaped like ``like`` (the ones after it, which do not, are moved to
    ``checkpoints_unreadable/`` by the ``lead`` process, so training can write those steps
    again), else ``like`` itself at step 0."""
    workdir = Path(workdir)
    if not has_checkpoint(workdir):
        return like, 0
    probe = Checkpointer(workdir / "checkpoints", keep, create=False)
    try:
        restored, start, broken = probe.restore_readable(like, echo=echo)
    finally:
        probe.close()
    if start > total_steps:
        raise ConfigError(f"{workdir} is at step {start}, past train.steps={total_steps}.")
    if broken and lead:
        aside = workdir / "checkpoints_unreadable"
        aside.mkdir(exist_ok=True)
        for step in broken:
            target = aside / str(step)
            if target.exists():
                target = aside / f"{step}.{int(time.time())}"
            (workdir / "checkpoints" / str(step)).rename(target)
        echo(f"moved the checkpoints that do not read (steps {sorted(broken)}) to {aside}")
    return restored, start


def restore_checkpoint(
    exp: Experiment, workdir: Path, step: int | None = None, echo=print
) -> tuple[TrainState, int]:
    """The checkpoint at ``step`` (default: the newest one that reads) of ``workdir`` as a
    host train state, and its step.

    Raises:
      ConfigError: no checkpoint, none at ``step``, or none that reads; one line.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"no checkpoint in {directory}: run `metajax train` with this workdir.")
    ckpt = Checkpointer(directory, exp.config.train.keep_checkpoints, create=False)
    like = train_state(exp.algo, exp.params, exp.optimizer)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"no checkpoint in {directory}: run `metajax train` first.")
        if step is not None and step not in steps:
            raise ConfigError(f"no checkpoint at step {step} in {directory}: it has {steps}.")
        if step is None:
            state, step, _ = ckpt.restore_readable(like, echo=echo)
        else:
            state = ckpt.restore(like, step)
    finally:
        ckpt.close()
    return jax.device_get(state), step


def quiet_abandoned_reads() -> Callable[[], None]:
    """Drops the reports of reads that a failed restore abandoned, until the function it
    returns puts the process's stderr and unraisable hook back.

    When one array of a checkpoint fails to read, orbax stops and closes its event loop;
    tensorstore's other reads still finish, on tensorstore's own threads, and each reports
    to that closed loop: a ``RuntimeError('Event loop is closed')`` traceback, dozens of
    them, during the restore and up to a fraction of a second after it. Tensorstore hands
    each one to ``sys.unraisablehook`` or prints it to ``sys.stderr`` itself. Nothing waits
    for those reads, so both are wrapped to drop exactly that error from a thread Python did
    not start; everything else passes through unchanged. Both belong to the process: the
    CLI installs this, and a library caller may.
    """
    stderr, previous_hook = sys.stderr, sys.unraisablehook
    quiet_stderr = _AbandonedReadFilter(stderr)

    def hook(unraisable):
        value = unraisable.exc_value
        if not (_foreign_thread() and isinstance(value, RuntimeError) and _abandoned(value)):
            previous_hook(unraisable)

    def restore() -> None:
        quiet_stderr.release()
        # Whatever replaced them meanwhile (a test's capture, say) is left in place.
        if sys.stderr is quiet_stderr:
            sys.stderr = stderr
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous_hook

    sys.stderr, sys.unraisablehook = quiet_stderr, hook
    return restore


def _abandoned(value: BaseException) -> bool:
    return str(value) == "Event loop is closed"


def _foreign_thread() -> bool:
    return isinstance(threading.current_thread(), threading._DummyThread)


class _AbandonedReadFilter:
    """``sys.stderr`` less the tracebacks of :func:`quiet_abandoned_reads`: a foreign
    thread's traceback is held until its last line, then dropped if it is that error."""

    _DROPPED = "RuntimeError: Event loop is closed\n"

    def __init__(self, inner):
        self._inner, self._held, self._lock = inner, {}, threading.Lock()

    def write(self, text: str) -> int:
        if not _foreign_thread():
            return self._inner.write(text)
        key = threading.get_ident()
        with self._lock:
            held = self._held.pop(key, "") + text
            if not held.startswith("Traceback"):
                return self._inner.write(held) and len(text)
            last = held.rstrip("\n").rsplit("\n", 1)[-1]
            if not held.endswith("\n") or last.startswith((" ", "Traceback")):
                self._held[key] = held  # the traceback goes on
                return len(text)
            if not held.endswith(self._DROPPED):
                self._inner.write(held)
            return len(text)

    def release(self) -> None:
        """Writes what is still held: unfinished tracebacks are not the dropped error."""
        with self._lock:
            held, self._held = self._held, {}
        for text in held.values():
            self._inner.write(text)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _check_fits(stored, like, step: int, directory: Path) -> None:
    """Compares the stored tree's paths and shapes with ``like`` before orbax reads anything:
    one line naming the first difference, instead of orbax's error and its advice."""
    want = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    have = {
        _path(p): tuple(getattr(x, "shape", ()))
        for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    where = f"the checkpoint at step {step} in {directory} does not fit this config's train state"
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or extra:
        raise ConfigError(
            f"{where}: {'missing ' + missing[0] if missing else 'extra ' + extra[0]}"
            f" ({len(missing)} missing, {len(extra)} extra leaves)."
        )
    for key, shape in want.items():
        if have[key] != shape:
            raise ConfigError(f"{where}: {key} has shape {have[key]} there, {shape} here.")


def _path(key_path) -> str:
    # A NamedTuple field and the dict key orbax stores it under name the same leaf.
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in key_path)
    return "/".join(str(p) for p in parts)
