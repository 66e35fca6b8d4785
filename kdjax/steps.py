"""Pure train and eval steps, jitted once with explicit shardings.

    train_step(state, batch, frozen) -> (state, metrics)
    eval_step(params, batch, frozen) -> metrics

`loss_fn(model, batch, rng, frozen, extra) -> (loss_sum, count, aux)` is passed in: `aux` maps metric
names to `(sum, count)` pairs.  `frozen` carries inputs that are not trained (e.g. a teacher's params),
passed as jit arguments rather than closed over so they are sharded, not baked into the program as
constants; `extra` is loss-specific state carried in the train state (e.g. TAID's interpolation).

Metrics leave the step as `(sum, count)` pairs; `reduce_metrics` turns them into token-weighted means,
so averages stay exact over padding, microbatches, devices and hosts.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax import losses
from kdjax import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: Any
    rng: jax.Array  # PRNG key data (uint32), split per step
    extra: Any = flax.struct.field(default_factory=dict)  # loss-specific state, checkpointed with the rest


def make_schedule(*, learning_rate, warmup_steps, total_steps, end_fraction=0.1):
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `end_fraction * learning_rate`; with warmup_steps = 0 the first step already uses `learning_rate`."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, steps={total_steps})")
    # optax needs >= 1 warm-up step; starting that one step at the peak makes it no warm-up at all.
    init = 0.0 if warmup_steps else learning_rate
    return optax.warmup_cosine_decay_schedule(
        init, learning_rate, max(warmup_steps, 1), max(total_steps, 2), end_value=learning_rate * end_fraction
    )


def make_optimizer(
    *,
    learning_rate,
    warmup_steps,
    total_steps,
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    grad_clip=1.0,
    end_fraction=0.1,
):
    """AdamW with global-norm clipping and a warm-up + cosine schedule.

    Weight decay applies to matrices only (ndim >= 2), not to norms' scales or biases.
    """
    schedule = make_schedule(
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_fraction=end_fraction,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def lm_loss(model, batch, rng, frozen, extra):
    """Next-token cross-entropy on `batch['tokens']` [B, T+1] (inputs [:, :-1], labels [:, 1:]).

    `batch['mask']` ([B, T]) is optional: packed training data has no padding.
    """
    del rng, frozen, extra
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    total, count = losses.cross_entropy(model(inputs), labels, mask)
    return total, count, {"ce": (total, count)}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective in two parts, so that targets are built once per step and losses stay exact.

    prepare(model, batch, rng, frozen, extra) -> (batch, aux)   optional; once per step on the WHOLE batch,
        with gradients stopped: builds what the loss is scored against (e.g. on-policy samples of the model
        itself, a teacher's generations) and the masks of each loss term.  Running it before the microbatches
        makes every mask's global token count known before any gradient, so each term can be token-weighted
        over its own mask exactly, whatever `accum_steps` is.
    loss(model, batch, rng, frozen, extra) -> (sum, count, aux)   per microbatch, differentiated.

    Calling an Objective runs both on one batch (evaluation, tests).  A plain `loss` function is an Objective
    without `prepare`.
    """

    loss: Callable
    prepare: Optional[Callable] = None

    def __call__(self, model, batch, rng, frozen, extra):
        prep_rng, loss_rng = jax.random.split(rng)
        aux = {}
        if self.prepare is not None:
            batch, aux = self.prepare(model, batch, prep_rng, frozen, extra)
        total, count, loss_aux = self.loss(model, batch, loss_rng, frozen, extra)
        return total, count, {**aux, **loss_aux}


def as_objective(loss_fn) -> Objective:
    return loss_fn if isinstance(loss_fn, Objective) else Objective(loss=loss_fn)


def _split_microbatches(batch, accum_steps):
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum_steps} microbatches")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


class Accumulated(NamedTuple):
    """Gradient and loss of one step, summed over its microbatches (not yet divided by `count`)."""

    grads: Any
    total: jax.Array  # float32 scalar: sum of the microbatches' loss sums
    count: jax.Array  # float32 scalar: sum of their counts
    aux: dict  # {name: (sum, count)}, summed


def accumulate_gradients(objective, params, batch, rng, accum_steps) -> Accumulated:
    """Σ over microbatches of ∇ loss_sum, loss_sum, count and aux, for `objective(params, mb, rng) ->
    (sum, (count, aux))`.

    Microbatches run sequentially under `lax.scan` to save memory; each gets its own key.  With
    `accum_steps == 1` there is no scan: the [1, B, ...] reshape would make XLA re-shard the batch.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    mb_rngs = jax.random.split(rng, accum_steps)
    if accum_steps == 1:
        (total, (count, aux)), grads = grad_fn(params, batch, mb_rngs[0])
        return Accumulated(grads, total, count, aux)
    micro = _split_microbatches(batch, accum_steps)

    def body(acc, xs):
        (total, (count, aux)), grads = grad_fn(params, *xs)
        return Accumulated(*jax.tree.map(jnp.add, tuple(acc), (grads, total, count, aux))), None

    aux_shape = jax.eval_shape(lambda: objective(params, jax.tree.map(lambda x: x[0], micro), mb_rngs[0])[1][1])
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = Accumulated(
        jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(aux_shape)
    )
    acc, _ = jax.lax.scan(body, init, (micro, mb_rngs))
    return acc


def tree_all_finite(*trees) -> jax.Array:
    """True iff every floating-point leaf of every tree is finite (one fused reduction under jit)."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(trees)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def guarded_update(state: TrainState, grads, loss, *, tx, extra_update=None, means=None):
    """Applies `grads` unless anything about the step is not finite; returns (new state, finite flag).

    The guard covers the loss, the gradient norm AND what the update produces: the new parameters and the
    new optimizer state (a finite gradient times a learning rate of 1e39 is a non-finite parameter; a finite
    gradient of 1e20 squares to an infinite Adam second moment).  A step that fails any of these leaves
    params, optimizer state, step and loss-specific state exactly as they were.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(params, opt_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    extra = state.extra
    if extra_update is not None:
        extra = keep(extra_update(state.extra, means if means is not None else {"loss": loss}, state.step), state.extra)
    new_state = state.replace(
        step=state.step + finite.astype(state.step.dtype),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        extra=extra,
    )
    return new_state, finite, grad_norm


def train_step(
    state: TrainState,
    batch,
    frozen=None,
    *,
    graphdef,
    tx,
    loss_fn,
    accum_steps=1,
    extra_update=None,
):
    """One optimizer update on the token-weighted mean loss of `batch`.

    `loss_fn` is an `Objective` or a plain `loss(model, batch, rng, frozen, extra) -> (sum, count, aux)`.
    `extra_update(extra, means, step) -> extra` (optional) advances loss-specific state after the step,
    e.g. TAID's interpolation coefficient; it sees the step's means ({"loss": ..., and each aux metric's
    sum / count, e.g. "kd"}) and the 0-based step index.

    The gradient is  (Σ_microbatches ∇ loss_sum) / Σ count:  exactly the gradient of the mean over the
    whole batch, whatever `accum_steps` is.  A step whose loss, gradient, new parameters or new optimizer
    state is not finite is not applied (`guarded_update`) and sets `metrics['nonfinite']`, so the host can
    stop with the step number and no damage to the state.
    """
    objective_spec = as_objective(loss_fn)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    # prepare's key is its own (never a microbatch's, whose keys split step_rng) and does not depend on
    # accum_steps: the targets must not.
    prep_rng = jax.random.fold_in(step_rng, 1)
    prep_aux = {}
    if objective_spec.prepare is not None:
        model = nnx.merge(graphdef, jax.lax.stop_gradient(state.params))
        batch, prep_aux = objective_spec.prepare(model, batch, prep_rng, frozen, state.extra)
        batch = jax.lax.stop_gradient(batch)

    def objective(params, microbatch, mb_rng):
        total, count, aux = objective_spec.loss(nnx.merge(graphdef, params), microbatch, mb_rng, frozen, state.extra)
        return total, (count, aux)

    acc = accumulate_gradients(objective, state.params, batch, step_rng, accum_steps)
    denom = jnp.maximum(acc.count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, acc.grads)
    loss = acc.total / denom
    means = {"loss": loss, **{k: s / jnp.maximum(c, 1.0) for k, (s, c) in acc.aux.items()}}
    new_state, finite, grad_norm = guarded_update(
        state, grads, loss, tx=tx, extra_update=extra_update, means=means
    )
    metrics = {
        "loss": (acc.total, acc.count),
        "grad_norm": (grad_norm, jnp.ones(())),
        **prep_aux,
        **acc.aux,
        "nonfinite": (1.0 - finite.astype(jnp.float32), jnp.ones(())),
    }
    return new_state.replace(rng=jax.random.key_data(rng)), metrics


def eval_step(params, batch, frozen=None, *, graphdef, metrics_fn: Callable):
    """`metrics_fn(model, batch, frozen) -> {name: (sum, count)}` on one batch; no gradients, no state."""
    return metrics_fn(nnx.merge(graphdef, params), batch, frozen)


def lm_eval_metrics(model, batch, frozen):
    """Cross-entropy (sum, count) on a padded eval batch (`mask` zero on padding)."""
    del frozen
    tokens = batch["tokens"]
    mask = batch.get("mask", jnp.ones(tokens[:, 1:].shape, jnp.float32))
    return {"ce": losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], mask)}


def reduce_metrics(metrics):
    """{name: (sum, count)} -> {name: sum / count} as Python floats (one host transfer)."""
    host = jax.device_get(metrics)
    return {k: float(s) / max(float(c), 1e-30) for k, (s, c) in host.items()}


def add_metrics(acc, new):
    """Elementwise sum of two {name: (sum, count)} dicts (acc may be None)."""
    return new if acc is None else jax.tree.map(jnp.add, acc, new)


class StateSpec(NamedTuple):
    """What a run knows about its train state before creating it."""

    graphdef: Any  # the model's nnx graph definition (static structure, no arrays)
    abstract: Any  # TrainState of ShapeDtypeStructs carrying their shardings (a restore target)
    shardings: Any  # NamedSharding prefix tree of the TrainState
    init: Callable[[], TrainState]  # jitted: creates the state directly in its shardings


def train_state_spec(model_fn: Callable[[nnx.Rngs], nnx.Module], tx, *, seed: int, mesh, rules, extra=None):
    """Shapes and shardings of the train state, computed once from `jax.eval_shape` and the rules.

    `model_fn(rngs)` builds the NNX model.  `spec.init()` is jitted with the shardings as out_shardings,
    so no device ever holds an unsharded copy of the parameters; a resumed run skips it and restores
    into `spec.abstract` instead.
    """

    def init():
        model = model_fn(nnx.Rngs(seed))
        _, params = nnx.split(model, nnx.Param)
        key = jax.random.key_data(jax.random.key(seed + 1))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=key,
            extra=extra if extra is not None else {},
        )

    abstract = jax.eval_shape(init)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed))), nnx.Param)
    shardings = sharding_lib.tree_shardings(abstract, rules, mesh)
    abstract = sharding_lib.abstract_with_shardings(abstract, shardings)
    return StateSpec(graphdef, abstract, shardings, jax.jit(init, out_shardings=shardings))


def init_train_state(model_fn, tx, *, seed: int, mesh, rules, extra=None):
    """`train_state_spec` then `init()`: returns (graphdef, state, state_shardings)."""
    spec = train_state_spec(model_fn, tx, seed=seed, mesh=mesh, rules=rules, extra=extra)
    return spec.graphdef, spec.init(), spec.shardings


def jit_train_step(
    *,
    graphdef,
    tx,
    loss_fn,
    state_shardings,
    batch_shardings,
    mesh,
    frozen_shardings=None,
    accum_steps=1,
    extra_update=None,
    rules=None,
):
    """`train_step` jitted with explicit in/out shardings; the state is donated (updated in place).

    With `rules` (the config's logical-axis rules, activation names included) the step is traced under
    `sharding.with_activation_sharding`, so the model's activation constraints apply (pure FSDP then gathers
    each layer's weights instead of resharding activations); without, they are no-ops.
    """
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        accum_steps=accum_steps,
        extra_update=extra_update,
    )
    if rules is not None:
        step = sharding_lib.with_activation_sharding(step, mesh, rules)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(*, graphdef, metrics_fn, params_shardings, batch_shardings, mesh, frozen_shardings=None,
                  rules=None):
    """`eval_step` jitted with explicit shardings; `rules` as in `jit_train_step`."""
    step = functools.partial(eval_step, graphdef=graphdef, metrics_fn=metrics_fn)
    if rules is not None:
        step = sharding_lib.with_activation_sharding(step, mesh, rules)
    return jax.jit(
        step,
        in_shardings=(params_shardings, batch_shardings, frozen_shardings),
        out_shardings=sharding_lib.replicated(mesh),
    )
