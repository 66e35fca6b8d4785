"""kdjax.guidance, kdjax.data.categories and the text classifier: the diversity reward and its REINFORCE
estimate (by enumeration on a toy categorical), condition dropout, the CFG teacher signal, weight interpolation,
the category table against this Python's corpus, and conditional windows on a fake library."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import guidance
from kdjax.data import categories, corpus
from kdjax.models import sampling
from kdjax.models.text_classifier import TextClassifier, TextClassifierConfig
from kdjax.models.transformer import Transformer, TransformerConfig


def tiny_lm(seed=0, **kw):
    cfg = TransformerConfig.llama(**{**dict(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1,
                                            head_dim=8, mlp_dim=32, max_len=24, tie_embeddings=True), **kw})
    return Transformer(cfg, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------- rewards and advantages


@pytest.mark.parametrize("g", [2, 3, 5])
def test_leave_one_out_advantages_sum_to_zero_and_follow_the_definition(g):
    r = np.random.default_rng(g).uniform(0, 2, (7, g)).astype(np.float32)
    a = np.asarray(guidance.leave_one_out_advantages(jnp.asarray(r)))
    np.testing.assert_allclose(a.sum(axis=1), 0.0, atol=1e-5)
    naive = np.array([[r[n, i] - np.mean(np.delete(r[n], i)) for i in range(g)] for n in range(7)])
    np.testing.assert_allclose(a, naive, rtol=1e-5, atol=1e-6)
    if g >= 3:
        np.testing.assert_allclose(np.asarray(guidance.pairwise_reward_advantages(jnp.asarray(r))).sum(1), 0.0, atol=1e-5)


def test_reward_does_not_depend_on_the_order_of_the_generations():
    e = np.random.default_rng(0).standard_normal((5, 4, 6)).astype(np.float32)
    r = np.asarray(guidance.diversity_rewards(jnp.asarray(e)))
    for perm in ([3, 1, 0, 2], [1, 2, 3, 0]):
        np.testing.assert_allclose(np.asarray(guidance.diversity_rewards(jnp.asarray(e[:, perm]))), r[:, perm],
                                   rtol=1e-6, atol=1e-6)
    naive = [[1 - np.mean([e[n, i] @ e[n, j] / np.linalg.norm(e[n, i]) / np.linalg.norm(e[n, j])
                           for j in range(4) if j != i]) for i in range(4)] for n in range(5)]
    np.testing.assert_allclose(r, naive, rtol=1e-5, atol=1e-6)
    assert (r >= 0).all() and (r <= 2).all()


def test_identical_generations_get_zero_reward_and_opposite_ones_two():
    v = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    same = np.broadcast_to(v, (3, 4, 8))
    np.testing.assert_allclose(np.asarray(guidance.diversity_rewards(jnp.asarray(same))), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(guidance.pairwise_reward_advantages(guidance.diversity_rewards(
        jnp.asarray(same)))), 0.0, atol=1e-5)
    opposite = np.stack([v, -v])[None]
    np.testing.assert_allclose(np.asarray(guidance.diversity_rewards(jnp.asarray(opposite))), 2.0, rtol=1e-6)


def test_two_generations_share_one_reward_so_pairwise_advantages_need_three():
    e = np.random.default_rng(2).standard_normal((4, 2, 5)).astype(np.float32)
    r = np.asarray(guidance.diversity_rewards(jnp.asarray(e)))
    np.testing.assert_allclose(r[:, 0], r[:, 1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(guidance.leave_one_out_advantages(jnp.asarray(r))), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match=">= 3 generations"):
        guidance.pairwise_reward_advantages(jnp.asarray(r))
    with pytest.raises(ValueError, match=">= 2"):
        guidance.diversity_rewards(jnp.asarray(e[:, :1]))


@pytest.mark.parametrize("g", [3, 4])
def test_reinforce_estimate_matches_the_exact_gradient_on_a_toy_categorical(g):
    """pi = softmax(theta) over V outcomes with fixed embeddings; Div = sum_ab pi_a pi_b (1 - cos(e_a, e_b)).
    The expectation of our estimator over every (y_1 .. y_G), weighted by its probability, is -grad Div exactly."""
    v, rng = 4, np.random.default_rng(g)
    theta = jnp.asarray(rng.standard_normal(v), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((v, 3)), jnp.float32)
    unit = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    div = lambda t: jnp.einsum("a,b,ab->", jax.nn.softmax(t), jax.nn.softmax(t), 1.0 - unit @ unit.T)
    exact = jax.grad(div)(theta)

    def estimator_grad(t, ys):
        logits = jnp.broadcast_to(t, (g, 1, v))  # G one-token "generations" of one prompt
        adv = guidance.pairwise_reward_advantages(guidance.diversity_rewards(emb[ys][None]))[0]
        total, count = guidance.reinforce_surrogate(logits, ys[:, None], jnp.ones((g, 1)), adv)
        return total / count

    grad_fn = jax.jit(jax.grad(estimator_grad))
    probs = np.asarray(jax.nn.softmax(theta), np.float64)
    expected = np.zeros(v)
    for ys in itertools.product(range(v), repeat=g):
        expected += np.prod(probs[list(ys)]) * np.asarray(grad_fn(theta, jnp.asarray(ys)), np.float64)
    np.testing.assert_allclose(-expected, np.asarray(exact), rtol=2e-5, atol=2e-6)
    # Without c_G the leave-one-out estimate is (G-2)/(2(G-1)) of the gradient, not the gradient.
    assert not np.allclose(-expected * (g - 2) / (2 * (g - 1)), np.asarray(exact), rtol=1e-3)


def test_reinforce_surrogate_gradient_is_minus_the_advantage_weighted_score():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (3, 4)))
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
    adv = jnp.asarray([0.5, -1.0, 0.25])
    f = lambda x: guidance.reinforce_surrogate(x, labels, mask, adv)[0]
    seq_logp = lambda x: jnp.sum(guidance.token_logprobs(x, labels) * mask, axis=1)
    want = -sum(adv[b] * jax.grad(lambda x: seq_logp(x)[b])(logits) for b in range(3))
    np.testing.assert_allclose(np.asarray(jax.grad(f)(logits)), np.asarray(want), rtol=1e-5, atol=1e-6)
    # The advantage carries no gradient.
    assert float(jax.grad(lambda a: guidance.reinforce_surrogate(logits, labels, mask, a)[0] * 0 + jnp.sum(
        jax.lax.stop_gradient(a)))(adv).sum()) == 0.0


def test_mean_pooled_embedding_ignores_masked_positions_and_is_unit_norm():
    rng = np.random.default_rng(4)
    h = rng.standard_normal((2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], np.float32)
    e = np.asarray(guidance.mean_pooled_embedding(jnp.asarray(h), jnp.asarray(mask)))
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(e, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    h2 = np.where(mask[..., None] > 0, h, 100.0)
    np.testing.assert_array_equal(np.asarray(guidance.mean_pooled_embedding(jnp.asarray(h2), jnp.asarray(mask))), e)


# ---------------------------------------------------------------- the condition


def test_condition_dropout_happens_at_its_rate_and_only_replaces_the_prefix():
    b, p, rate = 20000, 3, 0.15
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, 50, (b, 8)), jnp.int32)
    null = jnp.zeros((p,), jnp.int32)
    out, dropped = jax.jit(lambda t, k: guidance.drop_condition(t, null, k, rate=rate))(tokens, jax.random.key(0))
    out, dropped, tokens = np.asarray(out), np.asarray(dropped), np.asarray(tokens)
    frac, sd = dropped.mean(), np.sqrt(rate * (1 - rate) / b)
    assert abs(frac - rate) < 4 * sd, frac
    np.testing.assert_array_equal(out[dropped, :p], 0)
    np.testing.assert_array_equal(out[~dropped], tokens[~dropped])
    np.testing.assert_array_equal(out[:, p:], tokens[:, p:])
    # Through the teacher's objective: its aux reports the dropped fraction of the step's rows.
    obj = guidance.conditional_lm_objective(null_prefix_p=np.zeros(p, np.int32), rate=rate)
    batch = {"tokens": jnp.asarray(tokens[:4000]), "loss_mask": jnp.ones((4000, 7))}
    prepared, aux = obj.prepare(None, batch, jax.random.key(1), None, {})
    assert abs(float(aux["uncond"][0] / aux["uncond"][1]) - rate) < 4 * np.sqrt(rate * (1 - rate) / 4000)
    dropped_rows = np.asarray(prepared["tokens"][:, :p] == 0).all(1)
    assert dropped_rows.sum() == int(aux["uncond"][0])
    with pytest.raises(ValueError, match="dropout rate"):
        guidance.conditional_lm_objective(null_prefix_p=np.zeros(p, np.int32), rate=1.0)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_cfg_teacher_signal_is_the_guided_logits_of_the_two_prefixes(gamma):
    graphdef, params = nnx.split(tiny_lm())
    null = jnp.asarray([0, 0, 0], jnp.int32)
    inputs = jnp.asarray(np.random.default_rng(6).integers(1, 32, (3, 10)), jnp.int32)
    signal = guidance.cfg_teacher_signal(guidance=gamma, null_prefix_p=null)
    got = jax.jit(lambda p: signal(nnx.merge(graphdef, p), {}, inputs))(params)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    cond, uncond = forward(params, inputs), forward(params, inputs.at[:, :3].set(0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(sampling.cfg_logits(cond, uncond, guidance=gamma)),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- interpolation


def params_of(model):
    return nnx.split(model, nnx.Param)[1]


def test_interpolation_returns_the_endpoints_bitwise_and_the_weighted_mean_between():
    a, b = params_of(tiny_lm(0)), params_of(tiny_lm(1))
    bits = lambda t: [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(t)]
    for kappa, want in ((0.0, a), (1.0, b), (0, a), (1, b)):
        for x, y in zip(bits(guidance.interpolate_params(a, b, kappa)), bits(want)):
            np.testing.assert_array_equal(x, y)
    mid = guidance.interpolate_params(a, b, 0.25)
    for m, x, y in zip(jax.tree.leaves(mid), jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(m), 0.75 * np.asarray(x) + 0.25 * np.asarray(y), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="kappa"):
        guidance.interpolate_params(a, b, 1.5)


def test_interpolation_refuses_mismatched_architectures():
    a = params_of(tiny_lm(0))
    with pytest.raises(ValueError, match=r"float32\[16, 1, 8\] in the quality model and float32\[24, 1, 8\]"):
        guidance.interpolate_params(a, params_of(tiny_lm(1, embed_dim=24)), 0.5)
    with pytest.raises(ValueError, match="different parameter trees"):
        guidance.interpolate_params(a, params_of(tiny_lm(1, num_layers=2)), 0.5)
    with pytest.raises(ValueError, match="different parameter trees"):
        guidance.interpolate_params(a, params_of(tiny_lm(1, tie_embeddings=False)), 0.5)


# ---------------------------------------------------------------- evaluation helpers


def test_distinct_n_and_pairwise_distance_and_the_reference_curve():
    assert guidance.distinct_n([[[1, 2, 1, 2], [1, 2]]], 2) == pytest.approx(2 / 4)
    assert guidance.distinct_n([[[1, 2, 3]], [[4]]], 2) == pytest.approx(0.5)  # the empty group counts 0
    e = np.array([[[1.0, 0], [0, 1], [1, 0]]])
    assert guidance.pairwise_cosine_distance(e) == pytest.approx((1 + 0 + 1) / 3)
    curve = [(0.2, 0.9), (0.4, 0.6), (0.6, 0.5)]  # (diversity, quality): more guidance, less diversity
    assert guidance.curve_quality_at(curve, 0.3) == pytest.approx(0.75)
    assert guidance.above_curve((0.3, 0.76), curve) and not guidance.above_curve((0.3, 0.74), curve)
    assert not guidance.above_curve((0.1, 0.85), curve)  # less diverse and worse than gamma's best point
    assert guidance.above_curve((0.7, 0.51), curve) and not guidance.above_curve((0.7, 0.49), curve)


def test_text_classifier_reads_only_the_unmasked_prefix_of_a_sequence():
    cfg = TextClassifierConfig(vocab_size=32, num_classes=4, max_len=8, num_layers=1, embed_dim=16, num_heads=2,
                               head_dim=8, mlp_dim=16)
    model = TextClassifier(cfg, rngs=nnx.Rngs(0))
    model.w[...] = jax.random.normal(jax.random.key(1), model.w.shape)
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda t, m: nnx.merge(graphdef, params)(t, m, return_features=True))
    tokens = jnp.asarray(np.random.default_rng(7).integers(1, 32, (2, 8)), jnp.int32)
    mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 8], jnp.float32)
    logits, feats = fwd(tokens, mask)
    changed = tokens.at[0, 5:].set(3)  # after row 0's valid tokens: a causal encoder never sees them
    np.testing.assert_allclose(np.asarray(fwd(changed, mask)[0]), np.asarray(logits), rtol=1e-6)
    assert logits.shape == (2, 4) and feats.shape == (2, 16)


# ---------------------------------------------------------------- categories


def test_category_table_covers_every_file_of_this_corpus_or_names_the_dropped():
    files = corpus.stdlib_files()
    a = categories.assign(files)
    assert set(a.labels) | set(a.dropped) == set(files) and not set(a.labels) & set(a.dropped)
    unmapped = sorted({categories.top_level(f) for f, why in a.dropped.items() if why.startswith("unmapped")})
    assert not unmapped, f"modules of this Python with no category: {unmapped}"
    assert {categories.top_level(f) for f in a.dropped} == set(categories.DROPPED)
    counts = np.bincount(list(a.labels.values()), minlength=categories.num_categories())
    assert (counts > 0).all() and 8 <= categories.num_categories() <= 16
    # Another Python's new module is dropped and named, never put in a class.
    b = categories.assign(files + ["_brand_new_module.py"])
    assert "unmapped module '_brand_new_module'" in b.dropped["_brand_new_module.py"]
    assert "_brand_new_module" in b.describe()


def fake_library(root):
    texts = {"email/parser.py": "def parse(msg):\n    return msg.split('\\n')\n" * 12,
             "email/__init__.py": "'''Mail.'''\n",
             "asyncio/loop.py": "async def run(coro):\n    await coro\n" * 15,
             "os.py": "import sys\nsep = '/'\n" * 10,
             "random.py": "def choice(seq):\n    return seq[0]\n" * 9,
             "encodings/cp1.py": "table = (1, 2, 3)\n" * 5,
             "mystery.py": "x = 1\n"}
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return texts


def test_conditional_windows_stay_inside_one_file_with_its_prefix(tmp_path):
    texts = fake_library(tmp_path / "lib")
    data = categories.load_conditional_data(vocab_size=300, seq_len=24, cache_dir=str(tmp_path / "cache"),
                                            val_fraction=0.3, root=tmp_path / "lib")
    assert set(data.assignment.dropped) == {"encodings/cp1.py", "mystery.py"}
    tok, p = data.tokenizer, data.prefix_kp.shape[1]
    assert (data.null_p == tok.eos_id).all() and data.null_p.shape == (p,)
    for c, name in enumerate(categories.CATEGORY_NAMES):
        assert tok.decode(data.prefix_kp[c]).endswith(categories.PREFIX_TEMPLATE.format(name))
    files = {f: t for f, t in texts.items() if f in data.assignment.labels}
    seen = {}
    for source in (data.train, data.validation):
        for i in range(len(source)):
            ex = source[i]
            assert ex["example_id"] == i and ex["tokens"].shape == (25,) and ex["loss_mask"].shape == (24,)
            np.testing.assert_array_equal(ex["tokens"][:p], data.prefix_kp[ex["label"]])
            n = int(ex["loss_mask"].sum())
            assert ex["loss_mask"][: p - 1].sum() == 0 and ex["loss_mask"][p - 1: p - 1 + n].all()
            text = tok.decode(ex["tokens"][p: p + n])
            owners = [f for f, t in files.items() if text.replace(tok.eos_token, "") in t + ""
                      and categories.CATEGORY_NAMES.index(_category(f)) == ex["label"]]
            assert owners, text  # a window is a piece of one file of its own category
            seen.setdefault(owners[0], []).append(text)
    # Every kept file is covered and its last window ends with the file's EOS.
    assert set(seen) == set(files)
    assert all(any(t.endswith(tok.eos_token) for t in seen[f]) for f in files)
    again = categories.load_conditional_data(vocab_size=300, seq_len=24, cache_dir=str(tmp_path / "cache"),
                                             val_fraction=0.3, root=tmp_path / "lib")
    np.testing.assert_array_equal(again.train[3]["tokens"], data.train[3]["tokens"])  # stable ids, from the cache


def _category(path):
    return categories.CATEGORY_NAMES[categories.category_of(path)]


def test_window_starts_and_prompt_source():
    assert categories.window_starts(5, 8) == [0]
    assert categories.window_starts(16, 8) == [0, 8]
    assert categories.window_starts(17, 8) == [0, 8, 9]
    prefix = np.arange(6, dtype=np.int32).reshape(3, 2)
    src = categories.PromptSource(prefix, repeats=2)
    assert len(src) == 6 and [int(src[i]["label"]) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(src[4]["prompt"], prefix[1])
    with pytest.raises(ValueError, match="shorter than the longest"):
        categories.condition_prefixes(_FakeTok(), length=2)


class _FakeTok:
    eos_id = 0

    def encode(self, text):
        return list(range(1, len(text) + 1))
