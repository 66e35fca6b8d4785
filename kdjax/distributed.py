"""Joining JAX's multi-controller runtime: one Python process per host, all running the same program.

    initialize(config)   call first thing in `main`, before any JAX computation

Where the settings come from, first match wins:
  1. `config.distributed.{coordinator_address, num_processes, process_id}` (empty / 1 / 0 = unset);
  2. the environment: KDJAX_COORDINATOR ("host:port"), KDJAX_NUM_PROCESSES, KDJAX_PROCESS_ID;
  3. KDJAX_DISTRIBUTED=auto (what scripts/launch_tpu.sh sets), or TPU_WORKER_HOSTNAMES listing several
     workers (GKE): `jax.distributed.initialize()` with no arguments, which detects the coordinator and
     this worker's id itself (Cloud TPU VM metadata, GKE, SLURM, Open MPI).  A plain GCE TPU VM exports
     no such variable, so a pod launch must set KDJAX_DISTRIBUTED=auto (or one of 1-2).

A single process (nothing set, no TPU pod detected) is a no-op: the same code then runs on one host's
devices, which is how tests and laptops run it.  After `initialize`, `jax.devices()` lists every
process's devices, `jax.process_index()` / `jax.process_count()` are set, and a mesh made from
`jax.devices()` spans all hosts: the step code does not change.

On CPU, cross-process collectives need an implementation (XLA's default has none): gloo over TCP,
which is what the loopback tests use.  It must be chosen before the CPU backend starts, hence here.
"""

import os
from typing import Any, Optional

import jax

ENV_COORDINATOR = "KDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KDJAX_PROCESS_ID"
ENV_AUTO = "KDJAX_DISTRIBUTED"  # "auto": let jax.distributed detect the cluster (TPU pods do so anyway)

# The settings of the last successful initialize() in this process, to make repeated calls no-ops and to
# refuse a second call that asks for something else.
_initialized_with: Optional[tuple] = None


def settings(config: Any = None) -> tuple[str, int, int]:
    """(coordinator_address, num_processes, process_id) from `config.distributed`, else the environment.

    `config` may be None or a ConfigDict without a `distributed` field.  Unset values come back as
    ("", 1, 0).  Raises ValueError on an inconsistent combination (several processes but no
    coordinator, or a process id out of range).
    """
    dist = getattr(config, "distributed", None) if config is not None else None
    get = lambda key, default: (dist.get(key, default) if dist is not None else default)
    address = str(get("coordinator_address", "") or os.environ.get(ENV_COORDINATOR, ""))
    num = int(get("num_processes", 1) or 1)
    if num == 1:
        num = int(os.environ.get(ENV_NUM_PROCESSES, "1") or 1)
    pid = int(get("process_id", 0) or 0)
    if pid == 0:
        pid = int(os.environ.get(ENV_PROCESS_ID, "0") or 0)
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"process_id {pid} is not in [0, num_processes={num})")
    if num > 1 and not address:
        raise ValueError(
            f"num_processes={num} needs a coordinator address: set config.distributed.coordinator_address "
            f"or {ENV_COORDINATOR}=host:port (the address of process 0, reachable from every process)"
        )
    return address, num, pid


def _on_tpu_pod() -> bool:
    # GKE TPU pods export the worker list; more than one entry means a multi-host slice.  Read from the
    # environment only: asking JAX for its backend here would start it before initialize().
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _platform_is_cpu() -> bool:
    # Without starting a backend: JAX_PLATFORMS names what will be used.  Unset is treated as CPU too
    # (a multi-process launch with no platform named may well land on CPU, and the setting is harmless
    # elsewhere); only an explicit accelerator platform skips it.
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    first = platforms.split(",")[0].strip().lower()
    return first in ("", "cpu")


def initialize(config: Any = None) -> bool:
    """Joins the multi-process runtime described by `config.distributed` / the environment.

    Returns True if this process is now part of a multi-process run, False for a single process (a no-op).
    Idempotent: a second call with the same settings does nothing; with different settings it raises.
    Must run before any JAX computation (creating an array starts the backends, after which
    `jax.distributed.initialize` refuses to run).
    """
    global _initialized_with
    address, num, pid = settings(config)
    auto = num == 1 and (os.environ.get(ENV_AUTO, "").lower() == "auto" or _on_tpu_pod())
    wanted = ("auto",) if auto else (address, num, pid)
    if _initialized_with is not None or jax.distributed.is_initialized():
        if _initialized_with not in (None, wanted):
            raise RuntimeError(
                f"jax.distributed is already initialized with {_initialized_with}; asked again with {wanted}"
            )
        return True
    if num == 1 and not auto:
        return False
    if _platform_is_cpu():
        # XLA's CPU client needs to be told how to run cross-process collectives (gloo over TCP); recent
        # JAX defaults to gloo already, older releases to none, so we say it.  It only configures the CPU
        # client, so GPU / TPU runs are untouched.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    _initialized_with = wanted
    return True

