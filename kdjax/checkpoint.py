"""Orbax checkpoints of the train state together with the data-iterator position.

A checkpoint holds two items written in one atomic orbax step directory:
  `state`: the TrainState pytree (params, optimizer state, step, RNG, loss-specific state);
  `data`:  the input iterator's JSON state (grain's `get_state()`), so a resumed run reads the same batches.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed at any
moment leaves either the previous or the new checkpoint, never a torn one; `latest_step()` only sees
finished ones.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic + final saves and restore-latest for one work directory.

    Args:
      directory: where step directories go (created if needed).
      save_every: a save is taken when `step % save_every == 0` (and always when `force=True`).
      max_to_keep: older finished checkpoints are deleted beyond this many.
    """

    def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: Optional[dict] = None, *, force: bool = False) -> bool:
        """Saves asynchronously if `step` is due (or `force`); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores (state, data_state) at `step` (default: latest) into `abstract_state`'s shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` set (`StateSpec.abstract`
        from `kdjax.steps.train_state_spec`); arrays come back directly sharded, on any mesh.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def restore_params(self, abstract_params, step: Optional[int] = None):
        """Restores only `state.params` (e.g. a teacher's), skipping optimizer state and data position.

        `abstract_params` is the nnx.State of Params as ShapeDtypeStructs with shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        item = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        return self._manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
