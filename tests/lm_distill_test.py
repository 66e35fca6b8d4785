"""lm_distill end to end on the :tiny config, and the properties of its objectives."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_distill as distill_config
from configs import lm_pretrain as pretrain_config
from configs import precompute_teacher as precompute_config
from experiments import lm_distill, lm_pretrain, precompute_teacher
from kdjax import checkpoint, distill, losses, pretrained, run, sharding, teacher_store
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
    [("offline", "jsd"), ("online", "rkl"), ("on_policy", "jsd"), ("seqkd", "ce"), ("offline", "ce")],
)
def test_each_mode_runs_two_steps(teacher, tmp_path, mode, loss):
    result = lm_distill.train(distill_cfg(teacher, mode=mode, loss=loss), str(tmp_path))
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
