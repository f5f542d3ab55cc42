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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config")
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
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like,
        )
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"the checkpoint at step {step} in {self.directory} does not fit "
                f"this config's train state ({first[:200]})."
            ) from None
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
