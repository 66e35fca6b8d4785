"""Distillation losses: pure functions of logits (or hidden states), computed in float32 log-space.

Shape suffixes, used everywhere: b batch, t time, v vocabulary, k top-k entries, l layers,
d hidden width.  Suffixes name the axes of an argument (``student_logits_btv`` is [B, T, V]).

Conventions (docs/losses.md has the long form):

* p = softmax(teacher_logits / T) is the teacher, q = softmax(student_logits / T) the student.
  Both are computed as log-probabilities in at least float32, whatever the input dtype
  (bf16 in, float32 out; float64 stays float64 so that gradients can be checked in float64).
* Every loss returns ``(sum, count)``: T^2 * the sum over valid positions of the per-token value,
  and the number of valid positions (``sum(mask_bt)``).  The mean is ``sum / count``; callers add
  sums and counts across micro-batches, devices and hosts before dividing.  T^2 keeps gradient
  magnitudes comparable across temperatures (Hinton et al., 2015).
* Padded positions (``mask_bt == 0``) contribute nothing: their logits are replaced by zeros before
  anything is computed, so whatever they hold (even NaN or all -inf) changes neither the loss nor
  any gradient, and their gradient is exactly zero.
* -inf logits (a masked vocabulary) are supported, with finite values and gradients.
  0 * log 0 = 0, so an entry that has no mass on the side that weights a KL term contributes
  nothing.  When a KL term weights an entry with mass while the other side has none (the teacher
  has mass on a token the student masks with -inf; or, for rkl, the student has mass where the
  teacher masks), the true KL is +inf; here a log-probability of exactly -inf counts as
  log(smallest normal float) = log(1.18e-38) = -87.34 for float32, so that term is large and finite
  (about 87 * mass) and pushes mass out of the masked entry with a bounded gradient.  Finite
  log-probabilities, however negative, are used exactly.  Mask with -inf, not with a large finite
  number: with finite masks the loss is the exact (possibly enormous) KL of the logits given.
* Gradients flow to both teacher and student logits (they are plain functions); steps pass the
  teacher's outputs as constants.  Gradients are stopped only where a method says so: TAID's
  interpolated target, the TVD++ advantage, the SquareHead normaliser.
* Hyperparameters are keyword-only.  The divergences' (beta, alpha) are static Python floats,
  checked when the function is called or traced; temperature and TAID's t may be traced.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Numerics shared by every loss.


def _compute_dtype(*arrays):
    """At least float32; float64 inputs keep float64 (only used by the finite-difference tests)."""
    dtype = jnp.float32
    for a in arrays:
        dtype = jnp.promote_types(dtype, a.dtype)
    return dtype


def _log_floor(dtype):
    """log of the smallest normal number: what a log-probability of -inf counts as inside a log."""
    return float(np.log(np.finfo(dtype).tiny))


def _safe_log(logx):
    """-inf (an exact zero probability) -> log(tiny); every finite value is kept exactly.

    Only -inf is replaced, not everything below the floor: a finite log-probability of -120 is a real
    (if tiny) probability whose KL term and gradient must stay exact, or a confidently wrong student
    would get no gradient on that token.  The select sends a zero cotangent to the -inf entries,
    which are constants anyway.
    """
    return jnp.where(logx == -jnp.inf, _log_floor(logx.dtype), logx)


def _valid(mask_bt):
    return jnp.asarray(mask_bt) != 0


def _check_temperature(temperature):
    # A traced temperature cannot be checked; a Python one can, and a non-positive one is a bug.
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _clean(x, mask_bt, dtype):
    """Upcast, and replace padded positions by zeros so that they cannot produce NaN or gradients.

    jnp.where (a select) rather than a multiply: a multiply by 0 would still turn NaN/inf into NaN,
    in the values and in the gradients.
    """
    valid = _valid(mask_bt).reshape(mask_bt.shape + (1,) * (x.ndim - mask_bt.ndim))
    return jnp.where(valid, x.astype(dtype), 0)


def _log_probs(logits_btv, mask_bt, temperature, dtype):
    """log softmax(logits / T) over the last axis, padded positions replaced by a uniform row."""
    return jax.nn.log_softmax(_clean(logits_btv, mask_bt, dtype) / temperature, axis=-1)


def _reduce(per_token_bt, mask_bt, scale=1.0):
    """(scale * sum over valid positions, number of valid positions)."""
    weight_bt = jnp.asarray(mask_bt).astype(per_token_bt.dtype)
    # select, not multiply: a non-finite value at a padded position must not leak into the sum.
    total = jnp.sum(jnp.where(_valid(mask_bt), per_token_bt * weight_bt, 0))
    return scale * total, jnp.sum(weight_bt)


def _kl(loga, logb):
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last axis, from log-probabilities.

    This is the one KL of the library; every divergence below is built from it.  Both logs go
    through _safe_log: where a_v = 0 (log a_v = -inf) the factor a_v = exp(-inf) = 0 multiplies a
    finite number, which gives 0 * log 0 = 0 in the value *and* a zero, NaN-free gradient (a
    jnp.where around the whole term would still send 0 * inf = NaN back through its untaken
    branch).  Where a_v > 0 but b_v = 0 the term is a_v * (log a_v + 87.3) in float32, not +inf.
    """
    return jnp.sum(jnp.exp(loga) * (_safe_log(loga) - _safe_log(logb)), axis=-1)


def _log_mix(logp, logq, w):
    """log(w * p + (1 - w) * q) for a static weight w in [0, 1]."""
    # The endpoints return one side unchanged so that skl/srkl at alpha = 0 are exactly fkl/rkl.
    if w == 1:
        return logp
    if w == 0:
        return logq
    # In probability space: jnp.logaddexp's derivative is wrong-but-finite at -inf inputs (it
    # replaces them by 0) and logsumexp's is NaN when all inputs are -inf, both of which a masked
    # vocabulary produces.  m is accurate to float32 precision while it is a normal number; below
    # that it is floored, where it can only meet KL weights (p or q) that are themselves ~0.
    m = w * jnp.exp(logp) + (1 - w) * jnp.exp(logq)
    # Clamped before the log: log(0) has an infinite derivative, and infinity times the zero
    # cotangent of a masked entry is NaN.
    return jnp.log(jnp.maximum(m, np.finfo(m.dtype).tiny))


# --------------------------------------------------------------------------------------------
# Per-token divergences between two log-distributions over the last axis.
# Arguments: logp (teacher), logq (student), both normalised log-probabilities [..., V] (or
# [..., K] / [..., K+1] for top-k).  Result: [...].


def _check_open_unit(name, value, loss, at0, at1):
    if not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a static Python float, "
                        f"got {type(value).__name__}.")
    if value == 0:
        raise ValueError(f"{loss} with {name}=0 {at0}")
    if value == 1:
        raise ValueError(f"{loss} with {name}=1 {at1}")
    if not 0 < value < 1:
        raise ValueError(f"{loss}: {name} must be in (0, 1), got {value}.")


def _check_skew(value, loss, plain):
    if not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: alpha must be a static Python float, got {type(value).__name__}.")
    if value == 1:
        raise ValueError(f"{loss} with alpha=1 compares a distribution with itself and is "
                         f"identically zero; alpha must be in [0, 1) (alpha=0 is '{plain}').")
    if not 0 <= value < 1:
        raise ValueError(f"{loss}: alpha must be in [0, 1), got {value}.")


def _fkl(logp, logq):
    return _kl(logp, logq)


def _rkl(logp, logq):
    return _kl(logq, logp)


def _jsd(logp, logq, *, beta=0.5):
    _check_open_unit(
        "beta", beta, "jsd",
        at0="is identically zero (m = q); for small beta it behaves like beta * KL(p || q): "
            "use 'fkl'.",
        at1="is identically zero (m = p); for beta near 1 it behaves like (1 - beta) * KL(q || p): "
            "use 'rkl'.")
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def _tvd(logp, logq):
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


def _skl(logp, logq, *, alpha=0.1):
    _check_skew(alpha, "skl", "fkl")
    return _kl(logp, _log_mix(logp, logq, alpha))


def _srkl(logp, logq, *, alpha=0.1):
    _check_skew(alpha, "srkl", "rkl")
    return _kl(logq, _log_mix(logp, logq, 1 - alpha))


# name -> fn(logp, logq, **hparams) -> per-token divergence.  Shared by the dense losses,
# topk_kd and kd_objective so that a name means the same formula everywhere.
DIVERGENCES = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
    "skl": _skl,
    "srkl": _srkl,
}


def _divergence(name):
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise KeyError(f"Unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}."
                       ) from None


# --------------------------------------------------------------------------------------------
# Dense losses: LOSSES[name](student_logits_btv, teacher_logits_btv, mask_bt, *, temperature, ...)


def _dense(name, student_logits_btv, teacher_logits_btv, mask_bt, temperature, **hparams):
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits_btv, teacher_logits_btv)
    logq_btv = _log_probs(student_logits_btv, mask_bt, temperature, dtype)
    logp_btv = _log_probs(teacher_logits_btv, mask_bt, temperature, dtype)
    per_token_bt = _divergence(name)(logp_btv, logq_btv, **hparams)
    return _reduce(per_token_bt, mask_bt, scale=temperature**2)


def forward_kl(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0):
    """Forward KL, the classic distillation loss:  T^2 * sum_valid KL(p || q).

    KL(p || q) = sum_v p_v (log p_v - log q_v): mean-seeking, the student covers all teacher modes.
    Paper: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

    Args:
      student_logits_btv: [B, T, V] student logits, any float dtype.
      teacher_logits_btv: [B, T, V] teacher logits, any float dtype.
      mask_bt: [B, T] bool or 0/1, 1 where the position counts.
      temperature: T > 0, applied to both sides.
    Returns:
      (sum, count): float32 scalars.
    """
    return _dense("fkl", student_logits_btv, teacher_logits_btv, mask_bt, temperature)


def reverse_kl(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0):
    """Reverse KL:  T^2 * sum_valid KL(q || p) = sum_v q_v (log q_v - log p_v).

    Mode-seeking: the student concentrates on the teacher's main modes.
    Paper: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024;
    Agarwal et al., "On-Policy Distillation of Language Models (GKD)", ICLR 2024.

    Shapes and returns as `forward_kl`.
    """
    return _dense("rkl", student_logits_btv, teacher_logits_btv, mask_bt, temperature)


def jsd(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0, beta=0.5):
    """Generalised Jensen-Shannon divergence:

      T^2 * sum_valid [beta * KL(p || m) + (1 - beta) * KL(q || m)],  m = beta * p + (1 - beta) * q.

    beta -> 0 behaves like beta * KL(p || q), beta -> 1 like (1 - beta) * KL(q || p); at exactly 0 or 1
    it is identically zero, so those values raise a ValueError naming 'fkl' / 'rkl' instead.
    Paper: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes (GKD)", ICLR 2024.

    Args: as `forward_kl`, plus beta: static float in (0, 1).
    Returns: (sum, count).
    """
    return _dense("jsd", student_logits_btv, teacher_logits_btv, mask_bt, temperature, beta=beta)


def tvd(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0):
    """Total variation distance:  T^2 * sum_valid 1/2 sum_v |p_v - q_v|.

    Bounded in [0, 1] per token; 1 - TVD is the speculative-decoding acceptance rate.
    Paper: Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023;
    Goel et al., "Direct Alignment of Draft Model for Speculative Decoding with Chat-Fine-Tuned
    LLMs", 2024 (see `tvdpp`).

    Shapes and returns as `forward_kl`.
    """
    return _dense("tvd", student_logits_btv, teacher_logits_btv, mask_bt, temperature)


def skew_kl(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0, alpha=0.1):
    """Skew KL:  T^2 * sum_valid KL(p || alpha * p + (1 - alpha) * q).

    Mixing some teacher into the student side bounds the log-ratio by -log(alpha), which keeps
    gradients bounded when q is tiny where p is not.  alpha = 0 is `forward_kl`.
    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.

    Args: as `forward_kl`, plus alpha: static float in [0, 1).
    Returns: (sum, count).
    """
    return _dense("skl", student_logits_btv, teacher_logits_btv, mask_bt, temperature, alpha=alpha)


def skew_reverse_kl(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0, alpha=0.1):
    """Skew reverse KL:  T^2 * sum_valid KL(q || (1 - alpha) * p + alpha * q).  alpha = 0 is `reverse_kl`.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.

    Args: as `forward_kl`, plus alpha: static float in [0, 1).
    Returns: (sum, count).
    """
    return _dense("srkl", student_logits_btv, teacher_logits_btv, mask_bt, temperature, alpha=alpha)


def check_hparams(name, *, temperature=1.0, **hparams):
    """Raises the ValueError / TypeError that `LOSSES[name]` would raise for these hyperparameters, without
    a model: for validating a config before a run writes anything.  The checks are the losses' own."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    _check_temperature(temperature)
    example = jnp.zeros((1, 1, 2), jnp.float32)
    jax.eval_shape(lambda a: LOSSES[name](a, a, jnp.ones((1, 1)), temperature=temperature, **hparams), example)


# Configs name a loss by string: LOSSES[config.loss](student, teacher, mask, temperature=..., **hp).
LOSSES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
}


# --------------------------------------------------------------------------------------------
# Hard labels.


def cross_entropy(logits_btv, labels_bt, mask_bt):
    """Next-token cross-entropy  -log softmax(logits)[label], summed over valid positions.

    Labels at padded positions are ignored (they may hold -100 or any other filler).  A label whose
    logit is -inf gives -log(tiny) = 87.3 (float32) rather than +inf, as everywhere in this module.

    Args:
      logits_btv: [B, T, V] logits, any float dtype (upcast to float32).
      labels_bt: [B, T] int target ids.
      mask_bt: [B, T] bool/float, 1 where the position counts.
    Returns:
      (sum, count): float32 scalars; the mean is sum / count.
    """
    dtype = _compute_dtype(logits_btv)
    logq_btv = _log_probs(logits_btv, mask_bt, 1.0, dtype)
    labels_bt = jnp.where(_valid(mask_bt), labels_bt, 0)
    label_logq_bt = jnp.take_along_axis(logq_btv, labels_bt[..., None], axis=-1)[..., 0]
    return _reduce(-_safe_log(label_logq_bt), mask_bt)


def kd_objective(student_logits_btv, teacher_logits_btv, labels_bt, mask_bt, *, alpha,
                 divergence="fkl", temperature=1.0, **hparams):
    """Hard-label / soft-label mixture, token-weighted:

      sum_valid [alpha * CE(labels, q_{T=1}) + (1 - alpha) * T^2 * D(p_T, q_T)].

    Both terms are sums over the same valid tokens, so the mean is a per-token mixture (not a mix of
    two separately averaged losses).  CE is at temperature 1: the labels are hard.
    Paper: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
    For a top-k teacher store combine `cross_entropy` and `topk_kd` the same way.

    Args:
      student_logits_btv, teacher_logits_btv: [B, T, V].
      labels_bt: [B, T] int ids.
      mask_bt: [B, T].
      alpha: static float in [0, 1], the weight of the hard-label term.
      divergence: a name in LOSSES.
      temperature, **hparams: passed to LOSSES[divergence].
    Returns:
      (sum, count).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"kd_objective: alpha must be in [0, 1], got {alpha}.")
    ce_sum, count = cross_entropy(student_logits_btv, labels_bt, mask_bt)
    kd_sum, _ = LOSSES[divergence](student_logits_btv, teacher_logits_btv, mask_bt,
                                   temperature=temperature, **hparams)
    return alpha * ce_sum + (1 - alpha) * kd_sum, count


# --------------------------------------------------------------------------------------------
# Top-k sparse distillation from an offline teacher store.

TAILS = ("renormalize", "bucket")
# Bucket masses at or below this many ulps of 1 are rounding noise (see _with_bucket).
_TAIL_NOISE = 16


def _with_bucket(logprobs_btk, temperature, log_tail_bt=None):
    """[k ids | tail bucket] log-distribution from full-vocabulary log-probs (T = 1) at k ids.

    The bucket holds the remaining mass 1 - P_k, P_k = sum_k exp(logprobs), or exp(log_tail_bt) when
    given.  Temperature reshapes the distribution inside the k ids and leaves the bucket's mass as it
    is: for the teacher the tempered tail mass is unknowable from a top-k store, and treating both
    sides alike keeps the loss zero at p = q.  Exact at T = 1 and at k = V (the bucket is empty).
    """
    if log_tail_bt is None:
        # <= 0 because rounding can push the sum of all V probabilities a hair above 1.
        log_mass_bt = jnp.minimum(jax.nn.logsumexp(logprobs_btk, axis=-1), 0)
        tail_bt = -jnp.expm1(log_mass_bt)
    else:
        # A stored tail (logsumexp over the non-top-k logits) is exact even when 1 - P_k would
        # cancel or the top-k log-probs were stored in bf16; the head gets the rest of the mass.
        tail_bt = jnp.minimum(jnp.exp(log_tail_bt), 1)
        log_mass_bt = jnp.log1p(-tail_bt)
    # 1 - sum of k rounded probabilities cannot resolve a mass below a few ulps of 1: such a tail is
    # rounding noise (at k = V the true tail is 0), and the log floor would amplify it (rkl against an
    # empty teacher tail costs 87 * noise).  Treat it as empty.
    has_tail = tail_bt > _TAIL_NOISE * jnp.finfo(tail_bt.dtype).eps
    # Double where: at k = V the tail is exactly 0 and log(0) has an infinite derivative, which a
    # single where would still multiply into the gradient (0 * inf = NaN).
    log_tail_bt = jnp.where(has_tail, jnp.log(jnp.where(has_tail, tail_bt, 1)), -jnp.inf)
    head_btk = log_mass_bt[..., None] + jax.nn.log_softmax(logprobs_btk / temperature, axis=-1)
    return jnp.concatenate([head_btk, log_tail_bt[..., None]], axis=-1)


def _topk_log_probs(student_logits_btv, teacher_logprobs_btk, teacher_ids_btk, mask_bt,
                    temperature, tail, teacher_tail_logprob_bt):
    """(teacher, student) log-distributions over the k ids ("renormalize") or k ids + bucket."""
    _check_temperature(temperature)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}.")
    dtype = _compute_dtype(student_logits_btv, teacher_logprobs_btk)
    ids_btk = jnp.where(_valid(mask_bt)[..., None], teacher_ids_btk, 0)
    # Gather first, upcast after: only k columns of the student are touched here.
    student_btk = _clean(jnp.take_along_axis(student_logits_btv, ids_btk, axis=-1), mask_bt, dtype)
    teacher_btk = _clean(teacher_logprobs_btk, mask_bt, dtype)
    if tail == "renormalize":
        # Teacher log-probs differ from its logits by a per-token constant, so softmax(logprobs / T)
        # over the k ids is exactly the tempered teacher restricted and renormalised to those ids.
        return (jax.nn.log_softmax(teacher_btk / temperature, axis=-1),
                jax.nn.log_softmax(student_btk / temperature, axis=-1))
    _check_are_logprobs(teacher_logprobs_btk, mask_bt)
    # The student's bucket needs its full-vocabulary normaliser: the one [B, T, V] reduction.
    logz_bt = jax.nn.logsumexp(_clean(student_logits_btv, mask_bt, dtype), axis=-1)
    student_logprobs_btk = student_btk - logz_bt[..., None]
    if teacher_tail_logprob_bt is not None:
        # Padded positions get an empty tail (log 0), like everything else there: inert.
        teacher_tail_logprob_bt = jnp.where(_valid(mask_bt), teacher_tail_logprob_bt.astype(dtype),
                                            -jnp.inf)
    return (_with_bucket(teacher_btk, temperature, teacher_tail_logprob_bt),
            _with_bucket(student_logprobs_btk, temperature))


# Stored log-probs are rounded (bf16: 2^-8 relative), so their logsumexp may exceed 0 by a little.
_LOGPROB_SLACK = 0.02


def _check_are_logprobs(teacher_logprobs_btk, mask_bt):
    """Bucket mode needs full-vocabulary log-probs: raw top-k logits (logsumexp > 0) would make the tail
    bucket's mass 1 - sum(exp(logits)) meaningless, silently.  Checked when the inputs are concrete (eager
    calls, tests, data pipelines); under jit the values are unknown and the contract is the caller's."""
    if isinstance(teacher_logprobs_btk, jax.core.Tracer) or isinstance(mask_bt, jax.core.Tracer):
        return
    # NumPy, not jnp: inside someone else's jit a concrete constant must not become a traced value here.
    x = np.asarray(teacher_logprobs_btk, np.float32)
    top = np.max(x, axis=-1, keepdims=True)
    lse = (top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True)))[..., 0]
    bad = (lse > _LOGPROB_SLACK) & (np.asarray(mask_bt) != 0)
    if bad.any():
        raise ValueError(
            f"topk_kd(tail='bucket') needs the teacher's full-vocabulary log-probs at its top-k ids, but "
            f"{int(bad.sum())} position(s) have logsumexp up to {float(lse[bad].max()):.3f} > 0: these look "
            "like raw logits; pass logits - logsumexp(all logits) (kdjax.teacher_store.topk_targets does)"
        )


def topk_kd(student_logits_btv, teacher_logprobs_btk, teacher_ids_btk, mask_bt, *, divergence,
            temperature=1.0, tail, teacher_tail_logprob_bt=None, **hparams):
    """Top-k sparse distillation:  T^2 * sum_valid D(p~, q~) for any divergence in DIVERGENCES.

    p~, q~ are built from the teacher's k stored entries (log p at teacher_ids) and the student's
    logits at the same ids:
      tail="renormalize": p~ = softmax(log p_k / T), q~ = softmax(z_k / T) over the k ids.  Exact
        (the restricted, renormalised tempered distributions) at any T.
      tail="bucket": k ids plus one bucket with the remaining mass on each side (the student's from
        its full softmax at T = 1):  p~ = [P_k * softmax(log p_k / T), 1 - P_k], likewise q~.  Exact at
        T = 1; at T != 1 temperature acts inside the k ids only (see _with_bucket).
    At k = V both modes equal the dense loss.  Nothing of shape [B, T, V] is built except the
    student's log-normaliser in bucket mode (a fused reduction under jit).

    Paper: Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
    2025, for top-k teacher caches and the bias they introduce towards the head.

    Args:
      student_logits_btv: [B, T, V] student logits.
      teacher_logprobs_btk: [B, T, K] full-vocabulary log-softmax values (T = 1) of the teacher at
        its top-k ids, any float dtype.  Not raw logits: in bucket mode those give a wrong tail mass, so
        concrete (non-traced) inputs whose logsumexp exceeds 0 are refused with a ValueError.
      teacher_ids_btk: [B, T, K] int ids, distinct within a position.
      mask_bt: [B, T].
      divergence: a name in DIVERGENCES.
      temperature: T > 0.
      tail: "renormalize" or "bucket".
      teacher_tail_logprob_bt: optional [B, T] log of the teacher's mass outside its top-k, as the
        teacher store keeps it (exact, float32).  Bucket mode uses it instead of 1 - sum(top-k),
        which loses precision when the top-k holds nearly all the mass or is stored in bf16.
        Renormalize mode discards the tail and ignores it.
      **hparams: the divergence's hyperparameters (beta for jsd, alpha for skl / srkl).
    Returns:
      (sum, count).
    """
    logp_btk, logq_btk = _topk_log_probs(student_logits_btv, teacher_logprobs_btk, teacher_ids_btk,
                                         mask_bt, temperature, tail, teacher_tail_logprob_bt)
    return _reduce(_divergence(divergence)(logp_btk, logq_btk, **hparams), mask_bt,
                   scale=temperature**2)


# --------------------------------------------------------------------------------------------
# TAID: temporally adaptive interpolated distillation.


def _scaled(w, x):
    """w * x with 0 * (-inf) = 0: at t = 0 or 1 a side's masked entries must not become NaN."""
    return jnp.where(w == 0, 0, w * x)


def _interpolate(logp, logq, t):
    """log p_t = log_softmax((1 - t) * stop_gradient(log q) + t * log p).

    Interpolating log-probabilities at temperature T equals interpolating logits and dividing by T:
    the normalisers are per-token constants that the softmax removes.
    """
    mixed = _scaled(1 - t, jax.lax.stop_gradient(logq)) + _scaled(t, logp)
    return jax.nn.log_softmax(mixed, axis=-1)


def taid(student_logits_btv, teacher_logits_btv, mask_bt, *, t, temperature=1.0):
    """TAID loss:  T^2 * sum_valid KL(p_t || q),

      p_t = softmax(((1 - t) * stop_gradient(student_logits) + t * teacher_logits) / T).

    The target moves from the (detached) student towards the teacher as t goes 0 -> 1, which
    softens the capacity gap early in training.  At t = 1 it is `forward_kl`.
    Paper: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025.

    Args:
      student_logits_btv, teacher_logits_btv: [B, T, V].
      mask_bt: [B, T].
      t: interpolation coefficient in [0, 1], a scalar (may be traced: it lives in TaidState).
      temperature: T > 0.
    Returns:
      (sum, count).
    """
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits_btv, teacher_logits_btv)
    logq_btv = _log_probs(student_logits_btv, mask_bt, temperature, dtype)
    logp_btv = _log_probs(teacher_logits_btv, mask_bt, temperature, dtype)
    logpt_btv = _interpolate(logp_btv, logq_btv, t)
    return _reduce(_kl(logpt_btv, logq_btv), mask_bt, scale=temperature**2)


def taid_topk(student_logits_btv, teacher_logprobs_btk, teacher_ids_btk, mask_bt, *, t,
              temperature=1.0, tail, teacher_tail_logprob_bt=None):
    """TAID on a top-k teacher store: KL(p~_t || q~) with the restricted distributions of `topk_kd`.

    p~_t = softmax((1 - t) * stop_gradient(log q~) + t * log p~) over the k ids (and the bucket).
    At t = 1 it is topk_kd(divergence="fkl").  Paper: Shing et al., ICLR 2025.

    Args: as `topk_kd` (no divergence), plus t in [0, 1].
    Returns: (sum, count).
    """
    logp_btk, logq_btk = _topk_log_probs(student_logits_btv, teacher_logprobs_btk, teacher_ids_btk,
                                         mask_bt, temperature, tail, teacher_tail_logprob_bt)
    logpt_btk = _interpolate(logp_btk, logq_btk, t)
    return _reduce(_kl(logpt_btk, logq_btk), mask_bt, scale=temperature**2)


class TaidState(NamedTuple):
    """TAID schedule state; a pytree of float32 scalars that lives in (and is checkpointed with) the
    train state.  prev_loss = inf means "no previous step yet"."""

    t: Array
    momentum: Array
    prev_loss: Array


class TaidSchedule(NamedTuple):
    """TAID's schedule hyperparameters, one object for `taid_init` and `taid_update` so the two cannot
    disagree on t_start.  Defaults are the paper's and the official code's (t_start 0.4, alpha 5e-4,
    beta 0.99; the official scripts also use t_start 0.2)."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    eps: float = 1e-8

    def check(self):
        """ValueError naming the first hyperparameter out of range."""
        if not 0 <= self.t_start < 1:
            raise ValueError(f"taid t_start must be in [0, 1), got {self.t_start}")
        if not self.t_start < self.t_end <= 1:
            raise ValueError(f"taid t_end must be in (t_start={self.t_start}, 1], got {self.t_end}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"taid alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"taid beta must be in [0, 1), got {self.beta}")
        return self


def check_taid_schedule(**kwargs):
    """`TaidSchedule(**kwargs).check()`: for validating a config's `taid` section before a run."""
    return TaidSchedule(**kwargs).check()


def taid_init(schedule: TaidSchedule = TaidSchedule()):
    """The schedule's state before the first step: t = t_start, momentum 0, no previous loss."""
    return TaidState(t=jnp.asarray(schedule.t_start, jnp.float32), momentum=jnp.zeros((), jnp.float32),
                     prev_loss=jnp.asarray(jnp.inf, jnp.float32))


def taid_update(taid_state, loss, step, total_steps, schedule: TaidSchedule = TaidSchedule()):
    """The adaptive update of t after a step, a pure function (jit-able, no host sync).

      first call (no previous loss): only record the loss; t and m stay as they are
      delta = (L_prev - L) / (L_prev + eps)          relative improvement of the TAID objective
      m    <- beta * m + (1 - beta) * delta
      t    <- min(t_end, max(t_start + (t_end - t_start) * step / total_steps,
                             t + alpha * sigmoid(m) * (1 - t)))

    t never falls below the linear schedule and moves faster while the loss is still improving.
    Paper: Shing et al., "TAID", ICLR 2025, Algorithm 1: the momentum, the sigmoid step and the floor at
    the linear schedule are the paper's; L is the paper's objective J^(t) = KL(p_t || q) (the official
    code feeds its loss function's value, the cross-entropy KL + H(p_t), instead).  The paper does not say
    what the first step does; as in the official code (SakanaAI/TAID, distil_losses/taid.py) it only
    records the loss.

    Args:
      taid_state: TaidState.
      loss: scalar, the mean TAID loss (KL(p_t || q)) of the step just taken (gradients are stopped).
      step: index of that step (0-based); total_steps: length of the schedule.
      schedule: the hyperparameters, the same object `taid_init` got.
    Returns:
      The new TaidState; its t is used by the next step.
    """
    t_start, t_end, alpha, beta, eps = schedule
    loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
    prev = taid_state.prev_loss
    first = ~jnp.isfinite(prev)
    delta = jnp.where(first, 0.0, (prev - loss) / (jnp.where(first, 1.0, prev) + eps))
    momentum = beta * taid_state.momentum + (1 - beta) * delta
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    t_linear = t_start + (t_end - t_start) * progress
    t_adaptive = taid_state.t + alpha * jax.nn.sigmoid(momentum) * (1 - taid_state.t)
    t = jnp.minimum(t_end, jnp.maximum(t_linear, t_adaptive))
    return TaidState(
        t=jnp.where(first, taid_state.t, t).astype(jnp.float32),
        momentum=jnp.where(first, taid_state.momentum, momentum).astype(jnp.float32),
        prev_loss=loss,
    )


# --------------------------------------------------------------------------------------------
# TVD++: policy-gradient TVD for aligning speculative-decoding drafts.


def normalized_advantage(reward_bt, mask_bt, *, eps=1e-6):
    """(r - mean) / (std + eps), mean and std over all valid (b, t) positions of the batch.

    One scalar baseline and scale for the whole batch (the batch of tokens sampled from the draft),
    taken over the batch and time axes together, padded positions excluded; under jit on a sharded
    batch the sums are global, so every device uses the same statistics.  Gradients are stopped.

    Args:
      reward_bt: [B, T] rewards.  mask_bt: [B, T].
    Returns:
      [B, T] advantages (0 at padded positions).
    """
    valid = _valid(mask_bt)
    reward_bt = jnp.where(valid, reward_bt, 0)
    count = jnp.maximum(jnp.sum(valid), 1)
    mean = jnp.sum(reward_bt) / count
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (reward_bt - mean) ** 2, 0)) / count)
    return jax.lax.stop_gradient(jnp.where(valid, (reward_bt - mean) / (std + eps), 0))


def tvdpp(student_logits_btv, teacher_logits_btv, tokens_bt, mask_bt, *, temperature=1.0,
          advantage_stats=None, eps=1e-6):
    """TVD++ surrogate:  -T^2 * sum_valid A(x) * log q(x),  x ~ q sampled by the student (draft).

    Reward r(x) = 1[p(x) > q(x)], advantage A = (r - mean) / (std + eps) with the statistics of
    `normalized_advantage` (over all valid positions of the batch).  Why it works:
    grad TVD(p, q) = sum_x 1[q > p] grad q = -E_{x~q}[1[p(x) > q(x)] grad log q(x)], so with a constant
    baseline and scale the expected gradient of this surrogate is grad TVD / scale (with
    advantage_stats=(0, 1) it equals the gradient of LOSSES["tvd"], T^2 included).
    Paper: Goel et al., "Direct Alignment of Draft Model for Speculative Decoding with
    Chat-Fine-Tuned LLMs", 2024.

    Args:
      student_logits_btv, teacher_logits_btv: [B, T, V].
      tokens_bt: [B, T] int ids sampled from the student at this temperature.
      mask_bt: [B, T].
      temperature: T > 0, for both the reward comparison and log q.
      advantage_stats: None for batch statistics, or a (mean, std) pair used instead (running
        statistics; constants in tests).
      eps: added to std.
    Returns:
      (sum, count): a surrogate whose value is not a divergence; only its gradient means something.
    """
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits_btv, teacher_logits_btv)
    logq_btv = _log_probs(student_logits_btv, mask_bt, temperature, dtype)
    logp_btv = _log_probs(teacher_logits_btv, mask_bt, temperature, dtype)
    tokens_bt = jnp.where(_valid(mask_bt), tokens_bt, 0)
    logq_x_bt = jnp.take_along_axis(logq_btv, tokens_bt[..., None], axis=-1)[..., 0]
    logp_x_bt = jnp.take_along_axis(logp_btv, tokens_bt[..., None], axis=-1)[..., 0]
    reward_bt = (logp_x_bt > logq_x_bt).astype(dtype)
    if advantage_stats is None:
        advantage_bt = normalized_advantage(reward_bt, mask_bt, eps=eps)
    else:
        mean, std = advantage_stats
        advantage_bt = jax.lax.stop_gradient((reward_bt - mean) / (std + eps))
    return _reduce(-advantage_bt * _safe_log(logq_x_bt), mask_bt, scale=temperature**2)


# --------------------------------------------------------------------------------------------
# Feature (hidden-state) losses.
# Hidden states: a sequence of L per-layer [B, T, D] arrays, or one stacked [L, B, T, D] array.
# A layer map is a static tuple of (student_layer, teacher_layer) index pairs.


def uniform_layer_map(num_student_layers, num_teacher_layers):
    """Student layer i -> teacher layer round((i + 1) * L_t / L_s) - 1 (round half up).

    The last student layer meets the last teacher layer, the rest are spread evenly: 4 -> 12 gives
    ((0, 2), (1, 5), (2, 8), (3, 11)); equal depths give the identity.
    """
    if num_student_layers <= 0 or num_teacher_layers <= 0:
        raise ValueError("layer counts must be positive.")
    # Integer arithmetic: Python's round() rounds half to even and floats drift.
    l_s, l_t = num_student_layers, num_teacher_layers
    return tuple((i, ((i + 1) * l_t * 2 + l_s) // (2 * l_s) - 1) for i in range(l_s))


def _layer_pairs(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, layer_map):
    if layer_map is None:
        layer_map = uniform_layer_map(len(student_hiddens_lbtd), len(teacher_hiddens_lbtd))
    pairs = []
    for i, j in layer_map:
        s_btd, t_btd = student_hiddens_lbtd[i], teacher_hiddens_lbtd[j]
        if s_btd.shape != t_btd.shape:
            raise ValueError(f"student layer {i} has shape {s_btd.shape}, teacher layer {j} has "
                             f"{t_btd.shape}; project the student's features to the teacher's "
                             "width first (a learned map belongs in the model, not the loss).")
        dtype = _compute_dtype(s_btd, t_btd)
        pairs.append((_clean(s_btd, mask_bt, dtype), _clean(t_btd, mask_bt, dtype)))
    return pairs


def hidden_mse(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, *, layer_map=None):
    """Hidden-state MSE:  sum_valid sum_{(i,j) in layer_map} mean_d (h^s_i - h^t_j)^2.

    Paper: Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", 2020;
    Romero et al., "FitNets", 2015.

    Args:
      student_hiddens_lbtd: L_s per-layer [B, T, D] arrays (sequence or stacked).
      teacher_hiddens_lbtd: L_t per-layer [B, T, D] arrays.
      mask_bt: [B, T].
      layer_map: static ((student_layer, teacher_layer), ...); None uses uniform_layer_map.
    Returns:
      (sum, count), count = valid positions (the mean is per token, summed over layer pairs).
    """
    pairs = _layer_pairs(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, layer_map)
    per_token_bt = sum(jnp.mean((s - t) ** 2, axis=-1) for s, t in pairs)
    return _reduce(per_token_bt, mask_bt)


def hidden_cosine(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, *, layer_map=None, eps=1e-8):
    """Hidden-state cosine loss:  sum_valid sum_{(i,j)} (1 - cos(h^s_i, h^t_j)).

    Insensitive to feature scale, so it suits students whose activations are scaled differently.
    Paper: Sanh et al., "DistilBERT", 2019 (cosine embedding loss).

    Args and returns as `hidden_mse`; eps floors the norms (a zero vector has cosine 0, not NaN).
    """
    def _normalise(x):
        # max before sqrt: the derivative of sqrt at 0 is infinite.
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps**2))

    pairs = _layer_pairs(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, layer_map)
    per_token_bt = sum(1 - jnp.sum(_normalise(s) * _normalise(t), axis=-1) for s, t in pairs)
    return _reduce(per_token_bt, mask_bt)


def squarehead(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, *, layer_map=None, eps=1e-8):
    """SquareHead:  sum_{(i,j)} MSE(h^s_i, h^t_j) / MSE(h^t_j, 0), over the valid tokens of the batch.

    Each layer's squared error is divided by the teacher feature's mean square (its second moment,
    the "variance" of the paper's zero-centred view), so layers of very different scale weigh alike.
    The normaliser is a statistic of this call's valid tokens (gradients stopped); sum / count is
    the paper's loss on this batch.
    Paper: Kurtic et al., "Sparse Finetuning for Inference Acceleration of Large Language Models", 2023.

    Args and returns as `hidden_mse`; eps guards an all-zero teacher layer.
    """
    pairs = _layer_pairs(student_hiddens_lbtd, teacher_hiddens_lbtd, mask_bt, layer_map)
    valid_bt1 = _valid(mask_bt)[..., None]
    per_token_bt = 0.0
    for s, t in pairs:
        # Padded rows are already zero; divide by the number of valid elements only.
        n = jnp.maximum(jnp.sum(valid_bt1) * t.shape[-1], 1)
        teacher_power = jax.lax.stop_gradient(jnp.sum(t * t) / n)
        per_token_bt = per_token_bt + jnp.mean((s - t) ** 2, axis=-1) / (teacher_power + eps)
    return _reduce(per_token_bt, mask_bt)


# --------------------------------------------------------------------------------------------
# Metrics, also as (sum, count) so that they average exactly like the losses.


def top1_agreement(student_logits_btv, teacher_logits_btv, mask_bt):
    """sum_valid 1[argmax q = argmax p] (ties: the lowest id).  Returns (sum, count)."""
    agree_bt = jnp.argmax(student_logits_btv, axis=-1) == jnp.argmax(teacher_logits_btv, axis=-1)
    return _reduce(agree_bt.astype(jnp.float32), mask_bt)


def acceptance_rate(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0):
    """Speculative-decoding acceptance:  sum_valid sum_v min(p_v, q_v) = sum_valid (1 - TVD(p, q)).

    The probability that a token drafted from q is accepted by target p (no T^2: it is a
    probability).  Paper: Leviathan et al., 2023; Zhou et al., "DistillSpec", ICLR 2024.

    Args: as `forward_kl`.  Returns: (sum, count).
    """
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits_btv, teacher_logits_btv)
    q_btv = jnp.exp(_log_probs(student_logits_btv, mask_bt, temperature, dtype))
    p_btv = jnp.exp(_log_probs(teacher_logits_btv, mask_bt, temperature, dtype))
    return _reduce(jnp.sum(jnp.minimum(p_btv, q_btv), axis=-1), mask_bt)


def entropy(logits_btv, mask_bt, *, temperature=1.0):
    """sum_valid H(softmax(logits / T)) = -sum_v p_v log p_v, in nats, 0 log 0 = 0.  Returns (sum, count)."""
    _check_temperature(temperature)
    dtype = _compute_dtype(logits_btv)
    logp_btv = _log_probs(logits_btv, mask_bt, temperature, dtype)
    return _reduce(-jnp.sum(jnp.exp(logp_btv) * _safe_log(logp_btv), axis=-1), mask_bt)


def distill_metrics(student_logits_btv, teacher_logits_btv, mask_bt, *, temperature=1.0):
    """All metrics at once: {name: (sum, count)} for logging."""
    return {
        "top1_agreement": top1_agreement(student_logits_btv, teacher_logits_btv, mask_bt),
        "acceptance": acceptance_rate(student_logits_btv, teacher_logits_btv, mask_bt,
                                      temperature=temperature),
        "teacher_entropy": entropy(teacher_logits_btv, mask_bt, temperature=temperature),
        "student_entropy": entropy(student_logits_btv, mask_bt, temperature=temperature),
    }
