"""Diffusion schedules, samplers, classifier-free guidance and distillation targets: pure functions.

Conventions (Kingma et al. 2021, "Variational Diffusion Models"; Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models"; Meng et al. 2023, "On Distillation of Guided
Diffusion Models"):

  * Continuous time t in [0, 1]; t = 0 is data, t = 1 is noise.  Everything is a function of the
    log signal-to-noise ratio  lambda = log(alpha^2 / sigma^2), decreasing in t.
  * Variance preserving:  alpha^2 = sigmoid(lambda),  sigma^2 = sigmoid(-lambda),  alpha^2 + sigma^2 = 1.
  * Noising:  z_t = alpha_t x + sigma_t eps,  eps ~ N(0, I).
  * Cosine schedule in log-SNR:  lambda(t) = -2 log tan(a t + b),  b = arctan(exp(-lambda_max / 2)),
    a = arctan(exp(-lambda_min / 2)) - b, so lambda(0) = lambda_max and lambda(1) = lambda_min
    (default [-20, 20], as the papers' configs).
  * Model outputs: x (the clean data), eps (the noise) or v = alpha eps - sigma x; then
    x = alpha z - sigma v and eps = sigma z + alpha v.
  * DDIM step t -> s (s < t):  z_s = alpha_s x_hat + sigma_s eps_hat,  eps_hat = (z_t - alpha_t x_hat) / sigma_t,
    written with  sigma_s / sigma_t = exp((softplus(lambda_t) - softplus(lambda_s)) / 2)  so that
    lambda = +-20 stays finite in float32.  The last step of a sampler (s = 0) returns x_hat itself.
  * Classifier-free guidance:  x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null); w = 0 is the plain
    conditional model.  The null class is a reserved label id (the last one, `num_classes`).
  * N-step samplers use the uniform grid t_i = i / N, i = N .. 0.

Shapes: `b` is the batch; `...` any per-example shape (2 for points, 8x8x1 for images).  Per-example
scalars (logsnr, labels, w) are [b] and broadcast over the example's dimensions.  Elementwise functions
accept any shape and float32 or float64 and return the input's dtype.

Denoisers passed to samplers and targets are functions  `denoise(z_b..., logsnr_b) -> (x_hat_b..., evals)`
where `evals` is the number of network evaluations per sample the call cost (1 for a plain model, 2 for
a guided one whose conditional and null halves run as one batched forward); samplers add them up.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
PREDICTIONS = ("x", "eps", "v")
WEIGHTINGS = ("snr_trunc", "snr_plus_one")


def _float(x):
    """x as a floating jax array, keeping float64 (under x64) and promoting ints to float32."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _bcast(per_example_b, like):
    """[b] (or scalar) -> broadcastable against `like` [b, ...], in `like`'s dtype."""
    v = jnp.asarray(per_example_b, like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def cosine_logsnr(t, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
    """lambda(t) = -2 log tan(a t + b), spanning [logsnr_max, logsnr_min] for t in [0, 1].

    Args:
      t: times in [0, 1], any shape, float32 or float64.
    Returns:
      log-SNR of the same shape and dtype; strictly decreasing in t.
    """
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min={logsnr_min} must be < logsnr_max={logsnr_max}")
    t = _float(t)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return (-2.0 * jnp.log(jnp.tan(a * t + b))).astype(t.dtype)


def cosine_t(logsnr, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
    """The inverse of `cosine_logsnr`: t = (arctan(exp(-lambda / 2)) - b) / a."""
    logsnr = _float(logsnr)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return ((jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a).astype(logsnr.dtype)


def alpha_sigma(logsnr):
    """(alpha, sigma) with alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); same shape and dtype."""
    logsnr = _float(logsnr)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def sigma_ratio(logsnr_t, logsnr_s):
    """sigma_s / sigma_t = exp((softplus(lambda_t) - softplus(lambda_s)) / 2), stable at lambda = +-20."""
    logsnr_t, logsnr_s = _float(logsnr_t), _float(logsnr_s)
    return jnp.exp(0.5 * (jax.nn.softplus(logsnr_t) - jax.nn.softplus(logsnr_s)))


def diffuse(x, eps, logsnr_b):
    """z = alpha x + sigma eps (the forward process at log-SNR lambda, per example)."""
    x = _float(x)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, x))
    return alpha * x + sigma * jnp.asarray(eps, x.dtype)


# ----------------------------------------------------------------------------------------------------
# Parametrisations: x, eps, v
# ----------------------------------------------------------------------------------------------------


def eps_from_x(z, x, logsnr_b):
    """eps = (z - alpha x) / sigma."""
    z = _float(z)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, z))
    return (z - alpha * x) / sigma


def x_from_eps(z, eps, logsnr_b):
    """x = (z - sigma eps) / alpha (ill-conditioned where alpha -> 0: prefer v or x outputs)."""
    z = _float(z)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, z))
    return (z - sigma * eps) / alpha


def v_from_x_eps(x, eps, logsnr_b):
    """v = alpha eps - sigma x."""
    x = _float(x)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, x))
    return alpha * jnp.asarray(eps, x.dtype) - sigma * x


def x_from_v(z, v, logsnr_b):
    """x = alpha z - sigma v."""
    z = _float(z)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, z))
    return alpha * z - sigma * jnp.asarray(v, z.dtype)


def eps_from_v(z, v, logsnr_b):
    """eps = sigma z + alpha v."""
    z = _float(z)
    alpha, sigma = alpha_sigma(_bcast(logsnr_b, z))
    return sigma * z + alpha * jnp.asarray(v, z.dtype)


def x_from_output(output, z, logsnr_b, *, prediction: str):
    """The model's x_hat from its raw output in the `prediction` ("x", "eps" or "v") parametrisation."""
    if prediction == "x":
        return _float(output).astype(_float(z).dtype)
    if prediction == "eps":
        return x_from_eps(z, output, logsnr_b)
    if prediction == "v":
        return x_from_v(z, output, logsnr_b)
    raise ValueError(f"prediction {prediction!r}; expected one of {PREDICTIONS}")


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def loss_weight(logsnr, *, weighting: str):
    """Weight on the x-space MSE: "snr_trunc" max(SNR, 1) or "snr_plus_one" SNR + 1 (SNR = exp(lambda)).

    max(SNR, 1) |x - x_hat|^2 = max(|x - x_hat|^2, |eps - eps_hat|^2) (Salimans & Ho's "truncated SNR");
    (SNR + 1) |x - x_hat|^2 = |v - v_hat|^2.
    """
    snr = jnp.exp(_float(logsnr))
    if weighting == "snr_trunc":
        return jnp.maximum(snr, 1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    raise ValueError(f"weighting {weighting!r}; expected one of {WEIGHTINGS}")


def weighted_x_mse(x_hat, x, logsnr_b, *, weighting: str, mask_b=None):
    """sum_b m_b w(lambda_b) mean_i (x_hat_bi - x_bi)^2 and sum_b m_b, computed in float32 (or float64).

    The per-example error is a mean over the example's dimensions, so the loss scale does not grow with
    the resolution.  Returns (sum, count) so callers average exactly across devices and hosts.
    """
    x_hat, x = _float(x_hat), _float(x)
    dt = jnp.promote_types(x.dtype, jnp.float32)
    err_b = jnp.mean(jnp.square(x_hat.astype(dt) - x.astype(dt)).reshape(x.shape[0], -1), axis=-1)
    w_b = loss_weight(jnp.asarray(logsnr_b, dt), weighting=weighting)
    m_b = jnp.ones_like(err_b) if mask_b is None else jnp.asarray(mask_b, dt)
    return jnp.sum(m_b * w_b * err_b), jnp.sum(m_b)


def snr_trunc_loss(x_hat, x, logsnr_b, mask_b=None):
    """`weighted_x_mse` with max(SNR, 1): (sum, count)."""
    return weighted_x_mse(x_hat, x, logsnr_b, weighting="snr_trunc", mask_b=mask_b)


def snr_plus_one_loss(x_hat, x, logsnr_b, mask_b=None):
    """`weighted_x_mse` with SNR + 1 (the v-MSE): (sum, count)."""
    return weighted_x_mse(x_hat, x, logsnr_b, weighting="snr_plus_one", mask_b=mask_b)


# ----------------------------------------------------------------------------------------------------
# DDIM, targets, guidance
# ----------------------------------------------------------------------------------------------------


def ddim_step(z_t, x_hat, logsnr_t, logsnr_s):
    """z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t (deterministic DDIM, t -> s).

    `logsnr_t`, `logsnr_s` are scalars or per-example [b]; any example shape; same dtype out as z_t.
    """
    z_t = _float(z_t)
    lt, ls = _bcast(logsnr_t, z_t), _bcast(logsnr_s, z_t)
    alpha_t, _ = alpha_sigma(lt)
    alpha_s, _ = alpha_sigma(ls)
    x_hat = jnp.asarray(x_hat, z_t.dtype)
    return alpha_s * x_hat + sigma_ratio(lt, ls) * (z_t - alpha_t * x_hat)


def distill_target(z_t, z_s, logsnr_t, logsnr_s):
    """The x_tilde whose DDIM step from z_t at lambda_t lands exactly on z_s at lambda_s:

        x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).

    With z_s the teacher's two-step result this is the progressive-distillation target (Salimans & Ho,
    Alg. 2).  The denominator is sigma_s (alpha_s / sigma_s - alpha_t / sigma_t) > 0 for lambda_s > lambda_t.
    """
    z_t = _float(z_t)
    lt, ls = _bcast(logsnr_t, z_t), _bcast(logsnr_s, z_t)
    alpha_t, _ = alpha_sigma(lt)
    alpha_s, _ = alpha_sigma(ls)
    ratio = sigma_ratio(lt, ls)
    return (jnp.asarray(z_s, z_t.dtype) - ratio * z_t) / (alpha_s - ratio * alpha_t)


def guide(x_cond, x_uncond, w):
    """Classifier-free guidance x_hat_w = (1 + w) x_cond - w x_uncond; w scalar or per-example [b]."""
    x_cond = _float(x_cond)
    w = _bcast(w, x_cond)
    return (1.0 + w) * x_cond - w * jnp.asarray(x_uncond, x_cond.dtype)


def drop_labels(key, labels_b, *, p_uncond: float, null_class: int):
    """Each label replaced by `null_class` with probability p_uncond (CFG training's label dropout)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond={p_uncond} must be in [0, 1]")
    drop = jax.random.bernoulli(key, p_uncond, jnp.shape(labels_b))
    return jnp.where(drop, jnp.asarray(null_class, jnp.asarray(labels_b).dtype), labels_b)


def guided_x(x_fn: Callable, z, logsnr_b, labels_b, w_b, *, null_class: int):
    """Guided x_hat_w from ONE batched forward of the conditional and null halves.

    `x_fn(z_2b..., logsnr_2b, labels_2b) -> x_hat_2b...`.  Costs 2 network evaluations per sample.
    """
    b = z.shape[0]
    null = jnp.full_like(jnp.asarray(labels_b), null_class)
    both = x_fn(
        jnp.concatenate([z, z]),
        jnp.concatenate([jnp.broadcast_to(logsnr_b, (b,))] * 2),
        jnp.concatenate([labels_b, null]),
    )
    return guide(both[:b], both[b:], w_b)


def is_power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def halve_steps(num_steps: int) -> int:
    """The student's step count in one progressive-distillation stage: N / 2; N must be a power of two >= 2."""
    if not is_power_of_two(num_steps) or num_steps < 2:
        raise ValueError(f"progressive distillation halves N: N={num_steps!r} must be a power of two >= 2")
    return num_steps // 2


def student_grid(i_b, num_student_steps: int, *, logsnr_fn=cosine_logsnr):
    """(logsnr_t, logsnr_mid, logsnr_s) of student step i on an N-step grid: t = (i+1)/N, mid = t - 1/(2N),
    s = t - 1/N, i in [0, N).  The teacher's 2N-step grid contains all three, so the two agree."""
    n = float(num_student_steps)
    t = (jnp.asarray(i_b, jnp.float32) + 1.0) / n
    return logsnr_fn(t), logsnr_fn(t - 0.5 / n), logsnr_fn(t - 1.0 / n)


def progressive_target(teacher_x: Callable, z_t, i_b, num_student_steps: int, *, logsnr_fn=cosine_logsnr):
    """Salimans & Ho Alg. 2: the x the student must predict at z_t so that ONE of its DDIM steps equals
    TWO of the teacher's.

    Student step i (t = (i+1)/N -> s = i/N); the teacher steps t -> t - 1/(2N) -> s.  For i > 0 the
    target is `distill_target(z_t, z_s'', ...)`; for i = 0 the step is the sampler's last, which returns
    x_hat instead of z_0, so the target is the teacher's second x_hat itself.

    Args:
      teacher_x: (z_b..., logsnr_b) -> x_hat_b... (unclipped; any guidance inside it).
      z_t: noisy inputs at the student's t_i; i_b: int [b] student step index in [0, N).
    Returns:
      x_tilde_b... (same dtype as z_t).
    """
    lt, lm, ls = student_grid(i_b, num_student_steps, logsnr_fn=logsnr_fn)
    lt, lm, ls = (x.astype(_float(z_t).dtype) for x in (lt, lm, ls))
    x1 = teacher_x(z_t, lt)
    z_mid = ddim_step(z_t, x1, lt, lm)
    x2 = teacher_x(z_mid, lm)
    z_s = ddim_step(z_mid, x2, lm, ls)
    target = distill_target(z_t, z_s, lt, ls)
    last = _bcast(jnp.asarray(i_b) == 0, target).astype(bool)
    return jnp.where(last, x2, target)


# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------


def _check_steps(num_steps):
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def _denoise_step(denoise, z, t, *, clip, logsnr_fn):
    b = z.shape[0]
    logsnr_b = jnp.broadcast_to(logsnr_fn(t).astype(z.dtype), (b,))
    x_hat, evals = denoise(z, logsnr_b)
    if clip:
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
    return x_hat.astype(z.dtype), jnp.asarray(evals, jnp.int32)


def ddim_sample(denoise: Callable, z_1, *, num_steps: int, clip: bool = False, logsnr_fn=cosine_logsnr):
    """Deterministic N-step DDIM from z_1 (noise at t = 1) to x (t = 0) on the grid t_i = i / N.

    Each step t -> s = t - 1/N uses x_hat (clipped to [-1, 1] if `clip`; eps_hat is then recomputed from
    the clipped x_hat, as in the papers' samplers); the last step returns x_hat.
    Returns (x_b..., evals): evals is the network evaluations per sample, summed over the steps.
    Jittable (num_steps, clip static); `fori_loop` keeps the compiled program one step long.
    """
    _check_steps(num_steps)
    z_1 = _float(z_1)

    def body(k, carry):
        z, evals = carry
        t = (num_steps - k) / num_steps
        x_hat, e = _denoise_step(denoise, z, t, clip=clip, logsnr_fn=logsnr_fn)
        s = (num_steps - k - 1) / num_steps
        z_s = ddim_step(z, x_hat, logsnr_fn(t), logsnr_fn(s))
        return jnp.where(k == num_steps - 1, x_hat, z_s), evals + e

    return jax.lax.fori_loop(0, num_steps, body, (z_1, jnp.zeros((), jnp.int32)))


def ancestral_sample(
    denoise: Callable, key, z_1, *, num_steps: int, clip: bool = False, logsnr_fn=cosine_logsnr
):
    """Stochastic N-step ancestral sampler: z_s ~ q(z_s | z_t, x = x_hat), the forward process's posterior,

        mean = e^{lambda_t - lambda_s} (alpha_s / alpha_t) z_t + (1 - e^{lambda_t - lambda_s}) alpha_s x_hat,
        variance = (1 - e^{lambda_t - lambda_s}) sigma_s^2     (= (1 - SNR_t / SNR_s) sigma_s^2).

    The last step returns x_hat.  `key` draws the per-step noise (one key per step, folded from `key`).
    Returns (x_b..., evals).
    """
    _check_steps(num_steps)
    z_1 = _float(z_1)

    def body(k, carry):
        z, evals = carry
        t = (num_steps - k) / num_steps
        s = (num_steps - k - 1) / num_steps
        x_hat, e = _denoise_step(denoise, z, t, clip=clip, logsnr_fn=logsnr_fn)
        lt, ls = logsnr_fn(t).astype(z.dtype), logsnr_fn(s).astype(z.dtype)
        alpha_t, _ = alpha_sigma(lt)
        alpha_s, sigma_s = alpha_sigma(ls)
        keep = jnp.exp(lt - ls)  # SNR_t / SNR_s in (0, 1)
        mean = keep * (alpha_s / alpha_t) * z + (1.0 - keep) * alpha_s * x_hat
        noise = jax.random.normal(jax.random.fold_in(key, k), z.shape, z.dtype)
        z_s = mean + jnp.sqrt(1.0 - keep) * sigma_s * noise
        return jnp.where(k == num_steps - 1, x_hat, z_s), evals + e

    return jax.lax.fori_loop(0, num_steps, body, (z_1, jnp.zeros((), jnp.int32)))


def sample(
    denoise: Callable,
    key,
    shape,
    *,
    num_steps: int,
    sampler: str = "ddim",
    clip: bool = False,
    dtype=jnp.float32,
    logsnr_fn=cosine_logsnr,
):
    """Draws z_1 ~ N(0, I) of `shape` from `key`, then runs `ddim_sample` or `ancestral_sample`.

    Deterministic given `key`.  Returns (x, evals per sample).
    """
    noise_key, step_key = jax.random.split(key)
    z_1 = jax.random.normal(noise_key, shape, dtype)
    if sampler == "ddim":
        return ddim_sample(denoise, z_1, num_steps=num_steps, clip=clip, logsnr_fn=logsnr_fn)
    if sampler == "ancestral":
        return ancestral_sample(denoise, step_key, z_1, num_steps=num_steps, clip=clip, logsnr_fn=logsnr_fn)
    raise ValueError(f"sampler {sampler!r}; expected 'ddim' or 'ancestral'")


# ----------------------------------------------------------------------------------------------------
# Training objectives: (sum, count), model-agnostic (the x-predictors are functions)
# ----------------------------------------------------------------------------------------------------


def denoising_loss(
    x_fn: Callable, x, labels_b, key, *, p_uncond: float, null_class: int, weighting: str, logsnr_fn=cosine_logsnr
):
    """Conditional teacher objective with label dropout (Ho & Salimans 2022, classifier-free guidance):

        t ~ U[0, 1], eps ~ N(0, I), z_t = alpha_t x + sigma_t eps, c -> null with probability p_uncond,
        loss = w(lambda_t) |x_fn(z_t, lambda_t, c) - x|^2.

    `x_fn(z_b..., logsnr_b, labels_b) -> x_hat_b...`.  Returns (sum, count) over the batch.
    """
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    b = x.shape[0]
    logsnr_b = logsnr_fn(jax.random.uniform(k_t, (b,)))
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    z = diffuse(x, eps, logsnr_b)
    labels_b = drop_labels(k_drop, labels_b, p_uncond=p_uncond, null_class=null_class)
    return weighted_x_mse(x_fn(z, logsnr_b, labels_b), x, logsnr_b, weighting=weighting)


def guided_distill_loss(
    student_x: Callable,
    teacher_x: Callable,
    x,
    labels_b,
    key,
    *,
    w_min: float,
    w_max: float,
    null_class: int,
    weighting: str,
    logsnr_fn=cosine_logsnr,
):
    """Guided distillation, stage 1 (Meng et al. 2023): a w-conditioned student regresses the guided teacher.

        w ~ U[w_min, w_max], t ~ U[0, 1], z_t from data,
        loss = w(lambda_t) |student_x(z_t, lambda_t, c, w) - sg[(1 + w) x_T(z_t, c) - w x_T(z_t, null)]|^2.

    `teacher_x(z, logsnr, labels) -> x_hat` (one batched forward for both halves, see `guided_x`);
    `student_x(z, logsnr, labels, w) -> x_hat`.  Returns (sum, count).
    """
    k_t, k_eps, k_w = jax.random.split(key, 3)
    b = x.shape[0]
    logsnr_b = logsnr_fn(jax.random.uniform(k_t, (b,)))
    w_b = jax.random.uniform(k_w, (b,), minval=w_min, maxval=w_max)
    z = diffuse(x, jax.random.normal(k_eps, x.shape, jnp.float32), logsnr_b)
    target = jax.lax.stop_gradient(guided_x(teacher_x, z, logsnr_b, labels_b, w_b, null_class=null_class))
    return weighted_x_mse(student_x(z, logsnr_b, labels_b, w_b), target, logsnr_b, weighting=weighting)


def progressive_distill_loss(
    student_x: Callable,
    teacher_x: Callable,
    x,
    labels_b,
    key,
    *,
    num_student_steps: int,
    w_min: float,
    w_max: float,
    weighting: str,
    logsnr_fn=cosine_logsnr,
):
    """Guided distillation, stage 2: progressive distillation (Salimans & Ho Alg. 2) at a shared w.

        i ~ U{0 .. N-1}, t = (i + 1) / N, w ~ U[w_min, w_max], z_t from data,
        loss = w(lambda_t) |student_x(z_t, lambda_t, c, w) - sg[progressive_target(teacher at the same w)]|^2,

    the teacher being the previous (2N-step) student; guidance lives inside both models (one network
    evaluation per step).  Returns (sum, count).
    """
    k_i, k_eps, k_w = jax.random.split(key, 3)
    b = x.shape[0]
    i_b = jax.random.randint(k_i, (b,), 0, num_student_steps)
    w_b = jax.random.uniform(k_w, (b,), minval=w_min, maxval=w_max)
    logsnr_b, _, _ = student_grid(i_b, num_student_steps, logsnr_fn=logsnr_fn)
    z = diffuse(x, jax.random.normal(k_eps, x.shape, jnp.float32), logsnr_b)
    teacher = lambda z_, l_: teacher_x(z_, l_, labels_b, w_b)
    target = jax.lax.stop_gradient(progressive_target(teacher, z, i_b, num_student_steps, logsnr_fn=logsnr_fn))
    return weighted_x_mse(student_x(z, logsnr_b, labels_b, w_b), target, logsnr_b, weighting=weighting)


def check_request(labels, w=None, *, num_classes: int, w_range=None):
    """Raises ValueError for a class id outside [0, num_classes) or a w outside the trained [w_min, w_max].

    Call on the host before sampling: a traced sampler cannot raise, and an out-of-range class would
    silently index the null class or past the embedding table.
    """
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class ids must be integers, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)] if labels.size else labels
    if bad.size:
        raise ValueError(
            f"unknown class id {int(bad.flat[0])}: this model knows classes 0..{num_classes - 1} "
            f"(id {num_classes} is reserved for the unconditional null class; guide with w instead)"
        )
    if w is not None and w_range is not None:
        w_arr = np.asarray(w, np.float64)
        lo, hi = w_range
        outside = w_arr[(w_arr < lo) | (w_arr > hi)]
        if outside.size:
            raise ValueError(
                f"guidance weight w={float(outside.flat[0])} is outside the range [{lo}, {hi}] the model "
                "was trained on"
            )
