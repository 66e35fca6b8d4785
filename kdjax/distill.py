"""Distillation objectives as `loss_fn(model, batch, rng, frozen, extra)` for `kdjax.steps.train_step`.

Modes (where the teacher signal and the tokens come from):
  offline:   the batch carries the teacher's top-k log-probs from the offline store; top-k KD.
  online:    the teacher runs inside the same jitted step on the batch (`frozen` = teacher params; no
             gradient reaches them).
  on_policy: with probability `on_policy_fraction` per batch the tokens after a prompt prefix are replaced
             by samples from the current student (KV-cache sampler, no gradient through sampling); the
             teacher is run on exactly those tokens and the divergence is taken on the sampled positions
             (GKD, Agarwal et al., ICLR 2024).
  seqkd:     the teacher generates the continuation after the prompt; the student is trained with
             cross-entropy on it (sequence-level KD, Kim & Rush, 2016).
Losses: any name of `kdjax.losses.LOSSES`, "taid" (its t lives in `extra["taid"]`), or "ce" (no teacher).
`ce_alpha` mixes hard-label cross-entropy in:  alpha * CE + (1 - alpha) * divergence, token-weighted.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.models import sampling

MODES = ("offline", "online", "on_policy", "seqkd")


def divergence_hparams(loss, *, jsd_beta=0.5, skew_alpha=0.1):
    """The hyperparameters that `losses.LOSSES[loss]` takes, from the config's values."""
    if loss == "jsd":
        return {"beta": jsd_beta}
    if loss in ("skl", "srkl"):
        return {"alpha": skew_alpha}
    return {}


def check_loss(mode, loss):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    known = ("ce", "taid", *losses.LOSSES)
    if loss not in known:
        raise ValueError(f"unknown loss {loss!r}; expected one of {known}")
    if mode == "seqkd" and loss != "ce":
        raise ValueError("seqkd trains with cross-entropy on teacher samples: set loss='ce'")
    if mode == "on_policy" and loss == "ce":
        raise ValueError("on_policy needs a divergence to the teacher, not loss='ce'")


def needs_teacher_model(mode, loss):
    """Whether training runs the teacher network (offline reads the store; CE-only needs none)."""
    return mode in ("online", "on_policy", "seqkd") and not (mode == "online" and loss == "ce")


def _rollout(graphdef, params, tokens_bt1, rng, *, prompt_len, temperature, eos_id):
    """Continues tokens[:, :prompt_len] to the same length; returns (tokens, label mask [B, T])."""
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
    # mask[j] = 1 on generated token j; the label of input position j - 1 is token j.
    return out["tokens"], out["mask"][:, 1:]


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
):
    """Builds the step's `loss_fn(model, batch, rng, frozen, extra) -> (sum, count, aux)`.

    batch: `tokens` [B, T+1] (+ `mask` [B, T]); offline adds `teacher_ids`, `teacher_logprobs` [B, T, k]
    and `teacher_tail_logprob` [B, T].  frozen: the teacher's params (online / on_policy / seqkd).
    aux: `ce`, `kd` and, on_policy, `on_policy` (the fraction of batches that used student samples).
    On a batch of student samples the divergence covers the sampled positions and the `ce_alpha` term only the
    prompt's (real) labels: the student is never trained with CE on its own samples.
    """
    check_loss(mode, loss)
    hparams = hparams or {}
    if not 0.0 <= ce_alpha <= 1.0:
        raise ValueError(f"ce_alpha must be in [0, 1], got {ce_alpha}")

    def divergence(student_logits, batch, teacher_logits, mask, extra):
        if teacher_logits is None:  # offline: the store's top-k
            topk = (student_logits, batch["teacher_logprobs"], batch["teacher_ids"], mask)
            tail_lp = batch.get("teacher_tail_logprob")
            if loss == "taid":
                return losses.taid_topk(
                    *topk,
                    t=extra["taid"].t,
                    temperature=temperature,
                    tail=tail,
                    teacher_tail_logprob_bt=tail_lp,
                )
            return losses.topk_kd(
                *topk,
                divergence=loss,
                temperature=temperature,
                tail=tail,
                teacher_tail_logprob_bt=tail_lp,
                **hparams,
            )
        if loss == "taid":
            return losses.taid(
                student_logits, teacher_logits, mask, t=extra["taid"].t, temperature=temperature
            )
        return losses.LOSSES[loss](student_logits, teacher_logits, mask, temperature=temperature, **hparams)

    def loss_fn(model, batch, rng, frozen, extra):
        tokens = batch["tokens"]
        mask = batch.get("mask", jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32))
        teacher = None if frozen is None else nnx.merge(teacher_graphdef, frozen)
        aux = {}
        # Hard labels are only ever real data: on a batch of student samples the CE term sees the prompt's
        # labels alone (training on its own samples would teach the student its own mistakes).
        ce_mask = mask
        if mode == "on_policy":
            use_key, sample_key = jax.random.split(rng)
            use = jax.random.uniform(use_key) < on_policy_fraction
            graphdef, params = nnx.split(model)
            real_labels = (jnp.arange(mask.shape[1]) < prompt_len - 1).astype(mask.dtype)[None, :] * mask
            tokens, mask, ce_mask = jax.lax.cond(
                use,
                lambda: (
                    *_rollout(
                        graphdef,
                        params,
                        tokens,
                        sample_key,
                        prompt_len=prompt_len,
                        temperature=sample_temperature,
                        eos_id=eos_id,
                    ),
                    real_labels,
                ),
                lambda: (tokens, mask, mask),
            )
            aux["on_policy"] = (use.astype(jnp.float32), jnp.ones(()))
        elif mode == "seqkd":
            graphdef, params = nnx.split(teacher)
            tokens, mask = _rollout(
                graphdef,
                params,
                tokens,
                rng,
                prompt_len=prompt_len,
                temperature=sample_temperature,
                eos_id=eos_id,
            )
            ce_mask = mask  # seqkd's targets are the teacher's samples: that is the method
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        student_logits = model(inputs)
        ce_sum, ce_count = losses.cross_entropy(student_logits, labels, ce_mask)
        aux["ce"] = (ce_sum, ce_count)
        if loss == "ce":
            return ce_sum, ce_count, aux
        teacher_logits = None
        if mode != "offline":
            teacher_logits = jax.lax.stop_gradient(teacher(inputs))
        kd_sum, count = divergence(student_logits, batch, teacher_logits, mask, extra)
        aux["kd"] = (kd_sum, count)
        # Normalised by the divergence's token count; on a sampled batch the CE sum (prompt labels) rides along.
        return ce_alpha * ce_sum + (1.0 - ce_alpha) * kd_sum, count, aux

    return loss_fn


def make_taid_update(*, total_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """`extra_update` for train_step that advances TAID's t with each step's mean loss."""

    def update(extra, loss, step):
        return {
            **extra,
            "taid": losses.taid_update(
                extra["taid"], loss, step, total_steps, t_start=t_start, t_end=t_end, alpha=alpha, beta=beta
            ),
        }

    return update


def make_eval_fn(*, teacher_graphdef=None):
    """`metrics_fn(model, batch, frozen)` for evaluation on held-out data, all (sum, count) at T = 1.

    With the teacher's params in `frozen`: `kl` = KL(teacher || student) (dense), `teacher_ce`, `top1_agreement`
    and `acceptance` = sum min(p, q).  Without a teacher but with a store batch: `teacher_ce` from the stored
    label log-probs (exact), `top1_agreement` (the stored top-1 id is exact) and `kl_topk`, the bucketed
    top-k estimate of the KL.  Always: the student's `ce`.
    """

    def fn(model, batch, frozen):
        tokens = batch["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
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

    return fn
