"""Speculative sampling on the KV cache, exact and lossy (Leviathan et al., 2023; Chen et al., 2023).

A cheap draft model q proposes gamma tokens one at a time; the target p scores all gamma + 1 positions in
one cached forward; draft token x at position i is accepted with probability min(1, p_i(x) / (eps q_i(x))).
At the first rejection the token is resampled from norm(max(0, p_i - q_i)); if all gamma are accepted a
bonus token is drawn from p_{gamma+1}.  p and q are the *sampling* distributions (temperature, top-k,
top-p applied by `sampling.filter_logits`, one-hot argmax at temperature 0), so eps = `lenience` = 1
samples exactly from the target and greedy decoding reproduces the target's greedy output.  eps < 1 is
DistillSpec's lossy variant (Zhou et al., 2023): per step it outputs
min(q, p/eps) + (1 - sum_x min(q, p/eps)) * norm(max(0, p - q)).

Layout of one sequence of length L (prompt + tokens so far), kept per row so a batch advances raggedly:
  target cache: slots [0, L - 1) valid; the last token is fed at the head of the next verification forward,
    which therefore scores gamma + 1 positions [L, L + gamma] in one call.
  draft cache: slots [0, L) valid, plus `draft_logits_bv`, its distribution for position L.
A rejection is undone by setting L back: slots past it are masked by the causal test and overwritten later,
never copied.  Every block costs the draft gamma - 1 single-token forwards plus one two-token forward that
feeds the last two accepted tokens (the second-last is missing from the draft cache when all gamma were
accepted, and rewriting it otherwise is harmless), and the target exactly one (gamma + 1)-token forward.

Shape suffixes: b batch, g the gamma draft positions, v vocab, l token buffer length.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import sampling


def expected_block_efficiency(alpha, gamma):
    """tau = E[tokens per target call] = (1 - alpha^(gamma+1)) / (1 - alpha), for i.i.d. acceptance alpha.

    Computed as sum_{i=0..gamma} alpha^i, equal to the ratio and finite at alpha = 1 (tau = gamma + 1).
    Leviathan et al. (2023), eq. 1.  alpha: float or array in [0, 1]; gamma: int >= 1.
    """
    _check_gamma(gamma)
    return sum(alpha**i for i in range(gamma + 1))


def expected_speedup(alpha, gamma, cost_ratio):
    """Wall-clock speed-up over target-only decoding: (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)).

    cost_ratio c = the draft's time per token / the target's.  Leviathan et al. (2023), Theorem 3.8.
    """
    return expected_block_efficiency(alpha, gamma) / (gamma * cost_ratio + 1.0)


def _argmax(x_bv):
    """jnp.argmax over the last axis (the first maximal index) as two plain reductions.

    XLA on CPU runs argmax as one (value, index) variadic reduce that is several times slower than a max and
    a min over [gamma + 1, V]; the greedy block computes several of these per target call.
    """
    v = x_bv.shape[-1]
    first_max = jnp.min(jnp.where(x_bv == jnp.max(x_bv, axis=-1, keepdims=True), jnp.arange(v), v), axis=-1)
    return jnp.minimum(first_max, v - 1)  # NaN rows (no maximum) would otherwise index past the vocabulary


def sampling_probs(logits_bv, *, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution a token is drawn from: softmax(filter_logits(logits)); one-hot argmax at temperature 0.

    The one rule for target and draft.  Shapes: [..., V] -> [..., V] float32.
    """
    if temperature == 0.0:
        return jax.nn.one_hot(_argmax(logits_bv), logits_bv.shape[-1], dtype=jnp.float32)
    filtered = sampling.filter_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.nn.softmax(filtered, axis=-1)


def acceptance_probs(p_x, q_x, *, lenience=1.0):
    """Probability of accepting a draft token x: min(1, p(x) / (lenience * q(x))); 1 where q(x) = 0.

    (A token with q(x) = 0 is never proposed; the guard only keeps the value finite.)
    """
    ratio = p_x / jnp.where(q_x > 0, lenience * q_x, 1.0)
    return jnp.where(q_x > 0, jnp.minimum(1.0, ratio), 1.0)


def residual_probs(p_v, q_v):
    """Resampling distribution after a rejection: norm(max(0, p - q)), or p where that has no mass.

    The mass is 0 only when p <= q everywhere, i.e. p == q, where no rejection can happen anyway; falling
    back to p keeps the division finite.  With q = 0 (the bonus position) it returns p.  [..., V].
    """
    r = jnp.maximum(p_v - q_v, 0.0)
    z = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(z > 0, r / jnp.where(z > 0, z, 1.0), p_v)


def expected_acceptance(
    target_logits_btv, draft_logits_btv, mask_bt, *, temperature=1.0, top_k=0, top_p=1.0, lenience=1.0
):
    """Teacher-forced acceptance: sum over valid positions of beta = sum_x min(q(x), p(x) / lenience).

    At lenience 1, beta = 1 - TVD(p, q) (Leviathan et al., Thm 3.5) and its mean over the prefixes SD visits
    is alpha.  Returns (sum, count) like the losses.  Shapes: [B, T, V], [B, T, V], [B, T].
    """
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    p = sampling_probs(target_logits_btv, **opts)
    q = sampling_probs(draft_logits_btv, **opts)
    beta_bt = jnp.sum(jnp.minimum(q, p / lenience), axis=-1)
    mask = mask_bt.astype(jnp.float32)
    return jnp.sum(beta_bt * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    """Static settings of one speculative sampler (hashable: the jit cache key).

    `residual(p_v, q_v) -> probs` is the resampling rule; only tests replace it (with a wrong one, to show
    that the exactness tests can fail).
    """

    max_new_tokens: int
    gamma: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lenience: float = 1.0
    eos_id: Optional[int] = None
    residual: Callable[[Any, Any], Any] = residual_probs

    def __post_init__(self):
        _check_gamma(self.gamma)
        if not 0.0 < self.lenience <= 1.0:
            raise ValueError(f"lenience={self.lenience} must be in (0, 1] (1 is exact speculative sampling)")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0, top_p in (0, 1]; got {self.temperature}, {self.top_k},"
                f" {self.top_p}"
            )


def _check_gamma(gamma):
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an int >= 1 (draft tokens per block)")


class SpecState(NamedTuple):
    """The while-loop carry.  Row b holds `length_b[b]` tokens (prompt + output so far)."""

    tokens_bl: jax.Array  # [B, P + N + 2 gamma + 1]: prompt, output, then scratch the last blocks spill into
    length_b: jax.Array  # [B] int32
    target_cache: Any  # slots [0, length - 1) valid
    draft_cache: Any  # slots [0, length) valid
    draft_logits_bv: jax.Array  # the draft's logits for position `length`
    done_b: jax.Array  # [B] bool: emitted EOS
    accepted_b: jax.Array  # [B] int32: draft tokens accepted by the test (before truncation to N)
    proposed_b: jax.Array  # [B] int32: draft tokens proposed while the row was active
    target_calls: jax.Array  # int32: verification forwards so far (the prompt prefill is not counted)


def check_models(target_model, draft_model, prompt_bt, keys_b, opts):
    """ValueError naming the problem, before anything is traced into a compiled loop."""
    t_cfg, d_cfg = target_model.cfg, draft_model.cfg
    if t_cfg.vocab_size != d_cfg.vocab_size:
        raise ValueError(
            f"target vocab_size={t_cfg.vocab_size} != draft vocab_size={d_cfg.vocab_size}: speculative"
            " sampling needs one tokenizer"
        )
    if prompt_bt.ndim != 2 or prompt_bt.shape[1] < 1:
        raise ValueError(f"prompt_bt must be [B, P] with P >= 1, got shape {prompt_bt.shape}")
    if keys_b.shape[0] != prompt_bt.shape[0]:
        raise ValueError(f"keys_b has {keys_b.shape[0]} keys for a batch of {prompt_bt.shape[0]} prompts")
    total = prompt_bt.shape[1] + opts.max_new_tokens
    for name, cfg in (("target", t_cfg), ("draft", d_cfg)):
        if total > cfg.max_len:
            raise ValueError(
                f"prompt length {prompt_bt.shape[1]} + max_new_tokens {opts.max_new_tokens} = {total} exceeds"
                f" the {name}'s max_len={cfg.max_len}"
            )


def init_state(target_model, draft_model, prompt_bt, opts):
    """Prefills both caches: the target with prompt[:-1], the draft with the whole prompt."""
    b, p = prompt_bt.shape
    g = opts.gamma
    # The last block starts at length <= P + N - 1 and writes up to slot P + N + gamma - 1.
    slots = p + opts.max_new_tokens + g
    target_cache = target_model.init_cache(b, slots)
    if p > 1:
        _, target_cache = target_model.forward_cached(prompt_bt[:, :-1], target_cache, 0)
    draft_logits_btv, draft_cache = draft_model.forward_cached(prompt_bt, draft_model.init_cache(b, slots), 0)
    tokens_bl = jnp.zeros((b, p + opts.max_new_tokens + 2 * g + 1), prompt_bt.dtype).at[:, :p].set(prompt_bt)
    zeros_b = jnp.zeros((b,), jnp.int32)
    return SpecState(
        tokens_bl=tokens_bl,
        length_b=jnp.full((b,), p, jnp.int32),
        target_cache=target_cache,
        draft_cache=draft_cache,
        draft_logits_bv=draft_logits_btv[:, -1],
        done_b=jnp.zeros((b,), bool),
        accepted_b=zeros_b,
        proposed_b=zeros_b,
        target_calls=jnp.zeros((), jnp.int32),
    )


def active(state, prompt_len, opts):
    """Rows still generating: no EOS yet and fewer than max_new_tokens new tokens."""
    return ~state.done_b & (state.length_b < prompt_len + opts.max_new_tokens)


def _draw(keys_b, probs_bv, opts):
    """One token per row from probs (its argmax when greedy: probs are then one-hot or a one-hot residual)."""
    if opts.temperature == 0.0:
        return _argmax(probs_bv)
    return jax.vmap(jax.random.categorical)(keys_b, jnp.log(probs_bv))


def _propose(state, draft_keys_bg, draft_model, opts):
    """gamma draft tokens and their distributions: [B, gamma] tokens, [B, gamma, V] q, new draft cache."""
    dist = dict(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)

    def draw(logits_bv, i):
        if opts.temperature == 0.0:  # the token is the argmax; q is its one-hot
            x_b = _argmax(logits_bv)
            return x_b.astype(state.tokens_bl.dtype), jax.nn.one_hot(x_b, logits_bv.shape[-1], dtype=jnp.float32)
        q_bv = sampling_probs(logits_bv, **dist)
        return _draw(draft_keys_bg[:, i], q_bv, opts).astype(state.tokens_bl.dtype), q_bv

    def body(carry, i):
        cache, logits_bv = carry
        x_b, q_bv = draw(logits_bv, i)
        logits_b1v, cache = draft_model.forward_cached(x_b[:, None], cache, state.length_b + i)
        return (cache, logits_b1v[:, 0]), (x_b, q_bv)

    # The last proposal needs no forward: the catch-up call in `block_step` feeds it if it is accepted.
    init = (state.draft_cache, state.draft_logits_bv)
    (cache, logits_bv), (xs_gb, qs_gbv) = jax.lax.scan(body, init, jnp.arange(opts.gamma - 1))
    x_b, q_bv = draw(logits_bv, opts.gamma - 1)
    drafts_bg = jnp.concatenate([xs_gb.T, x_b[:, None]], axis=1)
    q_bgv = jnp.concatenate([jnp.moveaxis(qs_gbv, 0, 1), q_bv[:, None]], axis=1)
    return drafts_bg, q_bgv, cache


def verify(p_bgv, q_bgv, drafts_bg, uniforms_bg, final_keys_b, opts):
    """The acceptance test and the replacement token.

    p_bgv: [B, gamma + 1, V] target distributions; q_bgv: [B, gamma, V] draft distributions of drafts_bg.
    Returns (n_b, token_b): the number of leading accepted drafts, and the token drawn at position n from
    residual(p_n, q_n) (with q_gamma = 0, i.e. the bonus token from p_gamma when all were accepted).
    """
    g = opts.gamma
    p_x = jnp.take_along_axis(p_bgv[:, :g], drafts_bg[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q_bgv, drafts_bg[..., None], axis=-1)[..., 0]
    accept_bg = uniforms_bg < acceptance_probs(p_x, q_x, lenience=opts.lenience)
    n_b = jnp.sum(jnp.cumprod(accept_bg.astype(jnp.int32), axis=1), axis=1)
    q_pad = jnp.concatenate([q_bgv, jnp.zeros_like(q_bgv[:, :1])], axis=1)
    p_n = jnp.take_along_axis(p_bgv, n_b[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(q_pad, n_b[:, None, None], axis=1)[:, 0]
    return n_b, _draw(final_keys_b, opts.residual(p_n, q_n), opts)


def _write_rows(buf_bl, new_bt, start_b):
    return jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (i,)))(buf_bl, new_bt, start_b)


def block_step(state, keys_b, target_model, draft_model, prompt_len, opts):
    """One propose / verify / accept block for every row; finished rows keep their length and counters.

    Row b's randomness in block j is split from fold_in(keys_b[b], j): gamma draft keys, one key for the
    gamma acceptance uniforms, one for the replacement token.  Finished rows still run (static shapes);
    their writes land past their output, where `finalize` never reads.
    """
    g, length_b = opts.gamma, state.length_b
    if opts.temperature == 0.0:
        # Greedy needs no randomness: acceptance probabilities are 0 or 1, and u = 0 < 1 accepts, 0 < 0 not.
        split_bk, uniforms_bg = jnp.zeros((length_b.shape[0], g + 2)), jnp.zeros((length_b.shape[0], g))
    else:
        block_keys_b = jax.vmap(lambda k: jax.random.fold_in(k, state.target_calls))(keys_b)
        split_bk = jax.vmap(lambda k: jax.random.split(k, g + 2))(block_keys_b)
        uniforms_bg = jax.vmap(lambda k: jax.random.uniform(k, (g,)))(split_bk[:, g])
    drafts_bg, q_bgv, draft_cache = _propose(state, split_bk[:, :g], draft_model, opts)

    last_b = jnp.take_along_axis(state.tokens_bl, (length_b - 1)[:, None], axis=1)
    inputs_bg1 = jnp.concatenate([last_b, drafts_bg], axis=1)  # positions length - 1 .. length + gamma - 1
    target_logits, target_cache = target_model.forward_cached(inputs_bg1, state.target_cache, length_b - 1)
    p_bgv = sampling_probs(target_logits, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    n_b, token_b = verify(p_bgv, q_bgv, drafts_bg, uniforms_bg, split_bk[:, g + 1], opts)
    token_b = token_b.astype(drafts_bg.dtype)

    # Output of the block at positions length .. length + n: drafts 1..n, then the replacement token.
    j_g1 = jnp.arange(g + 1)
    drafts_g1 = jnp.concatenate([drafts_bg, drafts_bg[:, :1]], axis=1)
    out_bg1 = jnp.where(j_g1 < n_b[:, None], drafts_g1, token_b[:, None])
    tokens_bl = _write_rows(state.tokens_bl, out_bg1, length_b)

    # Draft catch-up: feed the last two tokens of the new prefix at positions new_length - 2, new_length - 1.
    second_last_b = jnp.take_along_axis(inputs_bg1, n_b[:, None], axis=1)[:, 0]
    catch_up_b2 = jnp.stack([second_last_b, token_b], axis=1)
    draft_logits_b2v, draft_cache = draft_model.forward_cached(catch_up_b2, draft_cache, length_b + n_b - 1)

    live_b = active(state, prompt_len, opts)
    done_b = state.done_b
    if opts.eos_id is not None:
        done_b = done_b | (live_b & jnp.any((out_bg1 == opts.eos_id) & (j_g1 <= n_b[:, None]), axis=1))
    return SpecState(
        tokens_bl=tokens_bl,
        length_b=jnp.where(live_b, length_b + n_b + 1, length_b),
        target_cache=target_cache,
        draft_cache=draft_cache,
        draft_logits_bv=jnp.where(live_b[:, None], draft_logits_b2v[:, 1], state.draft_logits_bv),
        done_b=done_b,
        accepted_b=state.accepted_b + jnp.where(live_b, n_b, 0),
        proposed_b=state.proposed_b + jnp.where(live_b, g, 0),
        target_calls=state.target_calls + 1,
    )


def finalize(state, prompt_len, opts):
    """`sample`'s output: tokens [B, P + N] with `eos_id` after the first EOS, and the generated-token mask."""
    total = prompt_len + opts.max_new_tokens
    tokens = state.tokens_bl[:, :total]
    generated_l = jnp.arange(total) >= prompt_len
    mask = jnp.broadcast_to(generated_l, tokens.shape)
    if opts.eos_id is not None:
        is_eos = (tokens == opts.eos_id) & generated_l
        after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
        tokens = jnp.where(after_eos, opts.eos_id, tokens)
        mask = mask & ~after_eos
    return {"tokens": tokens, "mask": mask.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("target_graphdef", "draft_graphdef", "opts"))
def _run(target_params, draft_params, prompt_bt, keys_b, *, target_graphdef, draft_graphdef, opts):
    target_model = nnx.merge(target_graphdef, target_params)
    draft_model = nnx.merge(draft_graphdef, draft_params)
    check_models(target_model, draft_model, prompt_bt, keys_b, opts)
    p = prompt_bt.shape[1]
    state = jax.lax.while_loop(
        lambda s: jnp.any(active(s, p, opts)),
        lambda s: block_step(s, keys_b, target_model, draft_model, p, opts),
        init_state(target_model, draft_model, prompt_bt, opts),
    )
    return {
        **finalize(state, p, opts),
        "target_calls": state.target_calls,
        "accepted_b": state.accepted_b,
        "proposed_b": state.proposed_b,
    }


def run(target, draft, prompt_bt, keys_b, opts: SpecOptions):
    """`speculative_sample` with its settings in a `SpecOptions` (compiled once per options and shapes)."""
    (target_graphdef, target_params), (draft_graphdef, draft_params) = target, draft
    return _run(
        target_params,
        draft_params,
        prompt_bt,
        keys_b,
        target_graphdef=target_graphdef,
        draft_graphdef=draft_graphdef,
        opts=opts,
    )


def speculative_sample(
    target,
    draft,
    prompt_bt,
    keys_b,
    *,
    max_new_tokens,
    gamma,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    lenience=1.0,
    eos_id=None,
):
    """Samples from the target with the draft's help: `sampling.sample`'s output, with fewer target calls.

    Args:
      target, draft: (graphdef, params) pairs as `sampling.sample` takes them; same vocabulary.
      prompt_bt: [B, P] int prompts, P >= 1; P + max_new_tokens <= both models' max_len.
      keys_b: [B] PRNG keys: row b's output depends on keys_b[b] alone (not on its batch neighbours).
      gamma: draft tokens per block (static).  lenience: eps in (0, 1]; 1 is exact, < 1 DistillSpec's lossy SD.
      temperature, top_k, top_p, eos_id: as `sampling.sample`; temperature 0 = greedy, giving the target's
        greedy decoding token for token.
    Returns:
      dict with `tokens` [B, P + N] and `mask` [B, P + N] (as `sample`), `target_calls` (int32: batched
      verification forwards, the prefill not counted; tau_hat = generated tokens / target_calls at B = 1),
      `accepted_b` and `proposed_b` [B] int32 (draft tokens accepted / proposed; alpha_hat = their ratio).
    Jittable; compiles one `lax.while_loop` whose body is one block.  Bad arguments raise ValueError first.
    """
    opts = SpecOptions(
        max_new_tokens=max_new_tokens,
        gamma=gamma,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        lenience=lenience,
        eos_id=eos_id,
    )
    return run(target, draft, prompt_bt, keys_b, opts)
