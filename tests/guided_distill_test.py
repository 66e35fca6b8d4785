"""The diffusion experiments end to end on tiny configs: a killed teacher run resumes bit for bit, guided
distillation runs teacher -> classifier -> stage 1 -> stage 2 -> results, configs parse strictly."""

import json
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

from configs import diffusion_teacher as teacher_config
from configs import guided_distill as distill_config
from experiments import guided_distill
from kdjax import run
from kdjax.models.denoiser import Denoiser, DenoiserConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("module", [teacher_config, distill_config])
def test_configs_parse_their_argument_strictly(module):
    assert module.get_config(None).teacher.data.name if module is distill_config else module.get_config(None).data.name
    for arg, name in [("2d", "mixture2d"), ("digits", "digits"), ("tiny", "mixture2d"), ("digits,tiny", "digits"),
                      ("tiny, 2d", "mixture2d")]:
        c = module.get_config(arg)
        assert (c.teacher.data.name if module is distill_config else c.data.name) == name
    for bad in ("cifar", "2d,digits", "tiny,tiny", "Tiny"):
        with pytest.raises(ValueError, match="unknown config argument"):
            module.get_config(bad)


def test_invalid_distill_config_is_refused_before_any_write(tmp_path):
    c = distill_config.get_config("tiny")
    c.stage2.start_steps = 12
    c.eval.ws = (0.0, 5.0)
    with pytest.raises(run.ConfigError) as err:
        guided_distill.run_all(c, str(tmp_path / "w"))
    assert "powers of two" in str(err.value) and "w=5.0, outside" in str(err.value)
    assert not (tmp_path / "w").exists()
    c = distill_config.get_config("tiny")
    assert guided_distill.halvings(distill_config.get_config("digits")) == [32, 16, 8, 4, 2, 1]
    c.teacher_workdir = str(tmp_path / "missing")
    with pytest.raises(run.ConfigError, match="does not exist"):
        guided_distill.validate(c)


def test_stage1_student_starts_as_the_conditional_teacher():
    tcfg = DenoiserConfig(data_shape=(2,), num_classes=3, width=16, hidden=32, num_blocks=1)
    scfg = DenoiserConfig(**{**tcfg.__dict__, "guidance_embed": True})

    def init(cfg, seed):
        return jax.jit(lambda: nnx.split(Denoiser(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])()

    graph_t = nnx.graphdef(nnx.eval_shape(lambda: Denoiser(tcfg, rngs=nnx.Rngs(0))))
    graph_s = nnx.graphdef(nnx.eval_shape(lambda: Denoiser(scfg, rngs=nnx.Rngs(0))))
    teacher = jax.tree.map(lambda p: p + 0.1, init(tcfg, 0))  # nonzero output layer
    student = guided_distill.student_from_teacher(init(scfg, 1), teacher)
    z = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32)
    logsnr, labels = np.linspace(-5, 5, 6).astype(np.float32), np.arange(6) % 4
    want = jax.jit(lambda p: nnx.merge(graph_t, p)(z, logsnr, labels))(teacher)
    student_fwd = jax.jit(lambda p, w: nnx.merge(graph_s, p)(z, logsnr, labels, w))
    for w in (0.0, 3.0):
        got = student_fwd(student, np.full(6, w, np.float32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- teacher: kill and resume


def launch(workdir, *extra):
    # The three runs compile the same programs: a shared persistent compilation cache (these subprocesses only)
    # saves two of the three compilations; an executable from the cache computes exactly what a fresh one does.
    cache = os.path.join(os.path.dirname(str(workdir)), "jax-cache")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = [sys.executable, "-m", "experiments.diffusion_teacher", "--config", "configs/diffusion_teacher.py:tiny",
           "--workdir", str(workdir), f"--config.steps={STEPS}", "--config.checkpoint_every=3",
           "--config.eval_every=6", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def final_params(workdir):
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(state["params"])}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def test_teacher_killed_and_resumed_equals_uninterrupted(tmp_path):
    finish(launch(tmp_path / "straight"))  # first, alone: it fills the compilation cache
    killed_dir = tmp_path / "killed"
    proc = launch(killed_dir, "--config.debug_sleep_per_step=0.5")
    ckpt_dir = killed_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= 6 for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert done and done[-1] < STEPS, done
    out = finish(launch(killed_dir))
    assert f"resumed from step {done[-1]}" in out
    want, got = final_params(tmp_path / "straight"), final_params(killed_dir)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # bitwise
    # A resume with a trajectory-changing config is refused.
    proc = launch(killed_dir, "--config.p_uncond=0.3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "p_uncond" in out


# ---------------------------------------------------------------- guided distillation end to end


def test_guided_distill_end_to_end_on_tiny_digits(tmp_path):
    c = distill_config.get_config("digits,tiny")
    c.teacher.steps, c.teacher.warmup_steps = 2, 0
    c.teacher.classifier.steps = 2
    workdir = str(tmp_path / "gd")
    result = guided_distill.run_all(c, workdir, command="test")
    for name in ("results.md", "results.json", "fd_vs_steps.png", "samples_teacher_2.png", "samples_stage1_2.png",
                 "samples_student_1.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for stage in ("teacher", "teacher/classifier", "stage1", "stage2_n1"):
        assert json.load(open(os.path.join(workdir, stage, "config.json"))), stage
    rows = result["rows"]
    models = {(r["model"], r["steps"]) for r in rows}
    assert models == {("teacher", 2), ("stage1", 2), ("student", 1)}
    assert len(rows) == 3 * len(c.eval.ws) * len(c.eval.clip)
    for r in rows:
        # The guided teacher runs cond + null: 2 evaluations per step; students 1.
        assert r["evals"] == (2 if r["model"] == "teacher" else 1) * r["steps"], r
        assert np.isfinite(r["fd"]) and 0 <= r["accuracy"] <= 1 and 0 <= r["precision"] <= 1
        if r["model"] == "teacher":
            assert r["rmse_to_teacher"] == 0.0
    record = json.load(open(os.path.join(workdir, "results.json")))
    assert set(record["stage_times"]) == {"teacher", "classifier", "stage1", "stage2_n1"}
    assert "| student | 1 |" in open(os.path.join(workdir, "results.md")).read()
