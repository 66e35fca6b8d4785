"""Jittable autoregressive sampling with the KV cache: temperature, top-k, top-p, per-sequence keys, EOS.

On-policy distillation draws student samples with this inside a jitted step, and speculative decoding
(`kdjax.specdec`) reuses `filter_logits` to build the draft and target distributions, so the filtering rule
lives in one place.  `sample` and `sample_cfg` (classifier-free guidance) share one decode loop, `_decode`:
token n is chosen from logits n, and only tokens 0 .. N-2 are fed back, because the last token's
successor is never needed (speculative decoding and on-policy sampling call this in inner loops).
"""

import jax
import jax.numpy as jnp
from flax import nnx


def filter_logits(logits_bv, *, temperature=1.0, top_k=0, top_p=1.0):
    """Logits of the sampling distribution: softmax(logits / temperature) restricted to top-k, then top-p.

    top_k=0 and top_p=1.0 disable the filters.  Top-p keeps the smallest prefix of the tokens sorted by
    probability whose mass reaches top_p (the most likely token is always kept).  Removed entries are -inf.
    Shapes: [..., V] -> [..., V] float32.  temperature must be > 0 (greedy decoding is handled by `sample`).
    """
    logits = logits_bv.astype(jnp.float32) / temperature
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
        keep_sorted = mass_before < top_p
        # The smallest kept logit is the threshold; ties at the threshold are all kept.
        threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _choose(logits_bv, keys_b, step, *, temperature, top_k, top_p):
    """One token per row: argmax at temperature 0, else a draw with key fold_in(keys_b[b], step)."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1)
    filtered = filter_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
    return jax.vmap(jax.random.categorical)(step_keys, filtered)


def _decode(first_logits_bv, advance, state, keys_b, *, max_new_tokens, temperature, top_k, top_p, eos_id, dtype):
    """The loop shared by `sample` and `sample_cfg`: choose a token, apply EOS, feed it back.

    `advance(state, token_b, step) -> (next_logits_bv, state)` runs the network on token `step`; it is called
    max_new_tokens - 1 times.  Returns (tokens_bn, valid_bn): tokens are `eos_id` after a row's first EOS and
    valid is True up to and including it.
    """
    b = first_logits_bv.shape[0]

    def pick(logits_bv, step, done_b):
        token_b = _choose(logits_bv, keys_b, step, temperature=temperature, top_k=top_k, top_p=top_p)
        token_b = token_b.astype(dtype)
        valid_b = ~done_b
        if eos_id is not None:
            token_b = jnp.where(done_b, eos_id, token_b)
            done_b = done_b | (token_b == eos_id)
        return token_b, valid_b, done_b

    def body(carry, step):
        state, logits_bv, done_b = carry
        token_b, valid_b, done_b = pick(logits_bv, step, done_b)
        next_logits_bv, state = advance(state, token_b, step)
        return (state, next_logits_bv, done_b), (token_b, valid_b)

    if max_new_tokens == 0:
        return jnp.zeros((b, 0), dtype), jnp.zeros((b, 0), bool)
    init = (state, first_logits_bv, jnp.zeros((b,), bool))
    (_, logits_bv, done_b), (tokens_nb, valid_nb) = jax.lax.scan(body, init, jnp.arange(max_new_tokens - 1))
    last_b, last_valid_b, _ = pick(logits_bv, max_new_tokens - 1, done_b)
    return (
        jnp.concatenate([tokens_nb.T, last_b[:, None]], axis=1),
        jnp.concatenate([valid_nb.T, last_valid_b[:, None]], axis=1),
    )


def _assemble(prompt_bt, tokens_bn, valid_bn):
    b, p = prompt_bt.shape
    tokens = jnp.concatenate([prompt_bt, tokens_bn], axis=1)
    mask = jnp.concatenate([jnp.zeros((b, p), jnp.float32), valid_bn.astype(jnp.float32)], axis=1)
    return {"tokens": tokens, "mask": mask}


def sample(
    graphdef, params, prompt_bt, keys_b, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None
):
    """Samples `max_new_tokens` continuations of equal-length prompts with a KV cache.

    Args:
      graphdef, params: the model as split by `nnx.split(model, nnx.Param, ...)`-style (graphdef, state).
      prompt_bt: [B, P] int prompts (all of length P >= 1).
      keys_b: [B] PRNG keys, one per sequence: sequence b's samples depend on keys_b[b] alone, so they do
        not change with the batch it is drawn in.  Token n is drawn with fold_in(keys_b[b], n).
      temperature: 0 means greedy (argmax) decoding; otherwise logits are divided by it.
      eos_id: once a sequence emits it, every later position is `eos_id` and is masked out.
    Returns:
      dict with `tokens` [B, P + N] (prompt then samples) and `mask` [B, P + N] float32: 1 on generated
      tokens up to and including the first EOS, 0 on the prompt and after EOS.
    Costs one prefill and N - 1 single-token forwards.  Jit this with the sampling options static (e.g.
    functools.partial); everything else is traced.
    """
    model = nnx.merge(graphdef, params)
    b, p = prompt_bt.shape
    cache = model.init_cache(b, p + max(max_new_tokens - 1, 0))
    logits_btv, cache = model.forward_cached(prompt_bt, cache, 0)

    def advance(cache, token_b, step):
        logits_btv, cache = model.forward_cached(token_b[:, None], cache, p + step)
        return logits_btv[:, 0], cache

    tokens_bn, valid_bn = _decode(
        logits_btv[:, -1], advance, cache, keys_b, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, dtype=prompt_bt.dtype,
    )
    return _assemble(prompt_bt, tokens_bn, valid_bn)


def cfg_logits(cond_logits_bv, uncond_logits_bv, *, guidance):
    """Classifier-free guidance on logits: l_u + guidance * (l_c - l_u), in float32.

    Written as (1 - guidance) * l_u + guidance * l_c, the same value, so that guidance = 1 returns l_c and
    guidance = 0 returns l_u bit for bit (the difference form rounds l_c - l_u + l_u).
    """
    cond, uncond = cond_logits_bv.astype(jnp.float32), uncond_logits_bv.astype(jnp.float32)
    return (1.0 - guidance) * uncond + guidance * cond


def sample_cfg(
    graphdef,
    params,
    cond_prompt_bt,
    null_prompt_bt,
    keys_b,
    *,
    guidance,
    max_new_tokens,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    eos_id=None,
):
    """`sample` from classifier-free-guided logits l_u + guidance * (l_c - l_u) (Ho & Salimans, 2022).

    The conditional context is cond_prompt + samples and the unconditional one null_prompt + the same
    samples; the two prompts may differ in length.  Both KV caches live in one batch of 2B rows with
    per-row offsets, so each token costs one batched call that evaluates the network twice per sequence.
    Args as `sample`, plus cond_prompt_bt [B, Pc], null_prompt_bt [B, Pn] and `guidance` (a Python float:
    1 is plain conditional sampling, 0 plain sampling from the null prompt, > 1 guided).
    Returns `sample`'s dict (`tokens` [B, Pc + N] = cond prompt then samples, `mask`) plus `forwards`, the
    network evaluations per sequence: 2 per generated token (the two prefills give the first token's logits).
    """
    b, pc = cond_prompt_bt.shape
    pn = null_prompt_bt.shape[1]
    if null_prompt_bt.shape[0] != b or keys_b.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: cond_prompt_bt {cond_prompt_bt.shape}, null_prompt_bt {null_prompt_bt.shape},"
            f" keys_b {keys_b.shape}"
        )
    model = nnx.merge(graphdef, params)
    slots = max(pc, pn) + max(max_new_tokens - 1, 0)
    cond_logits, cond_cache = model.forward_cached(cond_prompt_bt, model.init_cache(b, slots), 0)
    null_logits, null_cache = model.forward_cached(null_prompt_bt, model.init_cache(b, slots), 0)
    cache = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond_cache, null_cache)
    offsets_2b = jnp.concatenate([jnp.full((b,), pc, jnp.int32), jnp.full((b,), pn, jnp.int32)])

    def advance(cache, token_b, step):
        tokens_2b1 = jnp.concatenate([token_b, token_b])[:, None]
        logits_2b1v, cache = model.forward_cached(tokens_2b1, cache, offsets_2b + step)
        return cfg_logits(logits_2b1v[:b, 0], logits_2b1v[b:, 0], guidance=guidance), cache

    first_logits_bv = cfg_logits(cond_logits[:, -1], null_logits[:, -1], guidance=guidance)
    tokens_bn, valid_bn = _decode(
        first_logits_bv, advance, cache, keys_b, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, dtype=cond_prompt_bt.dtype,
    )
    return {**_assemble(cond_prompt_bt, tokens_bn, valid_bn), "forwards": jnp.asarray(2 * max_new_tokens, jnp.int32)}
