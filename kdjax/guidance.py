"""Diversity-rewarded CFG distillation for language models (Cideron et al., 2024, arXiv 2410.06084).

A teacher trained with condition dropout gives both p(y | c) and p(y | null).  Classifier-free guidance on
logits, l_cfg = l_u + gamma (l_c - l_u) (`kdjax.models.sampling.cfg_logits`), improves how well samples
follow c but costs two network forwards per token and reduces diversity.  The student (initialised from the
teacher, run without CFG: one forward per token) is trained on its own samples y ~ pi_theta(. | c):

    L(theta) = (1/|y|) sum_t D(pi_theta(. | c, y_<t), stop_grad pi_cfg(. | c, y_<t))       (distillation)
               - beta * Div(theta),     Div(theta) = E_{y, y' ~ pi_theta(. | c)} [1 - cos(E(y), E(y'))]

D is any divergence of `kdjax.losses.LOSSES` (default "rkl" = KL(student || CFG teacher), the paper's
direction, over the full vocabulary per token), averaged over generated tokens (the paper sums over
positions: its beta is ours times the mean generation length).  Div's gradient is estimated by REINFORCE
from G >= 3 independent generations y_1..y_G of each prompt:

    r_i = 1 - 1/(G-1) sum_{j != i} cos(E(y_i), E(y_j))                              (diversity reward, in [0, 2])
    A_i = r_i - 1/(G-1) sum_{j != i} r_j                                              (leave-one-out baseline)
    grad Div ~= 1/(N G) sum_{n, i} c_G A_ni grad log pi_theta(y_ni | c_n),   c_G = 2 (G-1) / (G-2).

Why c_G: r_i is a pairwise reward, so the others' rewards r_j (the baseline) contain d(y_j, y_i) and are
NOT independent of y_i.  Working it out, A_i = (G-2)/(G-1) (r_i - Dbar_{-i}) with Dbar_{-i} the mean pairwise
dissimilarity among the other G-1 generations (independent of y_i), and E[r_i grad log pi(y_i)] = grad Div / 2
(each of the two arguments of the pair contributes half); hence E[A_i grad log pi(y_i)] = (G-2)/(2(G-1))
grad Div, and c_G makes the estimate unbiased.  With G = 2 both generations get the same reward and the
leave-one-out advantages are identically zero (the paper's G = 2 estimator uses no baseline); G >= 3 is
required.  `tests/guidance_test.py` checks the expectation by enumeration on a toy categorical.

E is the frozen teacher's last hidden state (after the final norm) mean-pooled over the generated tokens
and L2-normalised, read with the null prefix (so the shared condition does not make every pair similar).
Rewards and advantages carry no gradient.  beta = 0 is the "quality" model, beta > 0 a "diversity" model;
the deployed trade-off is a weight interpolation theta(kappa) = (1 - kappa) theta_q + kappa theta_d of two
students fine-tuned from the same teacher (`interpolate_params`).

Shapes: b sequences (= n prompts x g generations, prompt-major), t time, v vocabulary, d embedding, p prefix.
"""

import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import distill, steps
from kdjax.models import sampling

EMBEDDINGS = ("teacher_null", "teacher_cond")


# --------------------------------------------------------------------------------------------------------
# The condition: prefixes, condition dropout, the guided teacher signal.


def with_prefix(tokens_bt, prefix_p):
    """tokens with their first P columns replaced by `prefix_p` [P] (every row)."""
    p = prefix_p.shape[0]
    return tokens_bt.at[:, :p].set(jnp.broadcast_to(prefix_p.astype(tokens_bt.dtype), (tokens_bt.shape[0], p)))


def drop_condition(tokens_bt, null_prefix_p, rng, *, rate):
    """Condition dropout: each row's first P tokens become the null prefix with probability `rate`.

    Returns (tokens_bt, dropped_b bool).  One model trained on this learns p(y | c) and p(y | null) together.
    """
    p = null_prefix_p.shape[0]
    dropped_b = jax.random.bernoulli(rng, rate, (tokens_bt.shape[0],))
    prefix_bp = jnp.where(dropped_b[:, None], null_prefix_p[None, :].astype(tokens_bt.dtype), tokens_bt[:, :p])
    return tokens_bt.at[:, :p].set(prefix_bp), dropped_b


def conditional_lm_objective(*, null_prefix_p, rate) -> steps.Objective:
    """Next-token CE on prefix + window batches (`batch["loss_mask"]` [B, T] excludes the prefix's own tokens
    and padding; times `batch["mask"]`, the row validity, when present) with
    condition dropout at `rate`, drawn once per step on the whole batch (the same rows whatever accum_steps).
    aux `uncond`: the fraction of rows trained unconditionally."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"condition dropout rate must be in [0, 1), got {rate}")
    null = jnp.asarray(null_prefix_p, jnp.int32)

    def prepare(model, batch, rng, frozen, extra):
        del model, frozen, extra
        tokens, dropped = drop_condition(batch["tokens"], null, rng, rate=rate)
        n = jnp.asarray(dropped.shape[0], jnp.float32)
        mask = batch["loss_mask"] * batch["mask"] if "mask" in batch else batch["loss_mask"]
        return {"tokens": tokens, "mask": mask}, {"uncond": (jnp.sum(dropped.astype(jnp.float32)), n)}

    return steps.Objective(loss=steps.lm_loss, prepare=prepare)


def cfg_teacher_signal(*, guidance, null_prefix_p):
    """A `distill.Mode` signal: the teacher's CFG logits l_u + guidance (l_c - l_u) on the batch's inputs,
    l_c on the inputs as they are (condition prefix) and l_u on the same inputs with the null prefix, both
    rows in one batched forward.  guidance = 1 is the conditional teacher (one forward)."""
    null = jnp.asarray(null_prefix_p, jnp.int32)

    def signal(teacher, batch, inputs_bt):
        del batch
        if guidance == 1.0:
            return teacher(inputs_bt).astype(jnp.float32)
        b = inputs_bt.shape[0]
        both = teacher(jnp.concatenate([inputs_bt, with_prefix(inputs_bt, null)], axis=0))
        return sampling.cfg_logits(both[:b], both[b:], guidance=guidance)

    return signal


# --------------------------------------------------------------------------------------------------------
# Embeddings, rewards, advantages, the REINFORCE surrogate.


def mean_pooled_embedding(hidden_btd, mask_bt, *, eps=1e-6):
    """e_b = h_b / max(||h_b||, eps),  h_b = sum_t m_bt hidden_btd / max(sum_t m_bt, 1): [B, T, D] -> [B, D]."""
    m = mask_bt.astype(jnp.float32)[..., None]
    pooled = jnp.sum(hidden_btd.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), eps)


def generation_embedding(teacher, tokens_bt, gen_mask_bt, *, null_prefix_p=None):
    """E(y) of each row: the teacher's final hidden state (after the final norm) mean-pooled over the
    generated positions (gen_mask_bt [B, T], 1 on generated tokens), L2-normalised; the prefix replaced by
    `null_prefix_p` when given (the "teacher_null" embedding).  [B, T] -> [B, D]."""
    if null_prefix_p is not None:
        tokens_bt = with_prefix(tokens_bt, jnp.asarray(null_prefix_p, jnp.int32))
    return mean_pooled_embedding(teacher.final_hidden(tokens_bt), gen_mask_bt)


def diversity_rewards(emb_ngd):
    """r_ni = 1 - 1/(G-1) sum_{j != i} cos(e_ni, e_nj) for N groups of G >= 2 embeddings [N, G, D] -> [N, G].

    Embeddings are normalised here too, so any nonzero vectors work; r is in [0, 2], 0 when all of a group's
    generations embed alike, and permuting a group permutes its rewards.
    """
    g = emb_ngd.shape[1]
    if g < 2:
        raise ValueError(f"diversity rewards need >= 2 generations per prompt, got {g}")
    e = emb_ngd.astype(jnp.float32)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    cos_ngg = jnp.einsum("nid,njd->nij", e, e)
    # Masking (not subtracting) the diagonal keeps r exact for identical embeddings.
    others = jnp.sum(jnp.where(jnp.eye(g, dtype=bool), 0.0, cos_ngg), axis=-1)
    return 1.0 - others / (g - 1)


def leave_one_out_advantages(rewards_ng):
    """A_ni = r_ni - 1/(G-1) sum_{j != i} r_nj (each generation's baseline is the others' mean reward):
    unbiased (the baseline does not depend on y_i), and sum_i A_ni = 0 in every group.  [N, G] -> [N, G]."""
    g = rewards_ng.shape[1]
    if g < 2:
        raise ValueError(f"a leave-one-out baseline needs >= 2 generations per prompt, got {g}")
    total = jnp.sum(rewards_ng, axis=1, keepdims=True)
    return rewards_ng - (total - rewards_ng) / (g - 1)


def pairwise_reward_advantages(rewards_ng):
    """c_G * A_ni with c_G = 2 (G-1) / (G-2): leave-one-out advantages of the pairwise diversity reward scaled
    so that 1/(N G) sum c_G A grad log pi is an unbiased estimate of grad Div (see the module docstring).
    Needs G >= 3.  [N, G] -> [N, G]."""
    g = rewards_ng.shape[1]
    if g < 3:
        raise ValueError(f"the pairwise diversity reward needs >= 3 generations per prompt with a leave-one-out "
                         f"baseline (with 2 both get the same reward and every advantage is 0), got {g}")
    return leave_one_out_advantages(rewards_ng) * (2.0 * (g - 1) / (g - 2))


def token_logprobs(logits_btv, labels_bt):
    """log softmax(logits)[label] per position, float32: [B, T, V], [B, T] -> [B, T]."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels_bt[..., None], axis=-1)[..., 0]


def reinforce_surrogate(logits_btv, labels_bt, mask_bt, advantages_b):
    """(sum, count) = (-sum_b A_b sum_t m_bt log pi(y_bt | y_<t), B), A carried without gradient.

    d(sum / count) / d theta = -(1/B) sum_b A_b grad log pi(y_b): the negated REINFORCE estimate of the
    gradient of E[r], so minimising it ascends the expected reward.  Its value is not the objective.
    """
    seq_logp_b = jnp.sum(token_logprobs(logits_btv, labels_bt) * mask_bt.astype(jnp.float32), axis=1)
    adv = jax.lax.stop_gradient(advantages_b.astype(jnp.float32))
    return -jnp.sum(adv * seq_logp_b), jnp.asarray(advantages_b.shape[0], jnp.float32)


# --------------------------------------------------------------------------------------------------------
# The CFG-distillation objective (a `distill.Mode` of our own + the diversity term).


def _rollouts(student, batch, rng, frozen, spec, *, num_generations, max_new_tokens, beta, embedding,
              null_prefix_p):
    """`Mode.build`: G on-policy samples per prompt from the student, the KD mask over the generated tokens,
    and (beta > 0) each sample's scaled leave-one-out diversity advantage (`pairwise_reward_advantages`) from
    the frozen teacher's embedding.

    batch: `prompt` [B, P] (condition prefixes).  Returns tokens [B G, P + N] (prompt-major: rows b G .. b G +
    G - 1 share prompt b), kd_mask [B G, P + N - 1], ce_mask zeros (the student's own samples are never hard
    labels), ce_scale, and with beta > 0 `advantage` [B G] and `rl_scale` [B G] (= C_kd / (B G) in every row).
    """
    prompts = jnp.repeat(batch["prompt"], num_generations, axis=0)
    rows = prompts.shape[0]
    graphdef, params = nnx.split(student)
    out = sampling.sample(graphdef, jax.lax.stop_gradient(params), prompts, jax.random.split(rng, rows),
                          max_new_tokens=max_new_tokens, temperature=spec.sample_temperature, eos_id=spec.eos_id)
    tokens, gen_mask = out["tokens"], out["mask"]
    kd_mask = gen_mask[:, 1:]
    c_kd = jnp.sum(kd_mask)
    targets = {"tokens": tokens, "kd_mask": kd_mask, "ce_mask": jnp.zeros_like(kd_mask),
               "ce_scale": jnp.full((rows,), c_kd, jnp.float32)}
    aux = {"gen_tokens": (c_kd, jnp.asarray(rows, jnp.float32))}
    if beta:
        teacher = nnx.merge(spec.teacher_graphdef, frozen)
        null = null_prefix_p if embedding == "teacher_null" else None
        emb = generation_embedding(teacher, tokens, gen_mask, null_prefix_p=null)
        rewards = diversity_rewards(emb.reshape(-1, num_generations, emb.shape[-1]))
        adv = pairwise_reward_advantages(rewards).reshape(-1)
        targets.update(advantage=jax.lax.stop_gradient(adv), rl_scale=jnp.full((rows,), c_kd / rows, jnp.float32))
        aux["reward"] = (jnp.sum(rewards), jnp.asarray(rows, jnp.float32))
    return targets, aux


def make_objective(*, teacher_graphdef, null_prefix_p, guidance, loss="rkl", hparams=None, temperature=1.0,
                   beta=0.0, num_generations=4, max_new_tokens, sample_temperature=1.0, eos_id=None,
                   embedding="teacher_null") -> steps.Objective:
    """The CFG-distillation step objective: `distill.make_loss_fn` with our own Mode (on-policy rollouts from
    condition prefixes, the CFG teacher as the signal) and, for beta > 0, the REINFORCE diversity term:

        (sum, count) = (KD_sum + beta * R_sum * C_kd / (B G), C_kd),   R = `reinforce_surrogate`,

    so sum / count = mean-token KD - beta * (REINFORCE surrogate of Div) exactly, whatever accum_steps is.
    beta = 0 returns the distillation objective itself.  The diversity term costs one more student forward.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if num_generations < (3 if beta else 1):
        raise ValueError(f"num_generations must be >= 3 for the diversity reward's leave-one-out baseline "
                         f"(beta={beta}), got {num_generations}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding {embedding!r}; expected one of {EMBEDDINGS}")
    if loss in ("ce", "tvdpp", "taid"):
        raise ValueError(f"loss {loss!r} is not a divergence to the CFG teacher; use one of kdjax.losses.LOSSES")
    null = jnp.asarray(null_prefix_p, jnp.int32)
    mode = distill.Mode(
        build=functools.partial(_rollouts, num_generations=num_generations, max_new_tokens=max_new_tokens,
                                beta=beta, embedding=embedding, null_prefix_p=null),
        signal=cfg_teacher_signal(guidance=guidance, null_prefix_p=null),
    )
    kd = distill.make_loss_fn(mode=mode, loss=loss, temperature=temperature, hparams=hparams,
                              teacher_graphdef=teacher_graphdef, prompt_len=int(null.shape[0]),
                              sample_temperature=sample_temperature, eos_id=eos_id)
    if not beta:
        return kd

    def loss_fn(model, batch, rng, frozen, extra):
        total, count, aux = kd.loss(model, batch, rng, frozen, extra)
        tokens = batch["tokens"]
        rl_sum, rl_count = reinforce_surrogate(model(tokens[:, :-1]), tokens[:, 1:], batch["kd_mask"],
                                               batch["advantage"])
        return total + beta * rl_sum * batch["rl_scale"][0], count, {**aux, "reinforce": (rl_sum, rl_count)}

    return steps.Objective(loss=loss_fn, prepare=kd.prepare)


# --------------------------------------------------------------------------------------------------------
# Weight interpolation.


def check_same_architecture(params_a, params_b, *, names=("quality", "diversity")):
    """Raises ValueError naming the first difference (tree structure, a leaf's shape or dtype)."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(params_a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(params_b)
    if tree_a != tree_b:
        paths_a = {jax.tree_util.keystr(p) for p, _ in leaves_a}
        paths_b = {jax.tree_util.keystr(p) for p, _ in leaves_b}
        only = sorted(paths_a ^ paths_b)[:3]
        raise ValueError(f"cannot interpolate: the {names[0]} and {names[1]} models have different parameter trees"
                         + (f" (e.g. {only})" if only else ""))
    for (path, a), (_, b) in zip(leaves_a, leaves_b):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"cannot interpolate: {jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)} in the "
                             f"{names[0]} model and {b.dtype}{list(b.shape)} in the {names[1]} model")


def interpolate_params(params_q, params_d, kappa):
    """theta(kappa) = (1 - kappa) theta_q + kappa theta_d, leaf by leaf in the leaves' dtype.

    kappa = 0 and 1 give the endpoints bit for bit (1 * x + 0 * y = x exactly for finite values; a -0.0
    entry would come back as +0.0).  Refuses mismatched architectures (`check_same_architecture`); kappa must
    be a Python number in [0, 1].
    """
    if not 0.0 <= float(kappa) <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    check_same_architecture(params_q, params_d)
    k = float(kappa)
    return jax.tree.map(lambda a, b: ((1.0 - k) * a + k * b).astype(a.dtype), params_q, params_d)


# --------------------------------------------------------------------------------------------------------
# Evaluation helpers (host numpy).


def pairwise_cosine_distances(emb_ngd) -> np.ndarray:
    """Each group's mean over pairs i < j of 1 - cos(e_i, e_j): [N, G, D] -> [N] (float64)."""
    e = np.asarray(emb_ngd, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    g = e.shape[1]
    if g < 2:
        raise ValueError(f"pairwise distances need >= 2 generations per group, got {g}")
    cos = np.einsum("nid,njd->nij", e, e)
    iu = np.triu_indices(g, k=1)
    return np.mean(1.0 - cos[:, iu[0], iu[1]], axis=1)


def pairwise_cosine_distance(emb_ngd) -> float:
    """Mean over groups of `pairwise_cosine_distances`: [N, G, D] -> float."""
    return float(np.mean(pairwise_cosine_distances(emb_ngd)))


def distinct_n(groups: Sequence[Sequence[Sequence[int]]], n: int = 2) -> float:
    """Mean over groups of (distinct n-grams / n-grams) pooled over the group's sequences (Li et al., 2016).
    A group without any n-gram counts as 0."""
    scores = []
    for group in groups:
        grams = [tuple(s[i: i + n]) for s in group for i in range(len(s) - n + 1)]
        scores.append(len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(scores))


def curve_quality_at(curve: Sequence[tuple[float, float]], diversity: float) -> float:
    """The reference quality at `diversity` of a set of (diversity, quality) points (e.g. CFG at several
    gamma): the best of (a) every reference point at least as diverse, (b) the straight segment between the
    two reference points around `diversity`, (c) beyond the most diverse reference point, that point's quality.
    A point beats the reference there only if nothing in it is as diverse and as good."""
    pts = sorted((float(x), float(y)) for x, y in curve)
    if not pts:
        raise ValueError("the reference curve is empty")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    candidates = [y for x, y in pts if x >= diversity]
    if xs[0] <= diversity <= xs[-1]:
        candidates.append(float(np.interp(diversity, xs, ys)))
    if diversity > xs[-1]:
        candidates.append(ys[-1])
    return max(candidates)


def above_curve(point: tuple[float, float], curve: Sequence[tuple[float, float]]) -> bool:
    """Whether (diversity, quality) lies strictly above the reference curve (`curve_quality_at`)."""
    return point[1] > curve_quality_at(curve, point[0])


def tree_fingerprint(tree: Any) -> str:
    """A short sha256 of a pytree's leaf values (host), e.g. to record which teacher a student came from."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
