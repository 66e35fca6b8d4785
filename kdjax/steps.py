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

import functools
from typing import Any, Callable, NamedTuple

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
    """Linear warm-up to `learning_rate`, then cosine decay to `end_fraction * learning_rate`."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, steps={total_steps})")
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, 1), max(total_steps, 2), end_value=learning_rate * end_fraction
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


def _split_microbatches(batch, accum_steps):
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum_steps} microbatches")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch,
    frozen=None,
    *,
    graphdef,
    tx,
    loss_fn: Callable,
    accum_steps=1,
    extra_update=None,
):
    """One optimizer update on the token-weighted mean loss of `batch`.

    `extra_update(extra, loss, step) -> extra` (optional) advances loss-specific state after the step,
    e.g. TAID's interpolation coefficient; it sees the step's mean loss and the 0-based step index.

    The gradient is  (Σ_microbatches ∇ loss_sum) / Σ count:  exactly the gradient of the mean over the
    whole batch, whatever `accum_steps` is (microbatches run sequentially under `lax.scan` to save memory).
    A non-finite loss or gradient leaves params and optimizer state unchanged and sets
    `metrics['nonfinite']`, so the host can stop with the step number and no damage to the state.
    """
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def objective(params, microbatch, mb_rng):
        model = nnx.merge(graphdef, params)
        total, count, aux = loss_fn(model, microbatch, mb_rng, frozen, state.extra)
        return total, (count, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    micro = _split_microbatches(batch, accum_steps) if accum_steps > 1 else None
    mb_rngs = jax.random.split(step_rng, accum_steps)

    def accumulate(carry, xs):
        microbatch, mb_rng = xs
        (total, (count, aux)), grads = grad_fn(state.params, microbatch, mb_rng)
        acc_grads, acc_total, acc_count, acc_aux = carry
        return (
            jax.tree.map(jnp.add, acc_grads, grads),
            acc_total + total,
            acc_count + count,
            jax.tree.map(jnp.add, acc_aux, aux),
        ), None

    if accum_steps == 1:
        # No scan for the common case: the [1, B, ...] reshape would make XLA re-shard the batch.
        (total, (count, aux)), grads = grad_fn(state.params, batch, mb_rngs[0])
    else:
        aux_shape = jax.eval_shape(
            lambda: objective(state.params, jax.tree.map(lambda x: x[0], micro), mb_rngs[0])[1][1]
        )
        init = (
            jax.tree.map(jnp.zeros_like, state.params),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
        )
        (grads, total, count, aux), _ = jax.lax.scan(accumulate, init, (micro, mb_rngs))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    extra = (
        state.extra
        if extra_update is None
        else keep(extra_update(state.extra, loss, state.step), state.extra)
    )
    new_state = state.replace(
        step=state.step + finite.astype(state.step.dtype),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=jax.random.key_data(rng),
        extra=extra,
    )
    metrics = {
        "loss": (total, count),
        "grad_norm": (grad_norm, jnp.ones(())),
        **aux,
        "nonfinite": (1.0 - finite.astype(jnp.float32), jnp.ones(())),
    }
    return new_state, metrics


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
):
    """`train_step` jitted with explicit in/out shardings; the state is donated (updated in place)."""
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        accum_steps=accum_steps,
        extra_update=extra_update,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(*, graphdef, metrics_fn, params_shardings, batch_shardings, mesh, frozen_shardings=None):
    step = functools.partial(eval_step, graphdef=graphdef, metrics_fn=metrics_fn)
    return jax.jit(
        step,
        in_shardings=(params_shardings, batch_shardings, frozen_shardings),
        out_shardings=sharding_lib.replicated(mesh),
    )
