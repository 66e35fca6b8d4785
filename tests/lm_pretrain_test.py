"""End to end: the pretraining job learns, and a SIGKILLed run resumes to the uninterrupted result bit for bit."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from kdjax.data import text as text_data
from kdjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def launch(workdir, cache, *extra):
    cmd = [
        sys.executable,
        "-m",
        "experiments.lm_pretrain",
        "--config",
        "configs/lm_pretrain.py:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.cache_dir={cache}",
        f"--config.steps={STEPS}",
        "--config.checkpoint_every=4",
        "--config.eval_every=12",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    # Build tokenizer and token streams once, before any subprocess, so runs never race on the cache.
    from configs import lm_pretrain

    text_data.load_from_config(lm_pretrain.get_config("tiny").data, cache_dir=str(path))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = finish(launch(workdir, cache))
    return workdir, out


def final_params(workdir):
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    return state["params"]


def test_pretraining_lowers_validation_loss(uninterrupted):
    workdir, out = uninterrupted
    val = [r["val/ce"] for r in read_metrics(workdir) if "val/ce" in r]
    vocab = json.load(open(os.path.join(workdir, "model_config.json")))["vocab_size"]
    assert len(val) == 2 and val[1] < val[0] < math.log(vocab)
    assert val[1] < math.log(vocab) - 0.5  # well below a uniform guess
    assert "final validation loss" in out


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, cache, uninterrupted):
    workdir = tmp_path / "killed"
    proc = launch(workdir, cache, "--config.debug_sleep_per_step=0.25")
    ckpt_dir = workdir / "checkpoints"
    deadline = time.time() + 240
    # Kill once a checkpoint past the first one is finished: the run is then mid-way, with work to lose.
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= 8 for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert done and done[-1] < STEPS, done

    out = finish(launch(workdir, cache))
    assert f"resumed from step {done[-1]}" in out
    want, got = final_params(uninterrupted[0]), final_params(workdir)
    flat_want, flat_got = _flatten(want), _flatten(got)
    assert flat_want.keys() == flat_got.keys()
    for key in flat_want:
        np.testing.assert_array_equal(flat_got[key], flat_want[key], err_msg=key)  # bitwise
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice across the kill


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.lm_pretrain",
            "--config",
            "configs/lm_pretrain.py:tiny",
            "--workdir",
            str(tmp_path),
            "--config.model.num_layer=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key 'model.num_layer'" in proc.stderr and "model.num_layers" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def test_load_workdir_restores_final_params_only(uninterrupted):
    from kdjax import pretrained, sharding

    workdir, _ = uninterrupted
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # another mesh than the one it trained on
    loaded = pretrained.load_workdir(str(workdir), mesh=mesh, rules=sharding.DEFAULT_RULES)
    assert loaded.step == STEPS and loaded.tokenizer.vocab_size == loaded.config.vocab_size
    # A raw orbax restore shows each nnx.Param as {"value": array}.
    want = {k.removesuffix("/value"): v for k, v in _flatten(final_params(workdir)).items()}
    got = _flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(loaded.params)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    logits = loaded.model()(np.zeros((2, 5), np.int32))
    assert logits.shape == (2, 5, loaded.config.vocab_size)


def test_fsdp_run_applies_the_activation_constraints(cache, tmp_path):
    """The experiment traces its steps with the config's activation rules: on a data x FSDP mesh (2, 4, 1) XLA
    then gathers weights instead of replicating activations, so it logs no involuntary rematerialization
    (without the rules the embedding lookup from a table split on `embed` logs it).  The run's own compile
    log, in a fresh process with the persistent cache off so that every program is compiled."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    cmd = [sys.executable, "-m", "experiments.lm_pretrain", "--config", "configs/lm_pretrain.py:tiny",
           "--workdir", str(tmp_path / "w"), f"--config.data.cache_dir={cache}", "--config.steps=2",
           "--config.warmup_steps=1", "--config.eval_every=2", "--config.checkpoint_every=2", "--config.mesh.data=2",
           "--config.mesh.fsdp=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in proc.stdout
    assert "Involuntary full rematerialization" not in proc.stdout + proc.stderr
