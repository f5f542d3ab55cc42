"""Orbax checkpoints of the train state in ``WORKDIR/checkpoints/<step>``."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores a :class:`metajax.train.TrainState` with an orbax CheckpointManager.

    Saves are synchronous: a run killed right after ``save`` returns keeps that
    step, and the next train step can donate the state's buffers safely. Orbax
    writes into a temporary directory and renames it when complete, so a
    checkpoint interrupted by SIGKILL is never restored.
    """

    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """The checkpoint at ``step`` (default: latest), shaped and sharded like ``like``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
