"""Jittable autoregressive sampling with the KV cache: temperature, top-k, top-p, per-sequence keys, EOS.

On-policy distillation draws student samples with this inside a jitted step, and speculative decoding
reuses `filter_logits` to build the draft and target distributions, so the filtering rule lives in one place.
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


def sample(
    graphdef, params, prompt_bt, keys_b, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None
):
    """Samples `max_new_tokens` continuations of equal-length prompts with a KV cache.

    Args:
      graphdef, params: the model as split by `nnx.split(model, nnx.Param, ...)`-style (graphdef, state).
      prompt_bt: [B, P] int prompts (all of length P >= 1).
      keys_b: [B] PRNG keys, one per sequence: sequence b's samples depend on keys_b[b] alone, so they do
        not change with the batch it is drawn in.
      temperature: 0 means greedy (argmax) decoding; otherwise logits are divided by it.
      eos_id: once a sequence emits it, every later position is `eos_id` and is masked out.
    Returns:
      dict with `tokens` [B, P + N] (prompt then samples) and `mask` [B, P + N] float32: 1 on generated
      tokens up to and including the first EOS, 0 on the prompt and after EOS.
    Jit this with the sampling options static (e.g. functools.partial); everything else is traced.
    """
    model = nnx.merge(graphdef, params)
    b, p = prompt_bt.shape
    total = p + max_new_tokens
    cache = model.init_cache(b, total)
    logits_btv, cache = model.forward_cached(prompt_bt, cache, 0)

    def choose(logits_bv, step):
        if temperature == 0.0:
            return jnp.argmax(logits_bv, axis=-1).astype(prompt_bt.dtype)
        filtered = filter_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
        return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(prompt_bt.dtype)

    def body(carry, step):
        cache, logits_bv, done_b = carry
        token_b = choose(logits_bv, step)
        if eos_id is not None:
            token_b = jnp.where(done_b, eos_id, token_b)
        valid_b = ~done_b
        if eos_id is not None:
            done_b = done_b | (token_b == eos_id)
        next_logits, cache = model.forward_cached(token_b[:, None], cache, p + step)
        return (cache, next_logits[:, 0], done_b), (token_b, valid_b)

    init = (cache, logits_btv[:, -1], jnp.zeros((b,), bool))
    # The last iteration's forward is wasted work, but keeping the loop uniform keeps one compiled body.
    _, (tokens_nb, valid_nb) = jax.lax.scan(body, init, jnp.arange(max_new_tokens))
    tokens = jnp.concatenate([prompt_bt, tokens_nb.T], axis=1)
    mask = jnp.concatenate([jnp.zeros((b, p), jnp.float32), valid_nb.T.astype(jnp.float32)], axis=1)
    return {"tokens": tokens, "mask": mask}
