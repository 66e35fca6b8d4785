"""lm_distill end to end on the :tiny config, and the properties of its objectives."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_distill as distill_config
from configs import lm_pretrain as pretrain_config
from configs import precompute_teacher as precompute_config
from experiments import lm_distill, lm_pretrain, precompute_teacher
from kdjax import checkpoint, distill, losses, pretrained, run, sharding, steps, teacher_store
from kdjax.data import text as text_data
from kdjax.metrics import read_metrics

MAX_FILES = 12  # a small corpus keeps the store and the tokenizer quick


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny pretrained teacher, its train-split store and a full-vocabulary validation store."""
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = pretrain_config.get_config("tiny")
    config.data.cache_dir, config.data.max_files, config.steps = cache, MAX_FILES, 6
    config.eval_every = config.checkpoint_every = 6
    lm_pretrain.train(config, workdir)
    store_root = str(tmp_path_factory.mktemp("store"))
    pc = precompute_config.get_config("tiny")  # train split: k = 8, bf16, as a user would
    pc.data = config.data
    pc.teacher.workdir = workdir
    precompute_teacher.precompute(pc, store_root)
    # Validation split with k = V in float32: the store then holds the whole teacher distribution.
    pc.split, pc.k, pc.logprob_dtype = "validation", config.data.vocab_size, "float32"
    precompute_teacher.precompute(pc, store_root)
    return dict(
        cache=cache,
        workdir=workdir,
        store=os.path.join(store_root, "store-train"),
        data=config.data,
        full_store=os.path.join(store_root, "store-validation"),
    )


def distill_cfg(teacher, **overrides):
    config = distill_config.get_config("tiny")
    config.data = teacher["data"]
    config.teacher.workdir = teacher["workdir"]
    config.store_dir = teacher["store"]
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    "mode,loss",
    [("offline", "jsd"), ("online", "rkl"), ("on_policy", "jsd"), ("seqkd", "ce"), ("offline", "ce"),
     ("teacher_generated", "tvd"), ("on_policy", "tvdpp")],
)
def test_each_mode_runs_two_steps(teacher, tmp_path, mode, loss):
    config = distill_cfg(teacher, mode=mode, loss=loss, on_policy_fraction=1.0 if loss == "tvdpp" else 0.5)
    result = lm_distill.train(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert {"val/ce", "val/kl", "val/top1_agreement", "val/acceptance", "val/teacher_perplexity"} <= set(
        result
    )
    assert os.path.exists(tmp_path / "curves.png")


def _one_batch(teacher, n=4):
    data = text_data.load_from_config(
        teacher["data"], tokenizer_path=os.path.join(teacher["workdir"], "tokenizer.json")
    )
    source = teacher_store.StoreSource(data.validation, teacher_store.open_store(teacher["full_store"]))
    items = [source[i] for i in range(n)]
    return {k: jnp.asarray(np.stack([it[k] for it in items])) for k in items[0] if k != "example_id"}


@pytest.mark.parametrize("loss,tail", [("fkl", "bucket"), ("jsd", "renormalize"), ("rkl", "bucket")])
def test_offline_equals_online_when_the_store_keeps_the_full_vocabulary(teacher, loss, tail):
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    # The student: the teacher, perturbed (a fresh tree: merge may share Variables with the state it gets).
    perturb = lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape))
    student = nnx.merge(t.graphdef, jax.tree.map(perturb, t.params))
    batch = _one_batch(teacher)
    hp = distill.divergence_hparams(loss)
    offline = distill.make_loss_fn(mode="offline", loss=loss, hparams=hp, tail=tail, temperature=2.0)
    online = distill.make_loss_fn(
        mode="online", loss=loss, hparams=hp, temperature=2.0, teacher_graphdef=t.graphdef
    )
    rng = jax.random.key(0)
    a = offline(student, batch, rng, None, {})
    b = online(student, {"tokens": batch["tokens"]}, rng, t.params, {})
    assert float(a[1]) == float(b[1]) > 0
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=2e-5)


def test_on_policy_samples_follow_the_current_params_and_lambda(teacher):
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    batch = {"tokens": _one_batch(teacher)["tokens"]}
    graphdef, params = nnx.split(t.model())
    rollout = lambda p, key: distill.rollout(
        graphdef, p, batch["tokens"], key, prompt_len=8, temperature=1.0, eos_id=None
    )
    key = jax.random.key(3)
    same1, same2 = rollout(params, key)[0], rollout(params, key)[0]
    np.testing.assert_array_equal(same1, same2)
    np.testing.assert_array_equal(same1[:, :8], batch["tokens"][:, :8])  # the prompt is kept
    moved = jax.tree.map(lambda x: x * 1.5, params)
    assert not np.array_equal(rollout(moved, key)[0], same1)  # other params, other samples (same key)

    def fraction(lam, n=64):
        fn = jax.jit(
            lambda rng: distill.make_loss_fn(
                mode="on_policy",
                loss="fkl",
                on_policy_fraction=lam,
                prompt_len=8,
                teacher_graphdef=t.graphdef,
            )(nnx.merge(graphdef, params), batch, rng, t.params, {})[2]["on_policy"][0]
        )
        return float(np.mean([fn(jax.random.key(i)) for i in range(n)]))

    assert fraction(0.0) == 0.0 and fraction(1.0) == 1.0
    assert 0.3 < fraction(0.5) < 0.7


def test_taid_state_survives_resume(teacher, tmp_path):
    config = distill_cfg(teacher, loss="taid", steps=4)
    config.checkpoint_every = 2
    lm_distill.train(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    final = _restore(config, str(tmp_path), 4)
    assert float(final.extra["taid"].t) > config.taid.t_start  # t moved
    # Pretend the run died after step 2: drop step 4, run the same command again.
    import shutil

    shutil.rmtree(ckpts / "4")
    lm_distill.train(config, str(tmp_path))
    resumed = _restore(config, str(tmp_path), 4)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore(config, workdir, step):
    model_cfg = pretrained.TransformerConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": config.data.vocab_size, "max_len": config.data.seq_len}
    )
    from kdjax import steps

    tx = steps.make_optimizer(
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.steps
    )
    mesh = sharding.make_mesh(config.mesh)
    spec = steps.train_state_spec(
        lambda r: pretrained.Transformer(model_cfg, rngs=r),
        tx,
        seed=0,
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
        extra={"taid": losses.taid_init()},
    )
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    state, _ = ckpt.restore(spec.abstract, step)
    ckpt.close()
    return state


def test_vocabulary_mismatch_stops_before_training(teacher, tmp_path):
    config = distill_cfg(teacher, mode="online", loss="fkl")
    config.data = config.data.copy_and_resolve_references()
    config.data.vocab_size = 384
    with pytest.raises(run.ConfigError, match="defines vocab size 512 .* --config.data.vocab_size=384"):
        lm_distill.train(config, str(tmp_path))
    assert not tmp_path.exists() or not os.listdir(tmp_path)
    # 0 takes the teacher's vocabulary.
    config.data.vocab_size = 0
    config.steps, config.warmup_steps = 1, 0
    lm_distill.train(config, str(tmp_path / "zero"))
    assert json.load(open(tmp_path / "zero" / "model_config.json"))["vocab_size"] == 512


def test_hugging_face_teacher_and_export(teacher, tmp_path):
    from kdjax import hf

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    hf.save_hf(str(tmp_path / "hf_teacher"), t.model(), t.tokenizer)
    config = distill_cfg(teacher, mode="online", loss="fkl")
    config.teacher.workdir, config.teacher.hf_path = "", str(tmp_path / "hf_teacher")
    config.export_hf_dir = str(tmp_path / "hf_student")
    result = lm_distill.train(config, str(tmp_path / "run"))
    assert np.isfinite(result["val/kl"])
    student, tokenizer = hf.load_hf(str(tmp_path / "hf_student"))
    assert tokenizer.fingerprint == t.tokenizer.fingerprint
    assert student.cfg.num_layers == config.model.num_layers


def test_student_with_another_tokenizer_is_refused(teacher, tmp_path):
    from kdjax.data import corpus, tokenizer as tokenizer_lib
    from kdjax import hf

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    # Same vocabulary size, other merges: only the ids differ.
    texts = corpus.read_files(corpus.stdlib_files(max_files=40)[-20:])
    other = tokenizer_lib.train_bpe(texts, vocab_size=t.tokenizer.vocab_size)
    assert other.vocab_size == t.tokenizer.vocab_size and other.fingerprint != t.tokenizer.fingerprint
    hf.save_hf(str(tmp_path / "hf_student"), t.model(), other)
    config = distill_cfg(teacher, mode="online", loss="fkl")
    config.student.hf_path = str(tmp_path / "hf_student")
    with pytest.raises(ValueError, match="tokenizer mismatch between teacher"):
        lm_distill.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_on_policy_never_trains_ce_on_student_samples(teacher):
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    tokens = _one_batch(teacher)["tokens"]
    model = t.model()
    prompt_len = 8
    fn = distill.make_loss_fn(
        mode="on_policy",
        loss="fkl",
        on_policy_fraction=1.0,
        prompt_len=prompt_len,
        ce_alpha=0.5,
        teacher_graphdef=t.graphdef,
    )
    _, count, aux = fn(model, {"tokens": tokens}, jax.random.key(0), t.params, {})
    ce_sum, ce_count = aux["ce"]
    # CE only on the prompt's labels (real data), the divergence on the sampled positions.
    assert float(ce_count) == tokens.shape[0] * (prompt_len - 1)
    assert float(count) == tokens.shape[0] * (tokens.shape[1] - prompt_len)
    want, _ = losses.cross_entropy(
        model(tokens[:, : prompt_len - 1]),
        tokens[:, 1:prompt_len],
        jnp.ones((tokens.shape[0], prompt_len - 1)),
    )
    np.testing.assert_allclose(float(ce_sum), float(want), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Reliability (issue #11): what a user gets wrong fails before anything is written, with the reason.


def test_resuming_a_finished_run_with_another_loss_or_mode_is_refused(teacher, tmp_path):
    config = distill_cfg(teacher, mode="offline", loss="fkl")
    lm_distill.train(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = distill_cfg(teacher, mode="online", loss="jsd")
    with pytest.raises(run.ConfigError) as err:
        lm_distill.train(other, str(tmp_path))
    assert "loss: 'fkl' recorded, 'jsd' now" in str(err.value) and "mode: 'offline' recorded" in str(err.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_every_config_problem_is_named_before_anything_is_written(teacher, tmp_path):
    config = distill_cfg(teacher, mode="online", loss="jsd", jsd_beta=1.0, temperature=-1.0, ce_alpha=1.5)
    with pytest.raises(run.ConfigError) as err:
        lm_distill.train(config, str(tmp_path / "a"))
    message = str(err.value)
    for expected in ("temperature must be > 0", "jsd with beta=1", "ce_alpha must be in [0, 1]"):
        assert expected in message, message
    config = distill_cfg(teacher, mode="seqkd", loss="ce", sample_temperature=-1.0)
    with pytest.raises(run.ConfigError, match="sample_temperature must be >= 0"):
        lm_distill.train(config, str(tmp_path / "b"))
    config = distill_cfg(teacher, mode="offline", loss="fkl", store_dir=str(tmp_path / "nowhere"))
    with pytest.raises(run.ConfigError, match="does not exist"):
        lm_distill.train(config, str(tmp_path / "c"))
    assert not any((tmp_path / d).exists() for d in "abc")
    # The export directory is checked before training, not after it.
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    config = distill_cfg(teacher, mode="online", loss="fkl", export_hf_dir=str(tmp_path / "export"))
    with pytest.raises(run.ConfigError, match="export"):
        lm_distill.train(config, str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_precompute_validates_before_writing_and_a_corrected_rerun_works(teacher, tmp_path):
    pc = precompute_config.get_config("tiny")
    pc.data = teacher["data"]
    pc.teacher.workdir = teacher["workdir"]
    pc.k = 0
    with pytest.raises(run.ConfigError, match="k must be >= 1"):
        precompute_teacher.precompute(pc, str(tmp_path))
    pc.k = 10_000
    with pytest.raises(run.ConfigError, match="exceeds the vocabulary"):
        precompute_teacher.precompute(pc, str(tmp_path))
    assert not (tmp_path / "store-train").exists()
    pc.k, pc.split = 4, "validation"
    assert precompute_teacher.precompute(pc, str(tmp_path))["k"] == 4


def _precompute(teacher, root, *, teacher_workdir, max_files=MAX_FILES, split="train"):
    pc = precompute_config.get_config("tiny")
    pc.data = teacher["data"].copy_and_resolve_references()
    pc.data.max_files, pc.split, pc.teacher.workdir = max_files, split, teacher_workdir
    precompute_teacher.precompute(pc, str(root))
    return str(root / f"store-{split}")


def test_a_store_of_another_teacher_is_refused_when_the_teacher_is_configured(teacher, tmp_path):
    # Same tokenizer, same data, another teacher (a random one).
    store = _precompute(teacher, tmp_path / "s", teacher_workdir="")
    config = distill_cfg(teacher, mode="offline", loss="fkl", store_dir=store)
    with pytest.raises(teacher_store.StoreMismatchError, match="teacher_fingerprint"):
        lm_distill.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Without a teacher model the store alone is allowed, and its kept tokenizer defines the vocabulary.
    config.teacher.workdir = ""
    result = lm_distill.train(config, str(tmp_path / "alone"))
    assert np.isfinite(result["val/ce"])
    assert json.load(open(tmp_path / "alone" / "model_config.json"))["vocab_size"] == 512


def test_a_store_over_other_data_or_another_tokenizer_is_refused(teacher, tmp_path):
    # The teacher's tokenizer over 4 more files: the examples' ids now point at other texts.
    store = _precompute(teacher, tmp_path / "s", teacher_workdir=teacher["workdir"], max_files=MAX_FILES + 4)
    config = distill_cfg(teacher, mode="offline", loss="fkl", store_dir=store)
    with pytest.raises(teacher_store.StoreMismatchError, match="dataset") as err:
        lm_distill.train(config, str(tmp_path / "run"))
    assert "num_examples" in str(err.value)
    # A random teacher reads 8 more files with its own tokenizer: same vocabulary size, other ids.
    store = _precompute(teacher, tmp_path / "t", teacher_workdir="", max_files=MAX_FILES + 8)
    config = distill_cfg(teacher, mode="offline", loss="fkl", store_dir=store)
    with pytest.raises(teacher_store.StoreMismatchError, match="tokenizer_fingerprint"):
        lm_distill.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_on_policy_terms_are_each_weighted_over_their_own_mask(teacher):
    # loss = a * CE_sum / C_ce + (1 - a) * KD_sum / C_kd on a batch of student samples (CE on the prompt's
    # real labels only), and accumulating 2 microbatches gives the same gradient as 1.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    tokens = _one_batch(teacher)["tokens"]
    objective = distill.make_loss_fn(
        mode="on_policy", loss="fkl", on_policy_fraction=1.0, prompt_len=8, ce_alpha=0.3, teacher_graphdef=t.graphdef
    )
    total, count, aux = objective(t.model(), {"tokens": tokens}, jax.random.key(0), t.params, {})
    (ce_sum, ce_count), (kd_sum, kd_count) = aux["ce"], aux["kd"]
    assert float(ce_count) == tokens.shape[0] * 7 and float(count) == float(kd_count) > 0
    np.testing.assert_allclose(
        float(total / count), 0.3 * float(ce_sum / ce_count) + 0.7 * float(kd_sum / kd_count), rtol=1e-6
    )
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=t.params, opt_state=tx.init(t.params),
                             rng=jax.random.key_data(jax.random.key(1)))
    grads = {}
    for accum in (1, 2):
        step = jax.jit(functools.partial(steps.train_step, graphdef=t.graphdef, tx=tx, loss_fn=objective,
                                         accum_steps=accum))
        new_state, metrics = step(state, {"tokens": tokens}, t.params)
        grads[accum] = (steps.reduce_metrics(metrics)["loss"], jax.tree.map(np.asarray, new_state.params))
    np.testing.assert_allclose(grads[2][0], grads[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[2][1], grads[1][1])


def test_sigkill_then_rerun_equals_uninterrupted(teacher, tmp_path):
    steps_total = 8
    args = [
        f"--config.teacher.workdir={teacher['workdir']}",
        f"--config.store_dir={teacher['store']}",
        f"--config.data.cache_dir={teacher['cache']}",
        f"--config.data.max_files={MAX_FILES}",
        f"--config.steps={steps_total}",
        "--config.checkpoint_every=2",
        "--config.loss=jsd",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def launch(workdir, *extra):
        cmd = [sys.executable, "-m", "experiments.lm_distill", "--config", "configs/lm_distill.py:tiny",
               "--workdir", str(workdir), *args, *extra]
        return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        return out

    finish(launch(tmp_path / "whole"))
    killed = tmp_path / "killed"
    proc = launch(killed, "--config.debug_sleep_per_step=0.5")
    ckpts, deadline = killed / "checkpoints", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert done and done[-1] < steps_total
    # The rerun may differ only in a key that changes nothing computed (the sleep).
    out = finish(launch(killed, "--config.debug_sleep_per_step=0.0"))
    assert f"resumed from step {done[-1]}" in out
    want = pretrained.load_workdir(str(tmp_path / "whole"), mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                   rules=sharding.DEFAULT_RULES)
    got = pretrained.load_workdir(str(killed), mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                  rules=sharding.DEFAULT_RULES)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    logged = [r["step"] for r in read_metrics(str(killed)) if "train/loss" in r]
    assert logged == sorted(set(logged))


@pytest.mark.parametrize(
    "mode,loss,ce_alpha",
    [("offline", "jsd", 0.5), ("offline", "taid", 0.0), ("online", "rkl", 0.3), ("on_policy", "fkl", 0.5),
     ("offline", "ce", 0.0)],
)
def test_fused_chunked_head_equals_the_plain_path(teacher, mode, loss, ce_alpha):
    # loss_chunk_size > 0 routes every mode through kdjax.fused_head: same (sum, count), aux and gradients,
    # with a chunk (7 tokens) that does not divide B * T.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    t = pretrained.load_workdir(teacher["workdir"], mesh=mesh, rules=sharding.DEFAULT_RULES)
    perturb = lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape))
    student_params = jax.tree.map(perturb, t.params)
    batch = _one_batch(teacher)
    if mode != "offline":
        batch = {"tokens": batch["tokens"]}
    extra = {"taid": losses.taid_init(losses.TaidSchedule(t_start=0.3))}
    outs = []
    for chunk in (0, 7):
        objective = distill.make_loss_fn(
            mode=mode, loss=loss, ce_alpha=ce_alpha, hparams=distill.divergence_hparams(loss), temperature=2.0,
            teacher_graphdef=t.graphdef, on_policy_fraction=1.0, prompt_len=8, chunk_size=chunk,
        )

        def value(params, objective=objective):
            total, count, aux = objective(nnx.merge(t.graphdef, params), batch, jax.random.key(0), t.params, extra)
            return total / count, (count, aux)

        (v, (count, aux)), grads = jax.jit(jax.value_and_grad(value, has_aux=True))(student_params)
        outs.append((v, count, aux, grads))
    (v0, c0, a0, g0), (v1, c1, a1, g1) = outs
    assert float(c0) == float(c1) > 0
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), a1, a0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)
    # Evaluation through the fused head gives the same metrics.
    for frozen in (t.params, None):
        m0, m1 = (jax.jit(distill.make_eval_fn(teacher_graphdef=t.graphdef, chunk_size=c))(
            nnx.merge(t.graphdef, student_params), _one_batch(teacher), frozen) for c in (0, 5))
        assert set(m0) == set(m1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), m1, m0)


def test_a_corrupt_store_is_one_clear_error_and_verify_names_it(teacher, tmp_path):
    import shutil

    root = tmp_path / "stores"
    shutil.copytree(os.path.dirname(teacher["store"]), root)
    shard = sorted((root / "store-train" / "shards").glob("0000[0-9]"))[-1]
    victim = sorted(p for p in shard.rglob("*") if p.is_file() and p.stat().st_size > 64)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    cli = [sys.executable, "-m", "experiments.precompute_teacher", "--config", "configs/precompute_teacher.py:tiny",
           "--workdir", str(root), "--verify"]
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cli, cwd=root_dir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "store-validation: OK" in proc.stdout and "store-train: FAILED" in proc.stdout  # every split checked
    run_cmd = [sys.executable, "-m", "experiments.lm_distill", "--config", "configs/lm_distill.py:tiny",
               "--workdir", str(tmp_path / "run"), f"--config.teacher.workdir={teacher['workdir']}",
               f"--config.store_dir={root / 'store-train'}", f"--config.data.cache_dir={teacher['cache']}",
               f"--config.data.max_files={MAX_FILES}", "--config.steps=40", "--config.checkpoint_every=1"]
    proc = subprocess.run(run_cmd, cwd=root_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "error: teacher store shard" in proc.stderr and "corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "cannot schedule" not in proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not [p for p in os.listdir(ckpts) if "tmp" in p]


def test_tvdpp_needs_draft_generated_data():
    distill.check_loss("on_policy", "tvdpp", on_policy_fraction=1.0)
    for mode, fraction in (("on_policy", 0.5), ("online", 1.0), ("offline", 1.0)):
        with pytest.raises(ValueError, match="tvdpp"):
            distill.check_loss(mode, "tvdpp", on_policy_fraction=fraction)


def test_model_overrides_conflict_with_a_loaded_student(teacher, tmp_path):
    # --config.student.hf_path keeps the checkpoint's architecture: --config.model.* given with it would be
    # silently dropped, so it is refused (naming the keys) before anything is read or written.
    config = distill_cfg(teacher, mode="online", loss="fkl")
    config.student.init_workdir = teacher["workdir"]
    with pytest.raises(run.ConfigError, match="model.embed_dim, model.num_layers would be ignored"):
        lm_distill.train(config, str(tmp_path / "run"), overridden=("model.num_layers", "model.embed_dim", "steps"))
    assert not (tmp_path / "run").exists()
    lm_distill.train(config, str(tmp_path / "run"), overridden=("steps",))  # other overrides are fine
    assert json.load(open(tmp_path / "run" / "model_config.json"))["num_layers"] == 2  # the teacher's own
