"""Two processes x 4 fake CPU devices over 127.0.0.1 behave like one process with 8 devices.

One launch of 2 worker processes (tests/multiprocess_worker.py, jax.distributed with gloo collectives) does
what a 2-host job does: precomputes the teacher store (train and validation splits, disjoint shards per
process, one manifest), then runs 3 offline lm_distill steps from it, writing one orbax checkpoint.  This
process does the same with 1 process and 8 devices, and compares: the stores read back identically, the
checkpoints hold the same parameters, and the 2-process checkpoint restores here, on other meshes.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from configs import lm_distill as distill_config
from configs import lm_pretrain as pretrain_config
from configs import precompute_teacher as precompute_config
from experiments import lm_distill, lm_pretrain, precompute_teacher
from kdjax import checkpoint, distributed, pretrained, sharding, steps, teacher_store
from kdjax.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILES = 12
STEPS = 3
# The layout docs/scaling.md recommends: tensor inside a host, FSDP across hosts.  Devices are ordered
# process-major, so the mesh is [[p0, p0], [p0, p0], [p1, p1], [p1, p1]] (fsdp x tensor): every parameter and
# moment is split over both processes, and no process can write a checkpoint alone.
MESH = {"data": 1, "fsdp": 4, "tensor": 2}
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
# Generous (2 shared CPU cores, two JAX start-ups and compiles); a hang is killed, not waited on.
TIMEOUT_S = 900

# Tolerance: both runs do the same float32 math on the same 16 examples per step, but the 2-process run
# stacks its rows in another order (process p holds shuffled elements p, p+2, ...) and reduces across
# processes through gloo, so sums are re-associated: rounding-level (~1e-7 relative) differences that
# three AdamW steps amplify at most to ~1e-6 on parameters of size ~0.01-1.
ATOL, RTOL = 2e-5, 1e-4


def _distill_overrides(env):
    return {
        "data.cache_dir": env["cache"],
        "data.max_files": MAX_FILES,
        "teacher.workdir": env["teacher"],
        "steps": STEPS,
        "warmup_steps": 1,
        "log_every": 1,
        "eval_every": STEPS,
        "checkpoint_every": STEPS,
        "mesh": MESH,
    }


def _precompute_overrides(env, split):
    return {
        "data.cache_dir": env["cache"],
        "data.max_files": MAX_FILES,
        "teacher.workdir": env["teacher"],
        "split": split,
    }


def _apply(config, overrides):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import multiprocess_worker  # pylint: disable=g-import-not-at-top

    return multiprocess_worker.apply(config, overrides)


def _launch(spec, logdir):
    """Runs NUM_PROCESSES workers on `spec`; returns their logs.  Kills all of them if one fails or hangs."""
    spec_path = os.path.join(logdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    port = portpicker.pick_unused_port()
    procs, logs = [], []
    try:
        for pid in range(NUM_PROCESSES):
            env = dict(
                os.environ,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                JAX_PLATFORMS="cpu",
                JAX_DEFAULT_MATMUL_PRECISION="highest",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                KDJAX_COORDINATOR=f"127.0.0.1:{port}",
                KDJAX_NUM_PROCESSES=str(NUM_PROCESSES),
                KDJAX_PROCESS_ID=str(pid),
            )
            log = open(os.path.join(logdir, f"worker{pid}.log"), "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"), spec_path],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            # A failed worker leaves its peer blocked in a collective: stop waiting at the first failure.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        tails = "\n".join(
            f"--- worker {i} (exit {c}) ---\n{t[-4000:]}" for i, (c, t) in enumerate(zip(codes, texts))
        )
        raise AssertionError(f"multi-process run failed (exit codes {codes}):\n{tails}")
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Teacher, then the same store + 3 distillation steps by 2 processes and by this (1) process."""
    base = tmp_path_factory.mktemp("mp")
    env = {name: str(base / name) for name in ("cache", "teacher", "store1", "store2", "kd1", "kd2", "logs")}
    os.makedirs(env["logs"])
    config = pretrain_config.get_config("tiny")
    config.data.cache_dir, config.data.max_files, config.steps = env["cache"], MAX_FILES, 6
    config.eval_every = config.checkpoint_every = 6
    lm_pretrain.train(config, env["teacher"])  # also fills the shared token / tokenizer cache

    splits = ("train", "validation")
    spec = {
        "precompute": [_precompute_overrides(env, s) for s in splits],
        "precompute_workdir": env["store2"],
        "distill": {**_distill_overrides(env), "store_dir": os.path.join(env["store2"], "store-train")},
        "distill_workdir": env["kd2"],
    }
    start = time.perf_counter()
    logs = _launch(spec, env["logs"])
    env["two_process_s"] = time.perf_counter() - start
    env["logs_text"] = logs

    for s in splits:
        pc = _apply(precompute_config.get_config("tiny"), _precompute_overrides(env, s))
        # The same global teacher batch as the 2 processes together (each calls the teacher on batch_size
        # examples over its 4 devices): 2 examples per device in both runs, so each device runs the same
        # program on the same shapes and the stores can be compared bit for bit.  (With 1 example per device
        # XLA's CPU matmuls round differently in the last float32 bit, which bf16 log-probs can show.)
        pc.batch_size *= NUM_PROCESSES
        precompute_teacher.precompute(pc, env["store1"])
    one = _apply(distill_config.get_config("tiny"), _distill_overrides(env))
    one.store_dir = os.path.join(env["store1"], "store-train")
    lm_distill.train(one, env["kd1"])
    return env


def _restore(workdir, mesh):
    """The final TrainState of a distillation workdir, restored in this process onto `mesh`."""
    t = pretrained.load_workdir(workdir, mesh=mesh, rules=sharding.DEFAULT_RULES)  # also checks the files
    config = distill_config.get_config("tiny")
    # Only the optimizer's structure matters here (the restore target); the values come from the checkpoint.
    tx = steps.make_optimizer(learning_rate=config.learning_rate, warmup_steps=1, total_steps=STEPS)
    spec = steps.train_state_spec(
        lambda r: Transformer(t.config, rngs=r), tx, seed=config.seed, mesh=mesh, rules=sharding.DEFAULT_RULES
    )
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    assert ckpt.latest_step() == STEPS
    state, data_state = ckpt.restore(spec.abstract)
    ckpt.close()
    return state, data_state, t.params


@pytest.mark.parametrize("split", ["train", "validation"])
def test_store_by_two_processes_reads_back_as_by_one(runs, split):
    one = os.path.join(runs["store1"], f"store-{split}")
    two = os.path.join(runs["store2"], f"store-{split}")
    report = teacher_store.verify_store(two)
    assert report["ok"], report["problems"]
    with open(os.path.join(one, "manifest.json")) as f1, open(os.path.join(two, "manifest.json")) as f2:
        m1, m2 = json.load(f1), json.load(f2)
    assert m1["num_shards"] >= NUM_PROCESSES  # both processes wrote shards (shard s by process s % 2)
    assert m2 == m1  # one consistent manifest: same identity, shard checksums and sizes
    s1, s2 = teacher_store.open_store(one), teacher_store.open_store(two)
    ids = range(len(s1))
    a, b = s1.get(ids), s2.get(ids)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_processes_train_like_one(runs):
    mesh = sharding.make_mesh(MESH)
    two, data_two, _ = _restore(runs["kd2"], mesh)
    one, data_one, _ = _restore(runs["kd1"], mesh)
    assert int(two.step) == int(one.step) == STEPS
    assert data_two == data_one  # same data position: the global batch sequence does not depend on hosts
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=RTOL)
    jax.tree.map(close, two.params, one.params)
    jax.tree.map(close, two.opt_state, one.opt_state)
    # Both logged 3 steps of finite loss (process 0 writes the metrics).
    with open(os.path.join(runs["kd2"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]


def test_two_process_checkpoint_restores_on_other_meshes(runs):
    """Written by 2 processes on (1, 4, 2); restored here onto 1 device and onto another mesh."""
    ref, _, _ = _restore(runs["kd2"], sharding.make_mesh(MESH))
    for shape, devices in (({"data": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 4}, None)):
        state, _, params = _restore(runs["kd2"], sharding.make_mesh(shape, devices=devices))
        same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        jax.tree.map(same, state, ref)
        jax.tree.map(same, params, state.params)  # the params-only restore (load_workdir) agrees
        leaf = state.params["embed"][...]
        assert leaf.sharding.mesh.shape == sharding.make_mesh(shape, devices=devices).shape


def test_initialize_settings(monkeypatch):
    """Config first, then the environment; a single process is a no-op; inconsistent settings are refused."""
    for var in (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        distributed.ENV_AUTO,
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    config = pretrain_config.get_config("tiny")
    assert distributed.settings(config) == ("", 1, 0)
    assert distributed.settings(None) == ("", 1, 0)
    assert distributed.initialize(config) is False  # one process: nothing to join, JAX untouched
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.settings(config) == ("127.0.0.1:1234", 4, 3)
    config.distributed.coordinator_address = "10.0.0.1:8476"
    config.distributed.num_processes, config.distributed.process_id = 2, 1
    assert distributed.settings(config) == ("10.0.0.1:8476", 2, 1)
    config.distributed.process_id = 2
    with pytest.raises(ValueError, match="not in"):
        distributed.settings(config)
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID)
    config.distributed.coordinator_address, config.distributed.process_id = "", 0
    with pytest.raises(ValueError, match="coordinator"):
        distributed.settings(config)
    # Every config that launches a run carries the settings.
    for get in (distill_config.get_config, precompute_config.get_config):
        assert get("tiny").distributed.to_dict() == pretrain_config.get_config().distributed.to_dict()
