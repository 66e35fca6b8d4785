"""Sharded train steps equal the single-device step; accumulation is exact; non-finite steps do no harm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import loop, sharding, steps
from kdjax.models.transformer import Transformer, TransformerConfig

V, L, B = 96, 16, 16
CFG = TransformerConfig.llama(
    vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=L
)


def batches(n, seed=0):
    rng = np.random.RandomState(seed)
    return [{"tokens": rng.randint(0, V, (B, L + 1)).astype(np.int32)} for _ in range(n)]


def run(mesh_shape, data, *, devices=None, accum_steps=1, loss_fn=steps.lm_loss, learning_rate=3e-3):
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    tx = steps.make_optimizer(learning_rate=learning_rate, warmup_steps=1, total_steps=10)
    graphdef, state, shardings = steps.init_train_state(
        lambda rngs: Transformer(CFG, rngs=rngs), tx, seed=0, mesh=mesh, rules=sharding.DEFAULT_RULES
    )
    batch_sh = sharding.batch_shardings(batches(1)[0], mesh, sharding.DEFAULT_RULES)
    step = steps.jit_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        state_shardings=shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
        accum_steps=accum_steps,
    )
    history = [jax.tree.map(np.array, state.params)]  # host copy: the state is donated to the step
    for batch in data:
        state, metrics = step(state, loop.to_device(batch, batch_sh), None)
        history.append(metrics)
    return state, history[1:], history[0]


@functools.cache
def reference_run():
    """Single-device parameters (after 3 steps, initial) as host arrays, shared by the mesh cases."""
    state, _, init = run({"data": 1}, batches(3), devices=jax.devices()[:1])
    return jax.tree.map(np.array, state.params), init


# Tolerance: float32 with the same math in another reduction order (sharded matmuls and all-reduces sum in a
# different order); after 3 AdamW steps differences stay at the 1e-6 level relative to parameters of ~0.02-1.
ATOL, RTOL = 2e-5, 1e-4


@pytest.mark.parametrize("mesh_shape", [{"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_step_equals_single_device(mesh_shape):
    ref, init = reference_run()
    got, _, _ = run(mesh_shape, batches(3))
    # The parameters really are distributed (else this test would compare a replicated run with itself).
    embed = got.params["embed"][...]
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape != embed.shape
    assert int(got.step) == 3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=RTOL),
        got.params,
        ref,
    )
    # And they moved: three steps are not a no-op.
    assert not np.allclose(ref["embed"][...], init["embed"][...], atol=1e-4)


def test_gradient_accumulation_is_exact():
    data = batches(2, seed=1)
    one, h1, _ = run({"data": 2, "fsdp": 2}, data, devices=jax.devices()[:4])
    four, h4, _ = run({"data": 2, "fsdp": 2}, data, devices=jax.devices()[:4], accum_steps=4)
    np.testing.assert_allclose(
        steps.reduce_metrics(h4[0])["loss"], steps.reduce_metrics(h1[0])["loss"], rtol=1e-6
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL), four.params, one.params)


def test_token_weighted_loss_ignores_masked_positions():
    def masked_loss(model, batch, rng, frozen, extra):
        mask = jnp.ones((B, L)).at[:, L // 2 :].set(0.0)
        return steps.lm_loss(model, {**batch, "mask": mask}, rng, frozen, extra)

    data = batches(1, seed=2)
    garbled = [{"tokens": data[0]["tokens"].copy()}]
    garbled[0]["tokens"][:, L // 2 + 1 :] = (garbled[0]["tokens"][:, L // 2 + 1 :] + 7) % V
    a, ha, _ = run({"data": 1}, data, devices=jax.devices()[:1], loss_fn=masked_loss)
    b, hb, _ = run({"data": 1}, garbled, devices=jax.devices()[:1], loss_fn=masked_loss)
    assert steps.reduce_metrics(ha[0])["loss"] == pytest.approx(steps.reduce_metrics(hb[0])["loss"], rel=1e-6)
    assert float(ha[0]["loss"][1]) == B * L // 2


def test_nonfinite_step_is_skipped_and_named():
    def poisoned(model, batch, rng, frozen, extra):
        total, count, aux = steps.lm_loss(model, batch, rng, frozen, extra)
        # NaN only in the second batch (its first token is the marker).
        bad = batch["tokens"][0, 0] == V - 1
        return jnp.where(bad, jnp.nan, total), count, aux

    data = batches(3, seed=3)
    for i, b in enumerate(data):
        b["tokens"][0, 0] = V - 1 if i == 1 else 0
    state, history, _ = run({"data": 1}, data, devices=jax.devices()[:1], loss_fn=poisoned)
    assert int(state.step) == 2  # the NaN step was not applied
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    with pytest.raises(FloatingPointError, match="step 2"):
        loop.check_finite([(i + 1, m) for i, m in enumerate(history)])
    loop.check_finite([(1, history[0])])  # a finite step passes


def test_finite_loss_with_a_nonfinite_update_is_not_applied():
    # lr 1e39 (the reproduction): the loss and the gradient are finite, the update is not (the rate
    # itself overflows float32).  The step must leave the state as it was and say why.
    data = batches(2, seed=4)
    state, history, init = run({"data": 1}, data, devices=jax.devices()[:1], learning_rate=1e39)
    m = steps.reduce_metrics(history[0])
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["nonfinite"] == 1.0
    assert int(state.step) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params, init)
    assert bool(steps.tree_all_finite(state.opt_state))
    with pytest.raises(FloatingPointError, match="step 1: the update made the parameters"):
        loop.check_finite([(1, history[0])])


def test_nonfinite_optimizer_state_is_caught():
    # An optimizer whose update leaves the parameters finite but its own state non-finite (e.g. a moment that
    # overflowed): the guard covers the optimizer state too, so the step is not applied.
    import optax

    def init(params):
        return {"moment": jax.tree.map(jnp.zeros_like, params)}

    def update(grads, state, params=None):
        del params
        return jax.tree.map(jnp.zeros_like, grads), {"moment": jax.tree.map(lambda g: g + jnp.inf, grads)}

    tx = optax.GradientTransformation(init, update)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, _ = steps.init_train_state(
        lambda rngs: Transformer(CFG, rngs=rngs), tx, seed=0, mesh=mesh, rules=sharding.DEFAULT_RULES
    )
    step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, loss_fn=steps.lm_loss))
    new_state, metrics = step(state, batches(1)[0])
    m = steps.reduce_metrics(metrics)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["nonfinite"] == 1.0
    assert int(new_state.step) == 0 and bool(steps.tree_all_finite(new_state.opt_state))


def test_make_mesh_and_rules():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    spec = sharding.logical_to_spec(
        ("embed", "kv_heads", "head_dim"), (32, 2, 8), sharding.DEFAULT_RULES, mesh
    )
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)  # 2 kv heads do not split over tensor=4
    spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), sharding.DEFAULT_RULES, mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("embedding",), (32,), sharding.DEFAULT_RULES, mesh)


def test_config_rules_are_the_library_defaults():
    # configs/ cannot import kdjax (the config files are plain ml_collections), so the rules are written out
    # twice; this keeps the two one definition.
    from configs import lm_pretrain

    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                  for name, axes in lm_pretrain.get_config().sharding_rules)
    assert rules == sharding.DEFAULT_RULES
