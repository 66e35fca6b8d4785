"""Host-side pieces of a training loop that every experiment shares.

The step functions in `kdjax.steps` are pure; what remains on the host is moving batches onto the mesh,
noticing a non-finite step without syncing every step, and exact evaluation.  Kept as functions (no
Trainer class) so an experiment file reads top to bottom.
"""

import itertools

import jax
import numpy as np

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
