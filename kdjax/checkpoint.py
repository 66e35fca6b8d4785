"""Orbax checkpoints of the train state together with the data-iterator position, verified on restore.

A checkpoint holds two items written in one atomic orbax step directory:
  `state`: the TrainState pytree (params, optimizer state, step, RNG, loss-specific state);
  `data`:  the input iterator's JSON state (grain's `get_state()`), so a resumed run reads the same batches.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed at any
moment leaves either the previous or the new checkpoint, never a torn one; `latest_step()` only sees
finished ones.

Integrity, on top of orbax: once a save has completed, a checksum record `<step>/kdjax_checksum.json`
(sha256 over every file of the step, and their sizes) is written beside the data.  `restore` checks it and
that every restored value is finite; a checkpoint that fails (a flipped byte, a truncated or missing file,
non-finite values) is named in a warning, moved aside to `corrupt-<step>-<time>` (never deleted) and the
newest good one is used instead; if none is good, `CheckpointError` says so.  A finished checkpoint without
a record (the process died between orbax's rename and the record) is accepted if it restores and is finite,
and gets its record then.  Records assume a POSIX filesystem shared by all processes (as orbax does).
"""

import concurrent.futures
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from kdjax import hostio

RECORD = "kdjax_checksum.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a requested one is damaged."""


def _all_finite(tree) -> bool:
    from kdjax import steps  # pylint: disable=g-import-not-at-top  (steps imports the model stack)

    return bool(jax.jit(steps.tree_all_finite)(tree))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    """Periodic + final saves and verified restore-latest for one work directory.

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
        self._writer = jax.process_index() == 0
        # Checksums are computed off the training thread; one at a time, in save order.
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdjax-ckpt-hash")
        self._recording = {}  # step -> future

    # -- what exists -------------------------------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def describe_latest(self) -> str:
        """'checkpoint of step N (<dir>)' for the newest finished checkpoint, or that there is none."""
        self.wait()
        step = self.latest_step()
        if step is None:
            return f"no checkpoint has been written yet in {self.directory}"
        return f"the latest good checkpoint is step {step} ({self.step_dir(step)})"

    # -- saving ------------------------------------------------------------------------------------------

    def save(self, step: int, state, data_state: Optional[dict] = None, *, force: bool = False) -> bool:
        """Saves asynchronously if `step` is due (or `force`); returns whether a save started.

        The caller must have checked the state is finite (`kdjax.loop.train_loop` does, on device).
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        started = self._manager.save(step, args=args, force=force)
        self._record_finished(exclude=step if started else None)
        return started

    def _record_finished(self, exclude=None):
        """Queues a checksum record for every finished step that has none (not the one being saved)."""
        if not self._writer:
            return
        for step in self._manager.all_steps():
            if step == exclude or step in self._recording:
                continue
            if not os.path.exists(os.path.join(self.step_dir(step), RECORD)):
                self._recording[step] = self._hasher.submit(self._write_record, step)

    def _write_record(self, step):
        step_dir = self.step_dir(step)
        try:
            digest, sizes = hostio.hash_directory(step_dir, exclude=(RECORD,))
            hostio.write_json_atomically(
                os.path.join(step_dir, RECORD), {"step": step, "sha256": digest, "files": sizes}, make_parents=False
            )
        except FileNotFoundError:  # max_to_keep removed the step meanwhile: nothing to record
            pass

    def wait(self):
        """Blocks until pending asynchronous saves are on disk and their checksum records are written."""
        self._manager.wait_until_finished()
        self._record_finished()
        for future in list(self._recording.values()):
            future.result()
        self._recording.clear()

    def close(self):
        try:
            self.wait()
        finally:
            self._manager.close()
            self._hasher.shutdown(wait=True)

    # -- verification and restore ------------------------------------------------------------------------

    def verify(self, step: int) -> Optional[str]:
        """None if step's files match its checksum record (or it has none yet); else what is wrong."""
        step_dir = self.step_dir(step)
        record_path = os.path.join(step_dir, RECORD)
        if not os.path.exists(record_path):
            return None
        try:
            record = hostio.read_json(record_path)
        except (OSError, ValueError) as e:
            return f"its checksum record is unreadable ({_first_line(e)})"
        digest, sizes = hostio.hash_directory(step_dir, exclude=(RECORD,))
        if digest == record["sha256"]:
            return None
        changed = sorted(
            f for f in set(sizes) | set(record["files"]) if sizes.get(f) != record["files"].get(f)
        )
        detail = f"; files missing or resized: {changed[:5]}" if changed else "; a file's bytes changed"
        return f"its files do not match the checksum written after the save{detail}"

    def _quarantine(self, step: int, problem: str):
        aside = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self._writer:
            os.rename(self.step_dir(step), aside)
            hostio.fsync_dir(self.directory)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            multihost_utils.sync_global_devices(f"kdjax checkpoint {step} moved aside")
        logging.warning("checkpoint %s is unusable: %s; moved aside to %s", step, problem, aside)
        print(f"warning: checkpoint of step {step} is unusable ({problem}); moved it aside to {aside}")
        self._manager.reload()

    def _verify_everywhere(self, step) -> Optional[str]:
        """`verify` on process 0 only (hashing a large checkpoint once, not once per host), its verdict
        shared with every process so that all fall back the same way."""
        if jax.process_count() == 1:
            return self.verify(step)
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        import numpy as np  # pylint: disable=g-import-not-at-top

        problem = self.verify(step) if self._writer else None
        bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if bad and problem is None:
            problem = "process 0 found its files do not match the checksum written after the save"
        return problem

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (every process gets the same answer, so all act alike)."""
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        import numpy as np  # pylint: disable=g-import-not-at-top

        return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))

    def _restore_one(self, step, abstract_state):
        """((state, data), None), or (None, why the checkpoint is damaged), or raises CheckpointError when it
        cannot be restored although its files are intact (the damage is elsewhere: leave the files alone)."""
        problem = self._verify_everywhere(step)
        if problem is not None:
            return None, problem
        recorded = os.path.exists(os.path.join(self.step_dir(step), RECORD))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        error, restored = None, None
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # pylint: disable=broad-except  (classified below)
            error = e
        if self._any_process(error is not None):
            why = _first_line(error) if error is not None else "on another process"
            if recorded:
                # The bytes are the ones written: an I/O error, memory, a changed state structure or orbax
                # version, not a damaged checkpoint.  Moving it aside would throw good work away.
                raise CheckpointError(
                    f"checkpoint of step {step} in {self.directory} matches its checksum but cannot be restored "
                    f"into this run's state ({why}); nothing was moved"
                ) from error
            return None, f"it cannot be read and has no checksum record to tell why ({why})"
        if self._any_process(not _all_finite(restored["state"])):
            return None, "it holds non-finite values"
        return (restored["state"], restored["data"]), None

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores (state, data_state) at `step` (default: the newest usable one) into `abstract_state`'s
        shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` set (`StateSpec.abstract`
        from `kdjax.steps.train_state_spec`); arrays come back directly sharded, on any mesh.  Without
        `step`, a damaged newest checkpoint is moved aside (with a warning) and the next one is tried.
        Raises CheckpointError when no checkpoint is usable, when the requested `step` is damaged, or when an
        intact checkpoint (its checksum matches) cannot be restored into this state: then nothing is moved.
        """
        if step is not None:
            result, problem = self._restore_one(step, abstract_state)
            if problem is not None:
                raise CheckpointError(f"checkpoint of step {step} in {self.directory} is unusable: {problem}")
            return result
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        for candidate in reversed(steps):
            result, problem = self._restore_one(candidate, abstract_state)
            if problem is None:
                self._record_finished()  # a checkpoint restored without a record gets one now
                return result
            self._quarantine(candidate, problem)
        raise CheckpointError(
            f"none of the checkpoints {steps} in {self.directory} is usable (each was moved aside to "
            "corrupt-<step>-<time>, see the warnings above); rerunning starts from scratch"
        )

    def restore_params(self, abstract_params, step: Optional[int] = None):
        """Restores only `state.params` (e.g. a teacher's), skipping optimizer state and data position.

        `abstract_params` is the nnx.State of Params as ShapeDtypeStructs with shardings.  Read-only use of
        someone's work directory: a damaged checkpoint raises CheckpointError (nothing is moved).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        problem = self._verify_everywhere(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} is unusable: {problem}")
        item = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        try:
            params = self._manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointError(
                f"checkpoint of step {step} in {self.directory} cannot be read: {_first_line(e)}"
            ) from e
        if not _all_finite(params):
            raise CheckpointError(f"checkpoint of step {step} in {self.directory} holds non-finite parameters")
        return params
