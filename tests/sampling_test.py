"""The KV-cache samplers: `sample` without its wasted last forward, and classifier-free-guided `sample_cfg`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import sampling
from kdjax.models.transformer import Transformer, TransformerConfig

V = 37


def make_model(seed=0, family="llama"):
    base = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, head_dim=8, mlp_dim=48, max_len=32)
    cfg = TransformerConfig.gpt2(**base) if family == "gpt2" else TransformerConfig.llama(num_kv_heads=2, **base)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Larger output weights give peaked, far-from-uniform distributions, so a wrong token choice shows.
    if model.lm_head is not None:
        model.lm_head[...] = 20.0 * model.lm_head[...]
    else:
        model.embed[...] = 20.0 * model.embed[...]
    return model


def reference_sample(model, prompt_bt, keys_b, *, max_new_tokens, temperature, top_k, top_p, eos_id):
    """The sampler as it was before the last forward was removed: a plain loop, one forward after every token."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, x, cache, i: nnx.merge(graphdef, params).forward_cached(x, cache, i))
    b, p = prompt_bt.shape
    logits, cache = forward(params, prompt_bt, model.init_cache(b, p + max_new_tokens), 0)
    logits_bv, done_b, tokens, valid = logits[:, -1], np.zeros(b, bool), [], []
    for step in range(max_new_tokens):
        if temperature == 0.0:
            token_b = jnp.argmax(logits_bv, axis=-1)
        else:
            filtered = sampling.filter_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
            token_b = jax.vmap(jax.random.categorical)(step_keys, filtered)
        token_b = np.asarray(token_b).astype(prompt_bt.dtype)
        if eos_id is not None:
            token_b = np.where(done_b, eos_id, token_b)
        valid.append(~done_b)
        if eos_id is not None:
            done_b = done_b | (token_b == eos_id)
        tokens.append(token_b)
        logits, cache = forward(params, token_b[:, None], cache, p + step)
        logits_bv = logits[:, 0]
    gen_mask = np.stack(valid, axis=1).astype(np.float32)
    return np.concatenate([prompt_bt, np.stack(tokens, axis=1)], 1), np.concatenate([np.zeros((b, p)), gen_mask], 1)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=1.0, top_k=10, top_p=0.9, eos_id=None), dict(temperature=0.7, top_k=0, top_p=1.0, eos_id=3)],
)
def test_sample_equals_the_loop_with_a_forward_after_every_token(options):
    model = make_model()
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (5, 4), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(2), 5)
    fn = jax.jit(functools.partial(sampling.sample, nnx.split(model)[0], max_new_tokens=9, **options))
    out = fn(nnx.split(model)[1], prompt, keys)
    tokens, mask = reference_sample(model, prompt, keys, max_new_tokens=9, **options)
    np.testing.assert_array_equal(out["tokens"], tokens)
    np.testing.assert_array_equal(out["mask"], mask)
    if options["eos_id"] is not None:  # the EOS branch is exercised: some row stops early, some row does not
        rows_with_eos = (np.asarray(out["tokens"])[:, 4:] == options["eos_id"]).any(axis=1)
        assert rows_with_eos.any() and not rows_with_eos.all()


def test_sample_edge_lengths():
    model = make_model()
    graphdef, params = nnx.split(model)
    prompt = np.asarray(jax.random.randint(jax.random.key(3), (2, 1), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(4), 2)
    for n in (0, 1):
        out = jax.jit(functools.partial(sampling.sample, graphdef, max_new_tokens=n))(params, prompt, keys)
        assert out["tokens"].shape == (2, 1 + n) and out["mask"].shape == (2, 1 + n)
        np.testing.assert_array_equal(out["mask"][:, 1:], np.ones((2, n)))
    first = np.asarray(jnp.argmax(model(prompt)[:, -1], axis=-1))
    out = sampling.sample(graphdef, params, prompt, keys, max_new_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"][:, 1], first)


def test_sample_feeds_back_only_the_first_n_minus_1_tokens():
    """N tokens need the prefill and N - 1 single-token forwards: the decode loop runs N - 1 times."""
    model = make_model()
    graphdef, params = nnx.split(model)
    prompt = np.zeros((2, 3), np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    for fn, n in ((sampling.sample, 5), (functools.partial(sampling.sample_cfg, guidance=2.0), 4)):
        args = (params, prompt, prompt[:, :1], keys) if n == 4 else (params, prompt, keys)
        jaxpr = jax.make_jaxpr(functools.partial(fn, graphdef, max_new_tokens=n))(*args)
        loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
        assert [e.params.get("length") for e in loops] == [n - 1]


def _cfg_fn(graphdef, **options):
    return jax.jit(functools.partial(sampling.sample_cfg, graphdef, **options))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cfg_guidance_one_is_conditional_and_zero_is_null_prompt_sampling(temperature):
    model = make_model(family="gpt2")
    graphdef, params = nnx.split(model)
    cond = np.asarray(jax.random.randint(jax.random.key(5), (4, 6), 0, V), np.int32)
    null = np.asarray(jax.random.randint(jax.random.key(6), (4, 2), 0, V), np.int32)  # a different length
    keys = jax.random.split(jax.random.key(7), 4)
    opts = dict(max_new_tokens=8, temperature=temperature, top_k=12, top_p=0.95)
    plain = jax.jit(functools.partial(sampling.sample, graphdef, **opts))
    guided_1 = _cfg_fn(graphdef, guidance=1.0, **opts)(params, cond, null, keys)
    guided_0 = _cfg_fn(graphdef, guidance=0.0, **opts)(params, cond, null, keys)
    conditional, unconditional = plain(params, cond, keys), plain(params, null, keys)
    np.testing.assert_array_equal(guided_1["tokens"], conditional["tokens"])
    np.testing.assert_array_equal(guided_1["mask"], conditional["mask"])
    np.testing.assert_array_equal(guided_0["tokens"][:, :6], cond)  # tokens = the conditional prompt, then ...
    np.testing.assert_array_equal(guided_0["tokens"][:, 6:], unconditional["tokens"][:, 2:])
    assert not np.array_equal(guided_1["tokens"], guided_0["tokens"])  # the two prompts do matter here
    assert int(guided_1["forwards"]) == 2 * 8


def test_cfg_logits_follow_the_formula_step_by_step():
    """Greedy CFG decoding equals argmax of l_u + g (l_c - l_u) from full forwards of both growing contexts."""
    model = make_model(seed=1)
    graphdef, params = nnx.split(model)
    # Causal: the logits after a context of length m are row m - 1 of a forward over any longer padding of it.
    full = jax.jit(lambda params, x, m: nnx.merge(graphdef, params)(x)[:, m - 1])
    cond = np.asarray(jax.random.randint(jax.random.key(8), (3, 3), 0, V), np.int32)
    null = np.asarray(jax.random.randint(jax.random.key(9), (3, 5), 0, V), np.int32)
    guidance, n = 3.0, 6
    out = _cfg_fn(graphdef, guidance=guidance, max_new_tokens=n, temperature=0.0)(
        params, cond, null, jax.random.split(jax.random.key(0), 3)
    )
    generated = np.zeros((3, 0), np.int32)
    pad = lambda x: np.pad(x, ((0, 0), (0, 5 + n - x.shape[1])))
    for _ in range(n):
        lc = full(params, pad(np.concatenate([cond, generated], 1)), 3 + generated.shape[1])
        lu = full(params, pad(np.concatenate([null, generated], 1)), 5 + generated.shape[1])
        guided = lu + guidance * (lc - lu)
        np.testing.assert_allclose(sampling.cfg_logits(lc, lu, guidance=guidance), guided, rtol=1e-5, atol=1e-4)
        generated = np.concatenate([generated, np.asarray(jnp.argmax(guided, -1), np.int32)[:, None]], 1)
    np.testing.assert_array_equal(out["tokens"], np.concatenate([cond, generated], 1))
    # Guidance 3 is not conditional decoding here: the formula, not either branch alone, chose these tokens.
    plain = sampling.sample(graphdef, params, cond, jax.random.split(jax.random.key(0), 3), max_new_tokens=n,
                            temperature=0.0)
    assert not np.array_equal(plain["tokens"], out["tokens"])


def test_cfg_eos_and_bad_batch():
    model = make_model(seed=2)
    graphdef, params = nnx.split(model)
    cond = np.asarray(jax.random.randint(jax.random.key(10), (3, 4), 0, V), np.int32)
    null = np.zeros((3, 1), np.int32)
    keys = jax.random.split(jax.random.key(11), 3)
    first = _cfg_fn(graphdef, guidance=2.0, max_new_tokens=1, temperature=0.0)(params, cond, null, keys)
    eos = int(first["tokens"][0, -1])  # row 0's first guided token: row 0 must stop at once
    out = _cfg_fn(graphdef, guidance=2.0, max_new_tokens=5, temperature=0.0, eos_id=eos)(params, cond, null, keys)
    np.testing.assert_array_equal(out["tokens"][0, 4:], [eos] * 5)
    np.testing.assert_array_equal(out["mask"][0], [0, 0, 0, 0, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        sampling.sample_cfg(graphdef, params, cond, null[:2], keys, guidance=2.0, max_new_tokens=2)
