"""Distillation objectives for `kdjax.steps.train_step`: per-mode target builders feeding one objective.

A mode says where the tokens and the teacher signal come from.  Each is one entry of `MODES`:
  offline:   real data; the teacher signal is the top-k log-probs the batch carries from the offline store.
  online:    real data; the teacher runs inside the same jitted step on the batch (`frozen` = its params).
  on_policy: with probability `on_policy_fraction` per batch the tokens after a prompt prefix are replaced by
             samples from the current student (KV-cache sampler, no gradient through sampling); the teacher
             scores exactly those tokens (GKD, Agarwal et al., ICLR 2024).
  seqkd:     the teacher generates the continuation after the prompt; the student is trained with
             cross-entropy on it (sequence-level KD, Kim & Rush, 2016).
A builder, `build(student, batch, rng, frozen, spec) -> (batch, aux)`, runs once per step on the whole batch
with gradients stopped (`steps.Objective.prepare`) and returns the batch the objective scores:
  tokens [B, T+1]; kd_mask [B, T] (positions the divergence covers); ce_mask [B, T] (positions with a hard
  label the student may learn from: never the student's own samples); ce_scale [B] (see below); and the
  offline store's fields when the signal is "store".
The one objective (`objective_loss`) then applies the configured divergence (any name of `losses.LOSSES`,
or "taid", whose t lives in `extra["taid"]`) against the mode's teacher signal and hard-label CE, each
token-weighted over its own mask:

    loss = ce_alpha * CE_sum / C_ce + (1 - ce_alpha) * KD_sum / C_kd,     C_* = the whole batch's mask counts.

It is returned as (sum, count) = (ce_alpha * CE_sum * C_kd / C_ce + (1 - ce_alpha) * KD_sum, C_kd), the
ratio C_kd / C_ce being computed by the builder over the whole batch (`ce_scale`), so microbatch sums add up
to exactly this loss.  "ce" as the loss trains on hard labels alone (no teacher).  Adding a mode (DistillSpec's
draft-generated data, CFG teacher targets) is one builder and one `MODES` entry.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import fused_head, losses, steps
from kdjax.models import sampling

STORE_FIELDS = ("teacher_logprobs", "teacher_ids", "teacher_tail_logprob")


@dataclasses.dataclass(frozen=True)
class KDSpec:
    """What an objective needs to know: the mode, the loss and their hyperparameters (all static)."""

    mode: str
    loss: str
    temperature: float = 1.0
    ce_alpha: float = 0.0
    hparams: tuple = ()  # the divergence's keyword hyperparameters, as sorted (name, value) pairs
    tail: str = "bucket"
    teacher_graphdef: Any = None
    on_policy_fraction: float = 0.5
    prompt_len: int = 16
    sample_temperature: float = 1.0
    eos_id: Optional[int] = None
    chunk_size: int = 0  # > 0: the fused chunked head (kdjax.fused_head); no [B, T, V] logits are built


class Mode(NamedTuple):
    """A distillation mode: where the tokens come from (`build`) and what the teacher signal is (`signal`):
    "store" (the batch's top-k entries), "model" (the teacher's logits on the tokens), None (CE on the built
    tokens only), or a function `(teacher_model, batch, inputs_bt) -> logits_btv` for a teacher signal of
    the experiment's own (e.g. classifier-free-guided logits).  Experiments may pass their own Mode to
    `make_loss_fn` instead of a name of `MODES`."""

    build: Callable  # (student, batch, rng, frozen, spec) -> (batch, aux)
    signal: Any  # "store" | "model" | None | callable


def resolve_mode(mode) -> Mode:
    if isinstance(mode, Mode):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {tuple(MODES)}")
    return MODES[mode]


def divergence_hparams(loss, *, jsd_beta=0.5, skew_alpha=0.1):
    """The hyperparameters that `losses.LOSSES[loss]` takes, from the config's values."""
    if loss == "jsd":
        return {"beta": jsd_beta}
    if loss in ("skl", "srkl"):
        return {"alpha": skew_alpha}
    return {}


# --------------------------------------------------------------------------------------------------------
# Target builders.


def _masks(batch):
    tokens = batch["tokens"]
    return batch.get("mask", jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32))


def _with_targets(batch, tokens, kd_mask, ce_mask):
    """The builder's output: the batch with its tokens and masks replaced, and the whole batch's count ratio."""
    ce_scale = jnp.sum(kd_mask) / jnp.maximum(jnp.sum(ce_mask), 1.0)
    out = {k: v for k, v in batch.items() if k in STORE_FIELDS}
    return {
        **out,
        "tokens": tokens,
        "kd_mask": kd_mask,
        "ce_mask": ce_mask,
        "ce_scale": jnp.full((tokens.shape[0],), ce_scale, jnp.float32),
    }


def _real_data(student, batch, rng, frozen, spec):
    del student, rng, frozen, spec
    mask = _masks(batch)
    return _with_targets(batch, batch["tokens"], mask, mask), {}


def rollout(graphdef, params, tokens_bt1, rng, *, prompt_len, temperature, eos_id):
    """Continues tokens[:, :prompt_len] to the same length; returns (tokens, label mask [B, T]).

    mask[j] = 1 where the label of input position j is a generated token (up to and including EOS).
    """
    keys = jax.random.split(rng, tokens_bt1.shape[0])
    out = sampling.sample(
        graphdef,
        jax.lax.stop_gradient(params),
        tokens_bt1[:, :prompt_len],
        keys,
        max_new_tokens=tokens_bt1.shape[1] - prompt_len,
        temperature=temperature,
        eos_id=eos_id,
    )
    return out["tokens"], out["mask"][:, 1:]


def _student_rollout(student, batch, rng, frozen, spec):
    """GKD's mixture: with probability on_policy_fraction the continuation is the student's own sample; the
    divergence covers the sampled positions and CE only the prompt's real labels."""
    del frozen
    use_key, sample_key = jax.random.split(rng)
    use = jax.random.uniform(use_key) < spec.on_policy_fraction
    mask = _masks(batch)
    graphdef, params = nnx.split(student)

    def sampled():
        tokens, sample_mask = rollout(graphdef, params, batch["tokens"], sample_key, prompt_len=spec.prompt_len,
                                      temperature=spec.sample_temperature, eos_id=spec.eos_id)
        real = (jnp.arange(mask.shape[1]) < spec.prompt_len - 1).astype(mask.dtype)[None, :] * mask
        return tokens, sample_mask, real

    tokens, kd_mask, ce_mask = jax.lax.cond(use, sampled, lambda: (batch["tokens"], mask, mask))
    return _with_targets(batch, tokens, kd_mask, ce_mask), {"on_policy": (use.astype(jnp.float32), jnp.ones(()))}


def _teacher_rollout(student, batch, rng, frozen, spec):
    """Sequence-level KD: the teacher's samples after the prompt are the hard labels."""
    del student
    tokens, mask = rollout(spec.teacher_graphdef, frozen, batch["tokens"], rng, prompt_len=spec.prompt_len,
                           temperature=spec.sample_temperature, eos_id=spec.eos_id)
    return _with_targets(batch, tokens, mask, mask), {}


MODES = {
    "offline": Mode(_real_data, "store"),
    "online": Mode(_real_data, "model"),
    "on_policy": Mode(_student_rollout, "model"),
    "seqkd": Mode(_teacher_rollout, None),
    # DistillSpec's "target-generated" data with logit KD: the teacher's continuations, scored densely.
    "teacher_generated": Mode(_teacher_rollout, "model"),
}
# Losses beyond losses.LOSSES that the objective knows: CE alone, TAID (state in extra["taid"]), and TVD++
# (a policy-gradient estimator that needs tokens sampled from the student: on-policy data only).
KD_LOSSES = ("ce", "taid", "tvdpp", *losses.LOSSES)


def check_loss(mode, loss, *, on_policy_fraction=1.0):
    name = mode if isinstance(mode, str) else "this mode"
    mode = resolve_mode(mode)
    if loss not in KD_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {KD_LOSSES}")
    if mode.signal is None and loss != "ce":
        raise ValueError(f"{name} trains with cross-entropy on teacher samples: set loss='ce'")
    if mode is MODES["on_policy"] and loss == "ce":
        raise ValueError("on_policy needs a divergence to the teacher, not loss='ce'")
    if loss == "tvdpp" and not (mode is MODES["on_policy"] and on_policy_fraction == 1.0):
        raise ValueError("tvdpp estimates the TVD gradient from tokens the student sampled: use mode "
                         "'on_policy' with on_policy_fraction=1 (draft-generated data)")
    if loss == "tvdpp" and mode.signal == "store":
        raise ValueError("tvdpp needs the teacher's probability of the sampled token: not from a top-k store")


def needs_teacher_model(mode, loss):
    """Whether training runs the teacher network (offline reads the store; CE-only needs none)."""
    mode = resolve_mode(mode)
    if mode.signal is None:
        return True  # the teacher generates the data
    return mode.signal != "store" and loss != "ce"


# --------------------------------------------------------------------------------------------------------
# The one objective.


def kd_term(student_logits_btv, teacher, mask_bt, extra, spec: KDSpec, tokens_bt=None):
    """(sum, count) of the configured divergence (or TAID, or TVD++) of the student against `teacher`: the
    store's top-k fields (a dict) or the teacher's dense logits [B, T, V].  `tokens_bt`: the labels (TVD++)."""
    hparams = dict(spec.hparams)
    taid_t = {"t": extra["taid"].t} if spec.loss == "taid" else {}
    if spec.loss == "tvdpp":  # the tokens each position was sampled to (the labels) drive the estimator
        return losses.tvdpp(student_logits_btv, teacher, tokens_bt, mask_bt, temperature=spec.temperature)
    if isinstance(teacher, dict):
        top = (student_logits_btv, teacher["teacher_logprobs"], teacher["teacher_ids"], mask_bt)
        kw = dict(temperature=spec.temperature, tail=spec.tail,
                  teacher_tail_logprob_bt=teacher.get("teacher_tail_logprob"))
        if spec.loss == "taid":
            return losses.taid_topk(*top, **taid_t, **kw)
        return losses.topk_kd(*top, divergence=spec.loss, **kw, **hparams)
    if spec.loss == "taid":
        return losses.taid(student_logits_btv, teacher, mask_bt, temperature=spec.temperature, **taid_t)
    return losses.LOSSES[spec.loss](student_logits_btv, teacher, mask_bt, temperature=spec.temperature, **hparams)


def objective_loss(model, batch, rng, frozen, extra, *, spec: KDSpec):
    """ce_alpha * CE over ce_mask + (1 - ce_alpha) * divergence over kd_mask, each token-weighted (see the
    module docstring); aux: `ce` and `kd` as (sum, count)."""
    del rng
    if spec.chunk_size:
        return _fused_objective_loss(model, batch, frozen, extra, spec)
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    student_logits = model(inputs)
    ce_sum, ce_count = losses.cross_entropy(student_logits, labels, batch["ce_mask"])
    aux = {"ce": (ce_sum, ce_count)}
    if spec.loss == "ce":
        return ce_sum, ce_count, aux
    teacher = _teacher_signal(resolve_mode(spec.mode).signal, batch, frozen, spec, inputs)
    kd_sum, kd_count = kd_term(student_logits, teacher, batch["kd_mask"], extra, spec, tokens_bt=labels)
    aux["kd"] = (kd_sum, kd_count)
    # Every row of ce_scale holds the whole batch's C_kd / C_ce (see the module docstring).
    ce_scale = batch["ce_scale"][0]
    return spec.ce_alpha * ce_sum * ce_scale + (1.0 - spec.ce_alpha) * kd_sum, kd_count, aux


def _teacher_signal(signal, batch, frozen, spec, inputs):
    """The store's entries (a dict) or dense teacher logits [B, T, V] (gradients stopped)."""
    if signal == "store":
        return {k: batch[k] for k in STORE_FIELDS if k in batch}
    teacher = nnx.merge(spec.teacher_graphdef, frozen)
    logits = teacher(inputs) if signal == "model" else signal(teacher, batch, inputs)
    return jax.lax.stop_gradient(logits)


def _head(model):
    w, layout = model.unembedding()
    return fused_head.Head(w, layout=layout)


def _fused_teacher(batch, frozen, spec, inputs):
    """The teacher signal for the fused head: the store's entries, or the teacher's final hidden states and
    unembedding (no [B, T, V] teacher logits either)."""
    signal = resolve_mode(spec.mode).signal
    if callable(signal):
        raise ValueError("a mode with its own teacher signal has no fused head path: set loss_chunk_size=0")
    if signal == "store":
        return fused_head.TopkTeacher(batch["teacher_logprobs"], batch["teacher_ids"],
                                      batch.get("teacher_tail_logprob"), batch.get("teacher_label_logprob"))
    teacher = nnx.merge(spec.teacher_graphdef, frozen)
    return jax.lax.stop_gradient(fused_head.DenseTeacher(teacher.final_hidden(inputs), _head(teacher)))


def _fused_objective_loss(model, batch, frozen, extra, spec):
    """`objective_loss` through `kdjax.fused_head`: the same (sum, count) and aux, chunk by chunk."""
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    h = model.final_hidden(inputs)
    if spec.loss == "ce":
        out = fused_head.fused_loss(h, _head(model), labels, batch["ce_mask"], chunk_size=spec.chunk_size)
        return out.total, out.ce[1], {"ce": out.ce}
    if spec.loss == "tvdpp":
        raise ValueError("tvdpp has no fused head path: set loss_chunk_size=0")
    ce_weight = 0.0 if spec.ce_alpha == 0 else spec.ce_alpha * batch["ce_scale"][0]
    out = fused_head.fused_loss(
        h, _head(model), labels, batch["ce_mask"], chunk_size=spec.chunk_size,
        teacher=_fused_teacher(batch, frozen, spec, inputs), kd_mask_bt=batch["kd_mask"], loss=spec.loss,
        hparams=dict(spec.hparams), temperature=spec.temperature,
        taid_t=extra["taid"].t if spec.loss == "taid" else None, tail=spec.tail,
        ce_weight=ce_weight, kd_weight=1.0 - spec.ce_alpha,
    )
    return out.total, out.kd[1], {"ce": out.ce, "kd": out.kd}


def make_loss_fn(
    *,
    mode,
    loss,
    temperature=1.0,
    ce_alpha=0.0,
    hparams=None,
    tail="bucket",
    teacher_graphdef=None,
    on_policy_fraction=0.5,
    prompt_len=16,
    sample_temperature=1.0,
    eos_id=None,
    chunk_size=0,
) -> steps.Objective:
    """The step's objective for `mode` and `loss`: `MODES[mode].build` as its `prepare`, `objective_loss` as
    its `loss`.  Calling it, `fn(model, batch, rng, frozen, extra) -> (sum, count, aux)`, runs both on one
    batch.

    batch: `tokens` [B, T+1] (+ `mask` [B, T]); offline adds `teacher_ids`, `teacher_logprobs` [B, T, k]
    and `teacher_tail_logprob` [B, T].  frozen: the teacher's params (online / on_policy / seqkd).
    aux: `ce`, `kd` and, on_policy, `on_policy` (the fraction of batches that used student samples).
    chunk_size > 0 computes the head and the losses chunk by chunk over tokens (`kdjax.fused_head`): the same
    values and gradients, without any [B, T, V] array of the student or the teacher.
    """
    check_loss(mode, loss, on_policy_fraction=on_policy_fraction)
    if not 0.0 <= ce_alpha <= 1.0:
        raise ValueError(f"ce_alpha must be in [0, 1], got {ce_alpha}")
    spec = KDSpec(
        mode=mode,
        loss=loss,
        temperature=temperature,
        ce_alpha=ce_alpha,
        hparams=tuple(sorted((hparams or {}).items())),
        tail=tail,
        teacher_graphdef=teacher_graphdef,
        on_policy_fraction=on_policy_fraction,
        prompt_len=prompt_len,
        sample_temperature=sample_temperature,
        eos_id=eos_id,
        chunk_size=chunk_size,
    )
    build = resolve_mode(mode).build
    return steps.Objective(
        loss=functools.partial(objective_loss, spec=spec),
        prepare=lambda model, batch, rng, frozen, extra: build(model, batch, rng, frozen, spec),
    )


def make_taid_update(*, total_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """`extra_update` for train_step that advances TAID's t after each step with the step's mean TAID term
    (`kd`, KL(p_t || q)), not the CE-mixed loss: the schedule tracks how fast the student closes in on the
    interpolated target."""
    schedule = losses.TaidSchedule(t_start=t_start, t_end=t_end, alpha=alpha, beta=beta).check()

    def update(extra, means, step):
        return {**extra, "taid": losses.taid_update(extra["taid"], means["kd"], step, total_steps, schedule)}

    return update


def make_eval_fn(*, teacher_graphdef=None, chunk_size=0):
    """`metrics_fn(model, batch, frozen)` for evaluation on held-out data, all (sum, count) at T = 1.

    With the teacher's params in `frozen`: `kl` = KL(teacher || student) (dense), `teacher_ce`, `top1_agreement`
    and `acceptance` = sum min(p, q).  Without a teacher but with a store batch: `teacher_ce` from the stored
    label log-probs (exact), `top1_agreement` (the stored top-1 id is exact) and `kl_topk`, the bucketed
    top-k estimate of the KL.  Always: the student's `ce`.  chunk_size > 0: the same through the fused head.
    """

    def fn(model, batch, frozen):
        tokens = batch["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
        if chunk_size:
            return _fused_eval(model, batch, frozen, inputs, labels, mask)
        student = model(inputs)
        out = {"ce": losses.cross_entropy(student, labels, mask)}
        if frozen is not None:
            teacher = nnx.merge(teacher_graphdef, frozen)(inputs)
            out["kl"] = losses.forward_kl(student, teacher, mask)
            out["teacher_ce"] = losses.cross_entropy(teacher, labels, mask)
            out["top1_agreement"] = losses.top1_agreement(student, teacher, mask)
            out["acceptance"] = losses.acceptance_rate(student, teacher, mask)
        elif "teacher_ids" in batch:
            out["teacher_ce"] = (-jnp.sum(batch["teacher_label_logprob"] * mask), jnp.sum(mask))
            agree = jnp.argmax(student, axis=-1) == batch["teacher_ids"][..., 0]
            out["top1_agreement"] = (jnp.sum(agree * mask), jnp.sum(mask))
            out["kl_topk"] = losses.topk_kd(
                student,
                batch["teacher_logprobs"],
                batch["teacher_ids"],
                mask,
                divergence="fkl",
                tail="bucket",
                teacher_tail_logprob_bt=batch["teacher_tail_logprob"],
            )
        return out

    def _fused_eval(model, batch, frozen, inputs, labels, mask):
        teacher = None
        if frozen is not None:
            t = nnx.merge(teacher_graphdef, frozen)
            teacher = fused_head.DenseTeacher(t.final_hidden(inputs), _head(t))
        elif "teacher_ids" in batch:
            teacher = fused_head.TopkTeacher(batch["teacher_logprobs"], batch["teacher_ids"],
                                             batch["teacher_tail_logprob"], batch["teacher_label_logprob"])
        return fused_head.fused_metrics(model.final_hidden(inputs), _head(model), labels, mask,
                                        chunk_size=chunk_size, teacher=teacher)

    return fn
