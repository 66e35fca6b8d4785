"""The NNX decoder: KV-cache decoding equals the full forward; sampling is deterministic and correct."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import sampling
from kdjax.models.transformer import Transformer, TransformerConfig

V = 61


def make_config(family, **kw):
    base = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, head_dim=8, mlp_dim=48, max_len=24)
    if family == "gpt2":
        return TransformerConfig.gpt2(**{**base, **kw})
    if family == "qwen2":
        return TransformerConfig.llama(**{**base, "num_kv_heads": 2, "qkv_bias": True, **kw})
    return TransformerConfig.llama(**{**base, "num_kv_heads": 2, **kw})


def make_model(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Non-zero biases so a bias that is read but not applied (or applied twice) changes the output.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] in ("bq", "bk", "bv", "bo", "b_up", "b_down", "bias"):
            var[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), var[...].shape)
    return model


FAMILIES = ["gpt2", "llama", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_matches_full_forward(family):
    cfg = make_config(family)
    model = make_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 13), 0, V)
    full = model(tokens)
    cache = model.init_cache(3, 20)
    prefix, cache = model.forward_cached(tokens[:, :6], cache, 0)  # prefill
    pieces = [prefix]
    for i in range(6, 13):  # then one token at a time
        logits, cache = model.forward_cached(tokens[:, i : i + 1], cache, i)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_and_hidden_states(family):
    cfg = make_config(family)
    model = make_model(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, V)
    logits, hidden = model(tokens, return_hidden=True)
    chex.assert_shape(logits, (2, 10, V))
    assert len(hidden) == cfg.num_layers
    chex.assert_shape(hidden, [(2, 10, cfg.embed_dim)] * cfg.num_layers)
    # Changing a later token must not change earlier positions' outputs.
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % V)
    np.testing.assert_allclose(model(changed)[:, :7], logits[:, :7], atol=1e-6)
    assert not np.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_param_count_and_logical_axes():
    cfg = make_config("llama", tie_embeddings=False)
    model = make_model(cfg)
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["logical_axes"]
            assert len(axes) == var[...].ndim, path
    assert model.lm_head is not None and make_model(make_config("gpt2")).lm_head is None


def test_bf16_compute_runs_and_stays_close():
    cfg32 = make_config("llama")
    cfg16 = make_config("llama", dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, V)
    l32 = make_model(cfg32)(tokens)
    l16 = make_model(cfg16)(tokens)
    assert l16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(l16, np.float32), l32, atol=5e-2)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_config("llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        make_config("llama", norm="batchnorm")


def _sample_fn(cfg, **options):
    model = make_model(cfg)
    graphdef, params = nnx.split(model)
    fn = jax.jit(functools.partial(sampling.sample, graphdef, **options))
    return model, params, fn


def test_greedy_sampling_equals_argmax_decoding():
    cfg = make_config("llama")
    model, params, fn = _sample_fn(cfg, max_new_tokens=7, temperature=0.0)
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, V)
    out = fn(params, prompt, jax.random.split(jax.random.key(0), 2))
    # Reference: re-run the full model on the growing sequence, no cache.
    seq = prompt
    for _ in range(7):
        nxt = jnp.argmax(model(seq)[:, -1], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out["tokens"], seq)
    np.testing.assert_array_equal(out["mask"], np.concatenate([np.zeros((2, 5)), np.ones((2, 7))], axis=1))


def test_same_keys_same_samples_and_per_sequence_keys():
    cfg = make_config("gpt2")
    _, params, fn = _sample_fn(cfg, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    prompt = jax.random.randint(jax.random.key(5), (3, 4), 0, V)
    keys = jax.random.split(jax.random.key(7), 3)
    a, b = fn(params, prompt, keys), fn(params, prompt, keys)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    other = fn(params, prompt, jax.random.split(jax.random.key(8), 3))
    assert not np.array_equal(a["tokens"], other["tokens"])
    # A sequence's samples depend only on its own key: permuting the batch permutes the samples.
    perm = np.array([2, 0, 1])
    permuted = fn(params, prompt[perm], keys[perm])
    np.testing.assert_array_equal(permuted["tokens"], a["tokens"][perm])


def test_eos_masks_the_rest():
    cfg = make_config("llama")
    model, params, _ = _sample_fn(cfg)
    prompt = jax.random.randint(jax.random.key(6), (4, 3), 0, V)
    # Use the greedy first token of sequence 0 as EOS: sequence 0 must stop immediately.
    eos = int(jnp.argmax(model(prompt)[0, -1]))
    fn = jax.jit(
        functools.partial(sampling.sample, nnx.split(model)[0], max_new_tokens=6, temperature=0.0, eos_id=eos)
    )
    out = fn(params, prompt, jax.random.split(jax.random.key(0), 4))
    np.testing.assert_array_equal(out["mask"][0], [0, 0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["tokens"][0, 3:], [eos] * 6)
    for row_tokens, row_mask in zip(np.asarray(out["tokens"]), np.asarray(out["mask"])):
        gen, m = row_tokens[3:], row_mask[3:]
        hits = np.flatnonzero(gen == eos)
        expected_len = hits[0] + 1 if len(hits) else 6
        assert m.sum() == expected_len and (m[:expected_len] == 1).all()


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_k=2)), [[1, 1, 0, 0]])
    # top-p: smallest prefix reaching the mass.  0.5 -> {0}; 0.7 -> {0, 1}; 0.8 -> {0, 1, 2}.
    for p, keep in ((0.5, [1, 0, 0, 0]), (0.7, [1, 1, 0, 0]), (0.8, [1, 1, 1, 0]), (1.0, [1, 1, 1, 1])):
        np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_p=p)), [keep])
    np.testing.assert_allclose(sampling.filter_logits(logits, temperature=2.0), logits / 2.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ragged_cache_index_matches_full_forward_of_each_prefix(family):
    """Per-row cache lengths: each row writes at its own offset with its own positions, and rolling a row
    back (reusing a smaller index over slots that hold other tokens) equals a fresh forward of its prefix."""
    cfg = make_config(family)
    model = make_model(cfg)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda params, x, cache, i: nnx.merge(graphdef, params).forward_cached(x, cache, i))
    tokens = np.asarray(jax.random.randint(jax.random.key(11), (3, 12), 0, V))
    lengths = np.array([2, 5, 3], np.int32)
    # Slots at and past each row's length hold tokens of another sequence: stale entries to be ignored.
    stale = np.asarray(jax.random.randint(jax.random.key(12), (3, 7), 0, V))
    prefill = np.where(np.arange(7) < lengths[:, None], tokens[:, :7], stale)
    _, cache = step(params, prefill, model.init_cache(3, 16), 0)
    # Causal: position j's logits are those of the prefix tokens[:, :j + 1].
    full_btv = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))(params, tokens)
    for t in (3, 1, 2):  # ragged blocks of several tokens, then single tokens
        new = np.stack([tokens[b, i : i + t] for b, i in enumerate(lengths)])
        logits, cache = step(params, new, cache, lengths)
        for b in range(3):
            i = lengths[b]
            np.testing.assert_allclose(logits[b], full_btv[b, i : i + t], atol=1e-5, rtol=1e-5)
        lengths = lengths + t


def test_learned_positions_past_max_len_stay_finite():
    """Scratch tokens past max_len (speculative decoding's overhang) must not poison the valid ones with NaN."""
    cfg = make_config("gpt2", max_len=8)
    model = make_model(cfg)
    tokens = jax.random.randint(jax.random.key(13), (2, 8), 0, V)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda params, x, cache, i: nnx.merge(graphdef, params).forward_cached(x, cache, i))
    _, cache = step(params, tokens[:, :7], model.init_cache(2, 11), 0)
    logits, _ = step(params, jnp.concatenate([tokens[:, 7:], tokens[:, :3]], axis=1), cache, 7)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits[:, 0], model(tokens)[:, 7], atol=1e-5, rtol=1e-5)
