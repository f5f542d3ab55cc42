"""Orbax checkpoints in ``WORKDIR/checkpoints/<step>``: the train state and its config.

Each checkpoint carries the config it was trained with (``config`` item, JSON), so a run
resumed with changed settings keeps the record of what every checkpoint came from.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from metajax.run.config import ConfigError


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
        """
        step = self.latest_step() if step is None else step
        _check_fits(self.manager.item_metadata(step)["state"], like, step, self.directory)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like,
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return out.state

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
