"""Fused, chunked LM head + loss: CE, every divergence, top-k KD, TAID and the eval metrics, computed from
hidden states chunk by chunk over tokens, so that no [B, T, V] array of the student or the teacher exists.

    fused_loss(h_btd, head, labels_bt, ce_mask_bt, *, teacher, kd_mask_bt, loss, ...)  -> FusedLoss
    fused_metrics(h_btd, head, labels_bt, mask_bt, *, teacher, chunk_size)           -> {name: (sum, count)}

What it computes is exactly `kdjax.losses` applied to the full logits ``h @ w (+ bias)``: the B*T tokens are
flattened, cut into chunks of `chunk_size` rows (the last chunk padded with masked rows), and each chunk's
[C, V] logits are fed to the public functions of `kdjax.losses` (`cross_entropy`, `LOSSES[name]`, `taid`,
`topk_kd`, `taid_topk`, `forward_kl`, ...).  Every loss there is a masked sum of per-token terms, so the
sum over chunks of their `(sum, count)` is the unfused `(sum, count)`, conventions included: float32
log-space whatever the input dtype, T^2 scaling, masks by select (padded rows inert even when they hold
NaN), -inf logits finite.  Only the summation order differs (float32 rounding, ~1e-7 relative).

Gradients (custom VJP, no recomputation).  `fused_loss` returns ``total = ce_weight * CE + kd_weight * KD``
(the sum the train step differentiates) and, as values only, both terms' `(sum, count)`.  When it is
differentiated, the forward pass computes the gradient as it goes: per chunk, autodiff of the `losses`
functions gives the [C, V] cotangent g of the logits, then ``dh = g @ w^T`` ([C, D], stacked) and
``dw += h^T @ g`` ([D, V] float32, carried through the scan).  The backward pass only scales them by
the incoming cotangent.  So the matmul FLOPs are those of the unfused path (1 forward, 2 backward), not
the 4 of a rematerialised (`jax.checkpoint`) chunk.  Gradients flow to `h_btd` and `head.w` only: the
teacher, the head's bias, the temperature, TAID's t and the two weights (which may be traced: distill's CE
weight depends on the batch's mask counts) are constants (stop_gradient), as in every distillation step.
The `(sum, count)` pairs in `FusedLoss.ce` / `.kd` carry no gradient: differentiate `total` (set the weights
to (1, 0) or (0, 1) for one term).  Outside differentiation (eval) the scan computes values only.

Matmuls run in the inputs' dtype (bf16 hidden states and weights stay bf16 on the MXU) with float32
accumulation (`preferred_element_type`); the logits' cotangent is cast to that dtype for the two backward
matmuls, as the unfused path's bf16 logits would have it.  The logits are float32, not rounded to bf16 first,
so in bf16 the fused values are slightly *more* accurate than the unfused path's.

Peak memory of the loss (per device, whatever B*T is): one chunk's working set plus the float32 weight-gradient
accumulator (D x V) and the [B*T, D] hidden-state gradient.  XLA's CPU `memory_analysis()` of the loss's
value-and-gradient at B*T = 4096, D = 256, V = 131072, C = 256 (one [C, V] float32 block = 128 MiB, and here the
accumulator is the same size) counts temporaries of 3.0 blocks for CE, 2.0 for bucketed top-k JSD with a
value-only CE, and 8.1 for online dense JSD (student and teacher logits, both log-softmaxes, the mixture,
their cotangents); the unfused path holds several [B*T, V] arrays instead (16x a block each here).  The
vocabulary is never chunked: the divergences need every entry of both sides' softmax per token, and a
[C, V] block per side is what issue 18 allows.  Pick C so that ~8 blocks fit beside the model.

-inf logits: a product h @ w is always finite, so a masked vocabulary enters through `Head.bias_v` (an
additive [V] bias, e.g. -inf on the padding ids of a vocabulary rounded up to a multiple of 128); the
teacher's store carries -inf in its top-k log-probs directly.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.models.partitioning import constrain

Array = jax.Array

LOSS_NAMES = ("ce", "taid", *losses.LOSSES)
LAYOUTS = ("dv", "vd")

# Sharding (no-ops unless the step is traced under `kdjax.sharding.with_activation_sharding`): a chunk's
# tokens are split like the batch, so every device works on its share of every chunk and the scan over chunks
# never walks across devices; the logits' vocabulary is split like the head's (tensor parallelism); the
# weight-gradient accumulator is sharded like the head itself (FSDP: each chunk's h^T @ g is reduce-scattered).
_CV = ("activation_batch", "activation_vocab")
_HEAD_AXES = {"dv": ("embed", "vocab"), "vd": ("vocab", "embed")}


def _constrain_chunks(x_nc):
    """[n, C, ...] chunked per-token arrays: C split like the batch."""
    if x_nc is None:
        return None
    return constrain(x_nc, (None, "activation_batch", *([None] * (x_nc.ndim - 2))))


@functools.partial(jax.tree_util.register_dataclass, data_fields=("w", "bias_v"), meta_fields=("layout",))
@dataclasses.dataclass(frozen=True)
class Head:
    """An unembedding: logits = h @ w (+ bias_v).

    w: [D, V] (layout "dv", e.g. `Transformer.lm_head`) or [V, D] (layout "vd", a tied `embed` table, used as
      it is: no transposed copy of the table is made, the matmuls contract its D axis directly).
    bias_v: optional [V] additive bias, a constant (no gradient); may hold -inf to mask vocabulary entries.
    """

    w: Array
    bias_v: Optional[Array] = None
    layout: str = "dv"

    @property
    def vocab_size(self):
        return self.w.shape[1] if self.layout == "dv" else self.w.shape[0]

    @property
    def embed_dim(self):
        return self.w.shape[0] if self.layout == "dv" else self.w.shape[1]


class DenseTeacher(NamedTuple):
    """Online teacher: its final (normed) hidden states [B, T, D_t] and its unembedding (vocabulary = student's)."""

    h_btd: Array
    head: Head


class TopkTeacher(NamedTuple):
    """Offline teacher store entries (see `losses.topk_kd`).

    logprobs_btk, ids_btk: [B, T, K] full-vocabulary log-probs (T = 1) at the teacher's top-k ids.
    tail_logprob_bt: optional [B, T] log of the mass outside the top-k (bucket mode uses it when given).
    label_logprob_bt: optional [B, T] teacher log-prob of the label; only `fused_metrics` reads it.
    """

    logprobs_btk: Array
    ids_btk: Array
    tail_logprob_bt: Optional[Array] = None
    label_logprob_bt: Optional[Array] = None


class FusedLoss(NamedTuple):
    """total: ce_weight * ce_sum + kd_weight * kd_sum, the differentiable scalar.
    ce, kd: (sum, count) float32 pairs without gradient (kd is None for loss="ce")."""

    total: Array
    ce: tuple
    kd: Optional[tuple]


# --------------------------------------------------------------------------------------------
# The head's matmuls, in the inputs' dtype with float32 accumulation.


def _compute_dtype(h, w):
    return jnp.result_type(h.dtype, w.dtype)


def head_logits(h_nd, head):
    """float32 logits [N, V] = h_nd @ w (+ bias_v) for h_nd [N, D] (any leading shape [..., D] works)."""
    dt = _compute_dtype(h_nd, head.w)
    contract = 0 if head.layout == "dv" else 1
    z = jax.lax.dot_general(h_nd.astype(dt), head.w.astype(dt), (((h_nd.ndim - 1,), (contract,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if head.bias_v is not None:
        z = z + jax.lax.stop_gradient(head.bias_v).astype(jnp.float32)
    return z


def _grad_h(g_cv, head):
    """g @ w^T: [C, D] float32."""
    contract = 1 if head.layout == "dv" else 0
    return jax.lax.dot_general(g_cv, head.w.astype(g_cv.dtype), (((1,), (contract,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _grad_w(h_cd, g_cv, head):
    """h^T @ g in w's layout: [D, V] ("dv") or [V, D] ("vd"), float32."""
    h_cd = h_cd.astype(g_cv.dtype)
    lhs, rhs = (h_cd, g_cv) if head.layout == "dv" else (g_cv, h_cd)
    return jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Checks: everything raises before any work.


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a fused loss: what to compute and how to weight it."""

    loss: str
    hparams: tuple  # sorted (name, value) pairs: hashable, static
    teacher: str  # "none" | "dense" | "topk"
    tail: str
    ce_term: bool  # False when the weight is a static 0: the term is a value only, never differentiated
    kd_term: bool


def _check_shapes(h_btd, head, labels_bt, masks, teacher):
    if not isinstance(head, Head):
        raise TypeError(f"head must be a fused_head.Head, got {type(head).__name__}.")
    if head.layout not in LAYOUTS:
        raise ValueError(f"Head.layout must be one of {LAYOUTS}, got {head.layout!r}.")
    if h_btd.ndim != 3:
        raise ValueError(f"h_btd must be [B, T, D], got shape {h_btd.shape}.")
    bt = h_btd.shape[:2]
    if head.w.ndim != 2 or head.embed_dim != h_btd.shape[2]:
        raise ValueError(f"head.w {head.w.shape} (layout {head.layout!r}) does not match hidden width "
                         f"D = {h_btd.shape[2]}.")
    if head.bias_v is not None and head.bias_v.shape != (head.vocab_size,):
        raise ValueError(f"head.bias_v must be [V] = [{head.vocab_size}], got {head.bias_v.shape}.")
    for name, x in (("labels_bt", labels_bt), *masks):
        if x.shape != bt:
            raise ValueError(f"{name} must be [B, T] = {list(bt)}, got {x.shape}.")
    if isinstance(teacher, DenseTeacher):
        _check_shapes(teacher.h_btd, teacher.head, labels_bt, (), None)
        if teacher.head.vocab_size != head.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.head.vocab_size} != student vocabulary "
                             f"{head.vocab_size}.")
    elif isinstance(teacher, TopkTeacher):
        btk = teacher.logprobs_btk.shape
        if len(btk) != 3 or btk[:2] != bt or teacher.ids_btk.shape != btk:
            raise ValueError(f"top-k teacher logprobs {btk} and ids {teacher.ids_btk.shape} must both be "
                             f"[B, T, K] with [B, T] = {list(bt)}.")
        for name in ("tail_logprob_bt", "label_logprob_bt"):
            x = getattr(teacher, name)
            if x is not None and x.shape != bt:
                raise ValueError(f"TopkTeacher.{name} must be [B, T] = {list(bt)}, got {x.shape}.")
    elif teacher is not None:
        raise TypeError(f"teacher must be None, a DenseTeacher or a TopkTeacher, got {type(teacher).__name__}.")


def _check_scalars(temperature, chunk_size):
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")


def _make_spec(loss, hparams, teacher, tail, taid_t, ce_weight, kd_weight):
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSS_NAMES}.")
    if tail not in losses.TAILS:
        raise ValueError(f"tail must be one of {losses.TAILS}, got {tail!r}.")
    for name, weight in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if isinstance(weight, bool) or jnp.ndim(weight) != 0:
            raise TypeError(f"{name} must be a scalar (a Python float or a traced 0-d array), got {weight!r}.")
    hparams = dict(hparams or {})
    if loss in ("ce", "taid") and hparams:
        raise ValueError(f"loss {loss!r} takes no hparams, got {sorted(hparams)}.")
    if loss == "ce":
        if not _is_static_zero(kd_weight):
            raise ValueError(f"loss 'ce' has no divergence term: kd_weight must be 0, got {kd_weight}.")
    else:
        if teacher is None:
            raise ValueError(f"loss {loss!r} needs a teacher (DenseTeacher or TopkTeacher).")
        if loss == "taid" and taid_t is None:
            raise ValueError("loss 'taid' needs taid_t, the interpolation coefficient.")
        if loss in losses.DIVERGENCES:
            # Trace the divergence once on a [1, 2] dummy: a bad beta/alpha or an unknown hparam raises
            # its own error here, before any work.
            probe = jax.ShapeDtypeStruct((1, 2), jnp.float32)
            jax.eval_shape(lambda p, q: losses.DIVERGENCES[loss](p, q, **hparams), probe, probe)
    kind = "none" if loss == "ce" else ("dense" if isinstance(teacher, DenseTeacher) else "topk")
    return _Spec(loss=loss, hparams=tuple(sorted(hparams.items())), teacher=kind, tail=tail,
                 ce_term=not _is_static_zero(ce_weight), kd_term=not _is_static_zero(kd_weight))


def _is_static_zero(weight):
    return isinstance(weight, (int, float)) and weight == 0


# --------------------------------------------------------------------------------------------
# Chunking: flatten B*T, pad with masked rows to a multiple of the chunk, reshape to [n, C, ...].


def _plan(num_tokens, chunk_size):
    """(number of chunks, rows per chunk); one chunk of all tokens when chunk_size >= B*T."""
    rows = min(chunk_size, num_tokens)
    return -(-num_tokens // rows), rows


def _chunk(x_bt, n, c):
    """[B, T, ...] -> [n, C, ...], zero rows appended (they are masked: their masks are padded with 0)."""
    if x_bt is None:
        return None
    x_n = x_bt.reshape(-1, *x_bt.shape[2:])
    pad = n * c - x_n.shape[0]
    if pad:
        x_n = jnp.pad(x_n, [(0, pad)] + [(0, 0)] * (x_n.ndim - 1))
    return _constrain_chunks(x_n.reshape(n, c, *x_n.shape[1:]))


def _clean_rows(x_btd, mask_bt):
    """Zero the rows of masked positions: NaN there must not reach a matmul (NaN * 0 = NaN in h^T @ g)."""
    return jnp.where((mask_bt != 0)[..., None], x_btd, jnp.zeros((), x_btd.dtype))


def _teacher_chunks(teacher, kd_mask_bt, n, c):
    """(chunked per-token teacher arrays, teacher head or None), all gradient-stopped."""
    teacher = jax.lax.stop_gradient(teacher)
    if isinstance(teacher, DenseTeacher):
        return _chunk(_clean_rows(teacher.h_btd, kd_mask_bt), n, c), teacher.head
    if isinstance(teacher, TopkTeacher):
        return TopkTeacher(_chunk(teacher.logprobs_btk, n, c), _chunk(teacher.ids_btk, n, c),
                           _chunk(teacher.tail_logprob_bt, n, c)), None
    return None, None


# --------------------------------------------------------------------------------------------
# One chunk: the public `losses` functions on [1, C, V] logits.


def _teacher_signal(spec_teacher, teacher_c, teacher_head):
    """The chunk's teacher: float32 logits [C, V] (dense) or the TopkTeacher chunk as it is."""
    if spec_teacher == "dense":
        return jax.lax.stop_gradient(constrain(head_logits(teacher_c, teacher_head), _CV))
    return teacher_c


def _kd_sums(spec, z_1cv, signal, mask_1c, temperature, t):
    """The divergence's (sum, count) on one chunk, exactly as `kdjax.distill` calls `losses` unfused."""
    hparams = dict(spec.hparams)
    if spec.teacher == "dense":
        zt_1cv = signal[None]
        if spec.loss == "taid":
            return losses.taid(z_1cv, zt_1cv, mask_1c, t=t, temperature=temperature)
        return losses.LOSSES[spec.loss](z_1cv, zt_1cv, mask_1c, temperature=temperature, **hparams)
    tail_1c = None if signal.tail_logprob_bt is None else signal.tail_logprob_bt[None]
    topk = (z_1cv, signal.logprobs_btk[None], signal.ids_btk[None], mask_1c)
    if spec.loss == "taid":
        return losses.taid_topk(*topk, t=t, temperature=temperature, tail=spec.tail,
                                teacher_tail_logprob_bt=tail_1c)
    return losses.topk_kd(*topk, divergence=spec.loss, temperature=temperature, tail=spec.tail,
                          teacher_tail_logprob_bt=tail_1c, **hparams)


def _objective(spec, z_cv, signal, labels_c, ce_mask_c, kd_mask_c, temperature, t, weights):
    """(weighted total, [ce_sum, ce_count, kd_sum, kd_count]) of one chunk; the total is what gets a gradient."""
    z_1cv = z_cv[None]
    ce_sum, ce_count = losses.cross_entropy(z_1cv, labels_c[None], ce_mask_c[None])
    kd_sum = kd_count = jnp.zeros((), jnp.float32)
    if spec.loss != "ce":
        kd_sum, kd_count = _kd_sums(spec, z_1cv, signal, kd_mask_c[None], temperature, t)
    total = jnp.zeros((), jnp.float32)
    # A term with a static weight of 0 is computed as a value but never differentiated.
    if spec.ce_term:
        total = total + weights[0] * ce_sum
    if spec.kd_term:
        total = total + weights[1] * kd_sum
    sums = jnp.stack([ce_sum, ce_count, kd_sum, kd_count]).astype(jnp.float32)
    return total.astype(jnp.float32), jax.lax.stop_gradient(sums)


def _scan(spec, layout, with_grad, h_ncd, w, bias_v, teacher_xs, teacher_head, labels_nc, ce_mask_nc,
          kd_mask_nc, temperature, t, weights):
    """Scan over chunks; with_grad also returns (dh [n, C, D] float32, dw float32 in w's layout)."""
    head = Head(w=w, bias_v=bias_v, layout=layout)
    grad_dtype = _compute_dtype(h_ncd, w)

    def body(dw, xs):
        h_cd, teacher_c, labels_c, ce_c, kd_c = xs
        z_cv = constrain(head_logits(h_cd, head), _CV)
        signal = _teacher_signal(spec.teacher, teacher_c, teacher_head)
        objective = functools.partial(_objective, spec, signal=signal, labels_c=labels_c, ce_mask_c=ce_c,
                                      kd_mask_c=kd_c, temperature=temperature, t=t, weights=weights)
        if not with_grad:
            return dw, objective(z_cv)
        (total, sums), g_cv = jax.value_and_grad(objective, has_aux=True)(z_cv)
        # The cotangent enters the backward matmuls in the compute dtype, as bf16 logits' would.
        g_cv = constrain(g_cv.astype(grad_dtype), _CV)
        dw = constrain(dw + _grad_w(h_cd, g_cv, head), _HEAD_AXES[layout])
        return dw, (total, sums, constrain(_grad_h(g_cv, head), ("activation_batch", "activation_embed")))

    init = constrain(jnp.zeros(w.shape, jnp.float32), _HEAD_AXES[layout]) if with_grad else None
    dw, ys = jax.lax.scan(body, init, (h_ncd, teacher_xs, labels_nc, ce_mask_nc, kd_mask_nc))
    out = (jnp.sum(ys[0]), jnp.sum(ys[1], axis=0))
    return out, ((ys[2], dw) if with_grad else None)


def _fused(spec, layout, h_dtype, w_dtype):
    """custom_vjp over the chunked arguments: the forward computes the gradient, the backward scales it."""

    @jax.custom_vjp
    def fused(h_ncd, w, bias_v, teacher_xs, teacher_head, labels_nc, ce_mask_nc, kd_mask_nc, temperature, t,
              weights):
        return _scan(spec, layout, False, h_ncd, w, bias_v, teacher_xs, teacher_head, labels_nc, ce_mask_nc,
                     kd_mask_nc, temperature, t, weights)[0]

    def fwd(*args):
        return _scan(spec, layout, True, *args)

    def bwd(grads, cotangents):
        dh_ncd, dw = grads
        g = cotangents[0]  # only `total` is differentiable: the sums are stop_gradient'ed by the caller
        return ((g * dh_ncd).astype(h_dtype), (g * dw).astype(w_dtype)) + (None,) * 9

    fused.defvjp(fwd, bwd)
    return fused


# --------------------------------------------------------------------------------------------
# Public API.


def fused_loss(h_btd, head, labels_bt, ce_mask_bt, *, chunk_size, teacher=None, kd_mask_bt=None, loss="ce",
               hparams=None, temperature=1.0, taid_t=None, tail="bucket", ce_weight=1.0, kd_weight=0.0):
    """CE and a distillation loss from hidden states, chunked over the B*T tokens (see the module docstring).

      total = ce_weight * CE_sum + kd_weight * KD_sum,
      CE_sum = losses.cross_entropy(h @ w, labels, ce_mask)[0]                                (T = 1),
      KD_sum = losses.LOSSES[loss] / taid (dense teacher) or topk_kd / taid_topk (top-k teacher),
               on (h @ w, teacher, kd_mask) at `temperature`, T^2 included,
    computed without any [B, T, V] array; the value and the gradients w.r.t. h_btd and head.w equal those
    of the unfused path up to float32 summation order.

    Args:
      h_btd: [B, T, D] the student's final (normed) hidden states, any float dtype.
      head: the student's `Head` (lm_head as "dv", or a tied embed table as "vd"; optional -inf bias).
      labels_bt: [B, T] int next-token ids (any filler at masked positions).
      ce_mask_bt: [B, T] bool / 0-1 / float weights of the CE term.
      chunk_size: tokens per chunk (a static int; need not divide B*T: the last chunk is padded with masked
        rows).  Peak loss memory is ~3 (CE) to ~8 (dense divergence) [chunk_size, V] float32 blocks.
      teacher: None (loss="ce"), `DenseTeacher` (online) or `TopkTeacher` (offline store).  No gradient.
      kd_mask_bt: [B, T] mask of the divergence; defaults to ce_mask_bt.
      loss: "ce", "taid" or a name in `losses.LOSSES`.
      hparams: the divergence's static hyperparameters (beta for jsd, alpha for skl / srkl).
      temperature: T > 0 of the divergence (may be traced); CE is always at T = 1.
      taid_t: TAID's t in [0, 1] (may be traced); needed for loss="taid".
      tail: "renormalize" or "bucket", for a TopkTeacher.
      ce_weight, kd_weight: scalars, Python floats or traced (no gradient), e.g. (ce_alpha * ce_scale,
        1 - ce_alpha) from kdjax.distill, and (1, 0) for "ce".  A static 0 skips that term's gradient work.
    Returns:
      FusedLoss(total, ce=(sum, count), kd=(sum, count) or None): float32; only `total` has a gradient.
    """
    kd_mask_bt = ce_mask_bt if kd_mask_bt is None else kd_mask_bt
    _check_shapes(h_btd, head, labels_bt, (("ce_mask_bt", ce_mask_bt), ("kd_mask_bt", kd_mask_bt)),
                  teacher)
    _check_scalars(temperature, chunk_size)
    spec = _make_spec(loss, hparams, teacher, tail, taid_t, ce_weight, kd_weight)
    if spec.teacher == "none":
        teacher = None
    n, c = _plan(h_btd.shape[0] * h_btd.shape[1], chunk_size)
    live_bt = (ce_mask_bt != 0) | (kd_mask_bt != 0)
    teacher_xs, teacher_head = _teacher_chunks(teacher, kd_mask_bt, n, c)
    fused = _fused(spec, head.layout, h_btd.dtype, head.w.dtype)
    total, sums = fused(
        _chunk(_clean_rows(h_btd, live_bt), n, c), head.w, head.bias_v, teacher_xs, teacher_head,
        _chunk(labels_bt, n, c), _chunk(ce_mask_bt, n, c), _chunk(kd_mask_bt, n, c),
        jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32)),
        None if taid_t is None else jax.lax.stop_gradient(jnp.asarray(taid_t, jnp.float32)),
        jax.lax.stop_gradient(jnp.stack([jnp.asarray(ce_weight, jnp.float32), jnp.asarray(kd_weight, jnp.float32)])),
    )
    sums = jax.lax.stop_gradient(sums)
    return FusedLoss(total=total, ce=(sums[0], sums[1]), kd=None if loss == "ce" else (sums[2], sums[3]))


def _metric_sums(z_cv, signal, labels_c, mask_c, teacher_kind):
    """One chunk's eval metrics, as `kdjax.distill.make_eval_fn` computes them on full logits (T = 1)."""
    z, labels, mask = z_cv[None], labels_c[None], mask_c[None]
    out = {"ce": losses.cross_entropy(z, labels, mask)}
    if teacher_kind == "dense":
        zt = signal[None]
        out["kl"] = losses.forward_kl(z, zt, mask)
        out["teacher_ce"] = losses.cross_entropy(zt, labels, mask)
        out["top1_agreement"] = losses.top1_agreement(z, zt, mask)
        out["acceptance"] = losses.acceptance_rate(z, zt, mask)
    elif teacher_kind == "topk":
        agree = (jnp.argmax(z_cv, axis=-1) == signal.ids_btk[:, 0]).astype(jnp.float32)
        out["top1_agreement"] = (jnp.sum(jnp.where(mask_c != 0, agree * mask_c, 0)),
                                 jnp.sum(mask_c.astype(jnp.float32)))
        tail = None if signal.tail_logprob_bt is None else signal.tail_logprob_bt[None]
        out["kl_topk"] = losses.topk_kd(z, signal.logprobs_btk[None], signal.ids_btk[None], mask,
                                        divergence="fkl", tail="bucket", teacher_tail_logprob_bt=tail)
    return out


def fused_metrics(h_btd, head, labels_bt, mask_bt, *, chunk_size, teacher=None):
    """Eval metrics of `kdjax.distill.make_eval_fn`, chunked: {name: (sum, count)}, no gradient, T = 1.

    Always `ce` (the student's).  With a DenseTeacher: `kl` = KL(teacher || student), `teacher_ce`,
    `top1_agreement`, `acceptance` = sum_v min(p, q).  With a TopkTeacher: `top1_agreement` against the
    stored top-1 id, `kl_topk` (bucketed top-k forward KL with the stored tail) and, when
    `label_logprob_bt` is given, `teacher_ce` = -sum of the stored label log-probs.

    Args: as `fused_loss` (one mask).  Returns: {name: (sum, count)} of float32 scalars.
    """
    _check_shapes(h_btd, head, labels_bt, (("mask_bt", mask_bt),), teacher)
    _check_scalars(1.0, chunk_size)
    h_btd, head, teacher = jax.lax.stop_gradient((h_btd, head, teacher))
    kind = "none" if teacher is None else ("dense" if isinstance(teacher, DenseTeacher) else "topk")
    n, c = _plan(h_btd.shape[0] * h_btd.shape[1], chunk_size)
    teacher_xs, teacher_head = _teacher_chunks(teacher, mask_bt, n, c)

    def body(carry, xs):
        h_cd, teacher_c, labels_c, mask_c = xs
        signal = None if kind == "none" else _teacher_signal(kind, teacher_c, teacher_head)
        return carry, _metric_sums(constrain(head_logits(h_cd, head), _CV), signal, labels_c, mask_c, kind)

    xs = (_chunk(_clean_rows(h_btd, mask_bt), n, c), teacher_xs, _chunk(labels_bt, n, c), _chunk(mask_bt, n, c))
    _, per_chunk = jax.lax.scan(body, None, xs)
    out = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_chunk)
    if kind == "topk" and teacher.label_logprob_bt is not None:
        valid = mask_bt != 0
        label_lp = jnp.where(valid, teacher.label_logprob_bt.astype(jnp.float32), 0)
        out["teacher_ce"] = (-jnp.sum(label_lp * jnp.where(valid, mask_bt, 0)), jnp.sum(mask_bt.astype(jnp.float32)))
    return out
