"""One process of a multi-process kdjax run over loopback; started (twice) by tests/multiprocess_test.py.

    python tests/multiprocess_worker.py SPEC.json

The environment names the run (KDJAX_COORDINATOR, KDJAX_NUM_PROCESSES, KDJAX_PROCESS_ID) and this
process's fake devices (XLA_FLAGS, JAX_PLATFORMS=cpu); SPEC.json says what to run, in order:
  {"precompute": [{config overrides}, ...], "precompute_workdir": dir,
   "distill": {config overrides}, "distill_workdir": dir}
Overrides are dotted keys ("data.max_files": 12) applied to the `:tiny` configs.  Exactly the code path
of `python -m experiments.<name>`: `distributed.initialize(config)` first, then the experiment function.
Writes nothing of its own; the test reads what the experiments wrote.
"""

import json
import os
import sys
import time
import traceback

# The repository root, so `configs` and `experiments` import as they do under `python -m`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import lm_distill as distill_config  # noqa: E402
from configs import precompute_teacher as precompute_config  # noqa: E402
from kdjax import distributed  # noqa: E402


def apply(config, overrides):
    """Sets dotted keys of a ConfigDict (lists become tuples, as configs hold them)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    precompute_cfgs = [apply(precompute_config.get_config("tiny"), o) for o in spec.get("precompute", [])]
    distill_cfg = apply(distill_config.get_config("tiny"), spec["distill"]) if "distill" in spec else None
    # Before anything touches JAX: every process joins the run (settings from the environment here).
    joined = distributed.initialize(distill_cfg or precompute_cfgs[0])
    again = distributed.initialize(distill_cfg or precompute_cfgs[0])  # idempotent: a second call is a no-op
    if not (joined and again):
        raise RuntimeError(f"distributed.initialize returned {joined}, then {again}; want True, True")
    import jax  # pylint: disable=g-import-not-at-top

    from experiments import lm_distill, precompute_teacher  # pylint: disable=g-import-not-at-top

    assert jax.process_count() == int(os.environ["KDJAX_NUM_PROCESSES"]), jax.process_count()
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
        f"{jax.device_count()} global devices",
        flush=True,
    )
    for config in precompute_cfgs:
        precompute_teacher.precompute(config, spec["precompute_workdir"])
    if distill_cfg is not None:
        result = lm_distill.train(distill_cfg, spec["distill_workdir"])
        print("final: " + json.dumps(result), flush=True)
    # Leave together: a process exiting while its peer still runs a collective would fail the peer.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("multiprocess_worker done")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:  # pylint: disable=broad-except
        # Exit now: a normal exit would wait (minutes) in jax.distributed's shutdown barrier for a peer that
        # may be blocked in a collective waiting for us.  The test sees the exit code and kills the peer.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
