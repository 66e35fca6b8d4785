"""Host-side pieces of a training loop that every experiment shares.

The step functions in `kdjax.steps` are pure; what remains on the host is moving batches onto the mesh,
noticing a non-finite step without syncing every step, and exact evaluation.  Kept as functions (no
Trainer class) so an experiment file reads top to bottom.
"""

import itertools
import time

import jax
import numpy as np
import tqdm

from kdjax import steps


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


def check_finite(pending: list[tuple[int, dict]]):
    """Raises FloatingPointError naming the first step whose loss or gradient was not finite.

    `pending` holds (step, metrics) pairs of steps run since the last check; the train step reports
    `nonfinite` and leaves the state unchanged on such a step, so nothing is damaged by checking late.
    One device transfer for all pending steps.
    """
    if not pending:
        return
    flags = jax.device_get([m["nonfinite"][0] for _, m in pending])
    for (step, metrics), flag in zip(pending, flags):
        if flag > 0:
            loss = float(jax.device_get(metrics["loss"][0]))
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss sum {loss}); the step was not applied and "
                "the last checkpoint is intact"
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
    checkpoint_every: int,
    tokens_per_step: int,
    frozen=None,
    desc: str = "train",
    debug_sleep_per_step: float = 0.0,
):
    """Runs `train_step` from `state.step` to `total_steps` with logging, evaluation and checkpoints.

    `run_eval(step, params) -> dict` evaluates and returns the scalars it logged.  Train metrics are logged
    as token-weighted means over each window of `log_every` steps.  Finiteness is checked before every save,
    so a checkpoint never follows a bad step.  The data iterator's position is saved with the state, so a
    resumed run sees exactly the batches an uninterrupted one would.
    Returns (state, the last evaluation's scalars).
    """
    start = int(state.step)
    pending, window, t0, val = [], None, time.perf_counter(), None
    bar = tqdm.tqdm(
        range(start, total_steps),
        initial=start,
        total=total_steps,
        desc=desc,
        disable=jax.process_index() != 0,
    )
    for step in bar:
        state, metrics = train_step(state, to_device(next(data_iter), batch_shardings), frozen)
        done = step + 1
        pending.append((done, metrics))
        window = steps.add_metrics(window, metrics)
        if debug_sleep_per_step:
            time.sleep(debug_sleep_per_step)
        if done % log_every == 0 or done % checkpoint_every == 0 or done == total_steps:
            check_finite(pending)
            pending = []
        if done % log_every == 0 or done == total_steps:
            m = steps.reduce_metrics(window)
            rate = log_every * tokens_per_step / (time.perf_counter() - t0)
            m.pop("nonfinite", None)
            writer.write(done, {**{f"train/{k}": v for k, v in m.items()}, "train/tokens_per_s": rate})
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
            window, t0 = None, time.perf_counter()
        if done % eval_every == 0 or done == total_steps:
            val = run_eval(done, state.params)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
        checkpointer.save(done, state, data_iter.get_state(), force=done == total_steps)
    if val is None:  # resumed after the last step: evaluate what was restored
        val = run_eval(start, state.params)
    return state, val
