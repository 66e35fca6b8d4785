"""CFG distillation end to end on the tiny config, as the command line runs it: every output is written, a run
SIGKILLed in the middle of a student's training resumes to the uninterrupted result bit for bit, and a run whose
teacher, classifier and student lost their last checkpoints (and whose evaluation lost its records) retrains
and re-evaluates to the same result.

The runs are subprocesses on one CPU device sharing a persistent compilation cache (only these subprocesses use
it): the first fills it, the later ones load the same executables, which compute exactly what a fresh
compilation does.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import cfg_distill as config_lib
from kdjax.data import categories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("teacher", "classifier", "student_b0", "student_b0.5")
TIMING = ("ms_per_token",)  # measured wall time: the one field two identical runs may differ in


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgd")
    data = root / "data"
    c = config_lib.get_config("tiny").data
    # Tokenizer and token arrays built once, before any subprocess, so that runs never race on the cache.
    categories.load_conditional_data(vocab_size=c.vocab_size, seq_len=c.seq_len, cache_dir=str(data),
                                     max_files=c.max_files, val_fraction=c.val_fraction)
    return root


def launch(shared, workdir, *extra):
    # One CPU device (as in a Colab notebook); the suite's persistent compilation cache (conftest.py) is
    # inherited, so the runs after the first, and the cfg_distill notebook, load these programs.
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.cfg_distill", "--config", "configs/cfg_distill.py:tiny",
           "--workdir", str(workdir), f"--config.data.cache_dir={shared / 'data'}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def straight(shared):
    workdir = shared / "straight"
    finish(launch(shared, workdir))
    return workdir


def final_params(stage_dir):
    ckpt = os.path.join(stage_dir, "checkpoints")
    step = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), "state"))
    return step, dict(_flatten(state["params"]))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def rows(workdir):
    record = json.load(open(os.path.join(workdir, "results.json")))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in record["rows"]]


def assert_same_run(got, want):
    for stage in STAGES:
        (step_g, pg), (step_w, pw) = final_params(got / stage), final_params(want / stage)
        assert step_g == step_w and pg.keys() == pw.keys(), stage
        for key in pw:
            np.testing.assert_array_equal(pg[key], pw[key], err_msg=f"{stage}{key}")  # bitwise
    assert rows(got) == rows(want)


def test_end_to_end_writes_every_output(straight):
    for name in ("results.md", "results.json", "pareto.png", "teacher/model_config.json", "teacher/tokenizer.json",
                 "classifier/classifier_config.json", "student_b0.5/wall_time.json"):
        assert os.path.getsize(straight / name) > 0, name
    record = json.load(open(straight / "results.json"))
    models = [r["model"] for r in record["rows"]]
    assert models == ["teacher_g1", "teacher_g2", "teacher_g3", "teacher_g5", "student_b0", "student_b0.5",
                      "interp_k0", "interp_k0.25", "interp_k0.5", "interp_k0.75", "interp_k1"]
    by = {r["model"]: r for r in record["rows"]}
    assert [by[m]["forwards_per_token"] for m in models[:4]] == [1, 2, 2, 2]
    assert all(by[m]["forwards_per_token"] == 1 for m in models[4:])
    # kappa = 0 and 1 are the endpoints bit for bit, so their samples and metrics are the students'.
    same = lambda a, b: {k: v for k, v in by[a].items() if k not in ("model", "kind", "kappa", "beta", *TIMING)} == \
        {k: v for k, v in by[b].items() if k not in ("model", "kind", "kappa", "beta", *TIMING)}
    assert same("interp_k0", "student_b0") and same("interp_k1", "student_b0.5")
    assert set(record["targets"]) == {"quality_student_vs_cfg", "diverse_student_vs_cfg", "interpolation_above_cfg_curve"}
    for r in record["rows"]:
        assert 0 <= r["quality"] <= 1 and 0 <= r["distinct2"] <= 1 and r["length"] > 0
    assert "| teacher_g3 |" in open(straight / "results.md").read()


def test_killed_in_a_student_stage_then_rerun_equals_uninterrupted(shared, straight):
    workdir = shared / "killed"
    proc = launch(shared, workdir, "--config.debug_sleep_per_step=0.5")
    ckpt_dir = workdir / "student_b0.5" / "checkpoints"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert done and done[-1] < config_lib.get_config("tiny").student.steps, done
    assert not (workdir / "results.json").exists()
    out = finish(launch(shared, workdir))
    assert f"resumed from step {done[-1]}" in out
    assert_same_run(workdir, straight)


def test_every_stage_resumes_from_an_earlier_checkpoint(shared, straight):
    workdir = shared / "rewound"
    shutil.copytree(straight, workdir)
    for stage in STAGES[:3]:
        ckpt = workdir / stage / "checkpoints"
        steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
        assert len(steps) >= 2, (stage, steps)
        shutil.rmtree(ckpt / str(steps[-1]))  # as if killed just before its last save
    for name in os.listdir(workdir / "eval"):
        if name != "wall_time.json":
            os.remove(workdir / "eval" / name)
    os.remove(workdir / "results.json")
    out = finish(launch(shared, workdir))
    assert out.count("resumed from step") == 4  # three rewound stages and the finished student
    assert_same_run(workdir, straight)
