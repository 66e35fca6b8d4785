"""Host-side pieces of a training loop that every experiment shares.

The step functions in `kdjax.steps` are pure; what remains on the host is moving batches onto the mesh,
noticing a non-finite step without syncing every step, and exact evaluation.  Kept as functions (no
Trainer class) so an experiment file reads top to bottom.
"""

import itertools
import time

import jax
import numpy as np

from kdjax import steps
from kdjax.progress import progress_bar


def to_device(host_batch: dict, shardings: dict) -> dict:
    """This process's rows of a batch -> global arrays on the mesh.

    Each process passes only its own rows ([B / process_count, ...]); `make_array_from_process_local_data`
    stitches them into the global batch.  Keys without a sharding (e.g. `example_id`, int64) stay on host.
    """
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
        for k, v in host_batch.items()
        if k in shardings
    }


def check_finite(pending: list[tuple[int, dict]], checkpointer=None):
    """Raises FloatingPointError naming the first step that was not applied because something was not finite.

    `pending` holds (step, metrics) pairs of steps run since the last check; the train step reports
    `nonfinite` and leaves the state unchanged on such a step, so nothing is damaged by checking late (one
    device transfer for all pending steps).  The message says what was not finite (the loss, the gradient,
    or what the update produced) and, when `checkpointer` is given, which checkpoint is the latest good one
    (or that there is none) once every save in flight has finished.
    """
    if not pending:
        return
    flags = jax.device_get([m["nonfinite"][0] for _, m in pending])
    for (step, metrics), flag in zip(pending, flags):
        if flag > 0:
            host = steps.reduce_metrics({k: metrics[k] for k in ("loss", "grad_norm")})
            loss, grad_norm = host["loss"], host["grad_norm"]
            if not np.isfinite(loss):
                what = "the loss was not finite"
            elif not np.isfinite(grad_norm):
                what = "the gradient was not finite"
            else:
                what = (
                    "the update made the parameters or the optimizer state non-finite (a learning rate too "
                    "large for this model?)"
                )
            where = f"; {checkpointer.describe_latest()}" if checkpointer is not None else ""
            raise FloatingPointError(
                f"step {step}: {what} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); the step was not "
                f"applied and nothing non-finite was saved{where}"
            )


def evaluate(eval_fn, params, batches, shardings: dict, *, frozen=None, max_batches: int = 0) -> dict:
    """Token-weighted means of `eval_fn`'s (sum, count) metrics over `batches` (all if max_batches=0)."""
    if max_batches:
        batches = itertools.islice(batches, max_batches)
    total = None
    for host_batch in batches:
        total = steps.add_metrics(total, eval_fn(params, to_device(host_batch, shardings), frozen))
    if total is None:
        raise ValueError("no evaluation batches")
    return steps.reduce_metrics(total)


def train_loop(
    *,
    state,
    train_step,
    data_iter,
    batch_shardings: dict,
    checkpointer,
    writer,
    run_eval,
    total_steps: int,
    log_every: int,
    eval_every: int,
    tokens_per_step: int,
    frozen=None,
    desc: str = "train",
    debug_sleep_per_step: float = 0.0,
):
    """Runs `train_step` from `state.step` to `total_steps` with logging, evaluation and checkpoints.

    `run_eval(params) -> {name: float}` evaluates; the loop logs what it returns at every `eval_every` steps
    and at the end.  Train metrics are logged as token-weighted means over each window of `log_every` steps,
    with the window's measured throughput.  Before every save the pending steps' finiteness flags are checked
    and the state itself is checked on device, so a checkpoint never holds a non-finite value.  The data
    iterator's position is saved with the state, so a resumed run sees exactly the batches an uninterrupted
    one would.  A rerun of a finished job trains nothing and logs nothing again: it evaluates the restored
    state and returns that.
    Returns (state, the last evaluation's scalars).
    """
    start = int(state.step)
    if start >= total_steps:
        return state, run_eval(state.params)
    check_state = jax.jit(steps.tree_all_finite)
    pending, window, window_steps, t0, val = [], None, 0, time.perf_counter(), None
    reset_clock = False
    bar = progress_bar(range(start, total_steps), initial=start, total=total_steps, desc=desc)
    for step in bar:
        state, metrics = train_step(state, to_device(next(data_iter), batch_shardings), frozen)
        done = step + 1
        pending.append((done, metrics))
        window = steps.add_metrics(window, metrics)
        window_steps += 1
        if debug_sleep_per_step:
            time.sleep(debug_sleep_per_step)
        save_due = checkpointer.should_save(done) or done == total_steps
        if done % log_every == 0 or save_due:
            check_finite(pending, checkpointer)
            pending = []
        if done % log_every == 0 or done == total_steps:
            m = steps.reduce_metrics(window)
            rate = window_steps * tokens_per_step / (time.perf_counter() - t0)
            m.pop("nonfinite", None)
            writer.write(done, {**{f"train/{k}": v for k, v in m.items()}, "train/tokens_per_s": rate})
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
            window, window_steps = None, 0
            reset_clock = True
        if done % eval_every == 0 or done == total_steps:
            val = run_eval(state.params)
            writer.write(done, val)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
        if save_due:
            if not bool(check_state(state)):
                raise FloatingPointError(
                    f"step {done}: the train state holds non-finite values; not saving it; "
                    f"{checkpointer.describe_latest()}"
                )
            checkpointer.save(done, state, data_iter.get_state(), force=done == total_steps)
        if reset_clock:  # after evaluation and saving: the next window times training steps only
            t0, reset_clock = time.perf_counter(), False
    return state, val
