"""What a user gets wrong, or what goes wrong around them, never damages a work directory or trains silently.

Each test reproduces one finding of the reliability review (issue #11) through the real experiment code:
non-finite state is never saved; a damaged checkpoint falls back to the newest good one; a resume cannot
silently change the run; a bad config fails before anything is written; a finished job's rerun logs
nothing twice; expected user errors are one line, not a traceback; throughput counts the steps it timed.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lm_pretrain as pretrain_config
from experiments import lm_pretrain
from kdjax import checkpoint, loop, run, steps
from kdjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def tiny_config(cache, **overrides):
    config = pretrain_config.get_config("tiny")
    config.data.cache_dir, config.data.max_files = str(cache), 12
    config.steps, config.checkpoint_every, config.eval_every, config.log_every = STEPS, 2, STEPS, 1
    config.warmup_steps = 1
    config.eval_batches = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A finished 4-step run with checkpoints at 2 and 4 (each with its checksum record)."""
    workdir = tmp_path_factory.mktemp("finished")
    lm_pretrain.train(tiny_config(cache), str(workdir))
    return workdir


def final_params(workdir, step=STEPS):
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.leaves(state["params"])


def snapshot(workdir):
    """{relative path: bytes} of every file: to show that nothing at all was written."""
    out = {}
    for dirpath, _, names in os.walk(workdir):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, workdir)] = open(full, "rb").read()
    return out


def _flip_a_byte(step_dir):
    files = sorted(
        os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns if "/d/" in d + "/"
    )
    data = bytearray(open(files[0], "rb").read())
    data[len(data) // 2] ^= 0x10
    open(files[0], "wb").write(bytes(data))


def _truncate(step_dir):
    files = sorted(
        os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns if "/d/" in d + "/"
    )
    with open(files[0], "r+b") as f:
        f.truncate(os.path.getsize(files[0]) // 2)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, _delete_metadata], ids=lambda f: f.__name__[1:])
def test_damaged_latest_checkpoint_falls_back_and_the_rerun_ends_where_it_would_have(
    finished, cache, tmp_path, capsys, damage
):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    damage(str(workdir / "checkpoints" / str(STEPS)))
    lm_pretrain.train(tiny_config(cache), str(workdir))
    out = capsys.readouterr().out
    assert f"checkpoint of step {STEPS} is unusable" in out and "resumed from step 2" in out
    aside = [p for p in os.listdir(workdir / "checkpoints") if p.startswith(f"corrupt-{STEPS}-")]
    assert len(aside) == 1  # moved aside, never deleted
    for got, want in zip(final_params(workdir), final_params(finished)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bitwise: steps 3-4 redone exactly


def test_no_usable_checkpoint_is_a_clear_error(finished, cache, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    for step in (2, STEPS):
        _flip_a_byte(str(workdir / "checkpoints" / str(step)))
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the checkpoints \[2, 4\] .* is usable"):
        lm_pretrain.train(tiny_config(cache), str(workdir))


def test_a_nonfinite_update_is_never_saved(cache, tmp_path):
    # The reproduction: learning_rate 1e39 makes the first update non-finite (loss and gradient are
    # finite).  The config check refuses it up front now; past that check, the step guard and the loop do.
    with pytest.raises(run.ConfigError, match="learning_rate"):
        lm_pretrain.train(tiny_config(cache, learning_rate=1e39), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    workdir = tmp_path / "w"
    # 3.4e38 is just below float32's largest number: the first AdamW update (about lr * (1 + wd * w)) is not.
    config = tiny_config(cache, learning_rate=3.4e38, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="step 1: the update made .* no checkpoint has been written yet"):
        lm_pretrain.train(config, str(workdir))
    left = os.listdir(workdir / "checkpoints")
    assert left == [], left  # no checkpoint and no orbax temporary directory


def test_the_error_names_the_latest_good_checkpoint(tmp_path):
    # The loop on its own, with a step that turns non-finite at step 5: steps 2 and 4 are saved, the error
    # names step 4, and nothing after it is written.
    class Clock:  # the step advances time by 1 s so the logged throughput is exact
        now = 0.0

    def step_fn(state, batch, frozen):
        del batch, frozen
        Clock.now += 1.0
        bad = state.step + 1 == 5
        metrics = {
            "loss": (jnp_where(bad, np.nan, 1.0), 1.0),
            "grad_norm": (1.0, 1.0),
            "nonfinite": (jnp_where(bad, 1.0, 0.0), 1.0),
        }
        return _State(state.step + 1, state.params), metrics

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2)
    writer = _ListWriter()
    state = _State(np.int32(0), np.ones(3, np.float32))
    with pytest.raises(FloatingPointError, match=r"step 5: the loss was not finite .* latest good checkpoint is step 4"):
        _run_loop(state, step_fn, ckpt, writer, total_steps=8, clock=Clock)
    ckpt.close()
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints")) == [2, 4]


def test_throughput_counts_the_steps_of_its_window(tmp_path):
    # Resumed at step 3 with log_every 5: the first window holds steps 4-5 (2 steps, 2 s), the last 6-7.
    class Clock:
        now = 0.0

    def step_fn(state, batch, frozen):
        del batch, frozen
        Clock.now += 1.0
        return _State(state.step + 1, state.params), {
            "loss": (1.0, 1.0), "grad_norm": (1.0, 1.0), "nonfinite": (0.0, 1.0)
        }

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=100)
    writer = _ListWriter()
    state = _State(np.int32(3), np.ones(3, np.float32))
    _run_loop(state, step_fn, ckpt, writer, total_steps=7, clock=Clock, log_every=5, tokens_per_step=10)
    ckpt.close()
    rates = {step: m["train/tokens_per_s"] for step, m in writer.records if "train/tokens_per_s" in m}
    assert rates == {5: pytest.approx(10.0), 7: pytest.approx(10.0)}


def test_resume_with_another_config_is_refused_before_anything_is_written(finished, cache, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    with pytest.raises(run.ConfigError) as err:
        lm_pretrain.train(tiny_config(cache, **{"model.embed_dim": 32, "learning_rate": 1e-3}), str(workdir))
    message = str(err.value)
    assert "model.embed_dim: 64 recorded, 32 now" in message and "learning_rate" in message
    assert "--config.allow_resume_changes=learning_rate,model.embed_dim" in message
    assert snapshot(workdir) == before  # model_config.json, config.json, checkpoints: untouched
    # Keys that only change logging are free; a deliberate change is allowed by name and then recorded.
    lm_pretrain.train(tiny_config(cache, log_every=2, steps=STEPS + 2, allow_resume_changes="steps"), str(workdir))
    assert json.load(open(workdir / "config.json"))["steps"] == STEPS + 2
    assert max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == STEPS + 2


def test_rerunning_a_finished_job_logs_nothing_twice(finished, cache, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    before = read_metrics(str(workdir))
    result = lm_pretrain.train(tiny_config(cache), str(workdir))
    assert read_metrics(str(workdir)) == before
    assert result["val/ce"] == pytest.approx(before[-1]["val/ce"], rel=1e-6)


def test_invalid_config_writes_nothing(cache, tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(run.ConfigError) as err:
        lm_pretrain.train(tiny_config(cache, steps=0, batch_size=6, accum_steps=4, **{"mesh.data": 3}), str(workdir))
    for expected in ("steps must be >= 1", "does not split into accum_steps=4", "needs 3 devices"):
        assert expected in str(err.value)
    assert not workdir.exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_expected_user_errors_are_one_line(tmp_path, cache):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    proc = _cli("experiments.lm_pretrain", "--config", "configs/lm_pretrain.py:tiny", "--workdir", str(a_file),
                f"--config.data.cache_dir={cache}", "--config.data.max_files=12")
    assert proc.returncode == 1
    assert "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    proc = _cli("experiments.lm_distill", "--config", "configs/lm_distill.py:tiny", "--workdir", str(tmp_path / "d"),
                "--config.store_dir=/nonexistent/store", f"--config.data.cache_dir={cache}")
    assert proc.returncode == 1
    assert "store_dir '/nonexistent/store' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------------------
# Helpers for driving kdjax.loop.train_loop with a fake step.


def jnp_where(cond, a, b):
    return np.where(np.asarray(cond), a, b).astype(np.float32)


@flax.struct.dataclass
class _State:
    step: np.ndarray
    params: np.ndarray


class _ListWriter:
    def __init__(self):
        self.records = []

    def write(self, step, scalars):
        self.records.append((step, dict(scalars)))


class _Iter:
    def __next__(self):
        return {}

    def get_state(self):
        return {}


def _run_loop(state, step_fn, ckpt, writer, *, total_steps, clock, log_every=1, tokens_per_step=1):
    original = loop.time.perf_counter
    loop.time.perf_counter = lambda: clock.now
    try:
        return loop.train_loop(
            state=state,
            train_step=step_fn,
            data_iter=_Iter(),
            batch_shardings={},
            checkpointer=ckpt,
            writer=writer,
            run_eval=lambda params: {},
            total_steps=total_steps,
            log_every=log_every,
            eval_every=1000,
            tokens_per_step=tokens_per_step,
        )
    finally:
        loop.time.perf_counter = original


def test_an_intact_checkpoint_that_does_not_fit_is_an_error_not_moved_aside(tmp_path):
    # Its bytes match the checksum, but it cannot be restored into this state (another shape): nothing is
    # damaged, so nothing is moved; the error says so.
    state = _State(np.int32(2), np.ones(3, np.float32))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=1)
    ckpt.save(2, state, {}, force=True)
    ckpt.close()
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                         _State(np.int32(0), np.ones(5, np.float32)))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=1)
    with pytest.raises(checkpoint.CheckpointError, match="matches its checksum but cannot be restored"):
        ckpt.restore(other)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_torn_metrics_line_does_not_block_the_resume(tmp_path):
    from kdjax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), resume_step=0)
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": 1.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-write
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
