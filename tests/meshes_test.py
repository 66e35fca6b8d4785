"""One step implementation on every mesh: data, fsdp and tensor parallel runs equal the 1-device run.

The mesh shape alone selects the parallelism: with `sharding.DEFAULT_RULES` a mesh axis of size 1 shards
nothing, so (8,1,1) is pure data parallelism (replicated params), (2,4,1) data x FSDP (params and optimizer
state sharded on `embed`), (2,2,2) all three, and (1,1,8) pure tensor parallelism (heads / mlp / vocab split,
batch replicated).  Every step here is traced with the model's activation constraints
(`sharding.with_activation_sharding`), as a training run's is.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import distill, loop, sharding, steps
from kdjax.models.partitioning import unstacked_ndim
from kdjax.models.transformer import Transformer, TransformerConfig, to_unscanned

V, L, B = 96, 16, 16
# 8 query heads, mlp 64 and vocab 96 divide a tensor axis of 8; 2 kv heads do not, and fall back to
# replication (the rules' divisibility check), which is part of what this covers.
CFG = TransformerConfig.llama(
    vocab_size=V, num_layers=2, embed_dim=32, num_heads=8, num_kv_heads=2, head_dim=4, mlp_dim=64, max_len=L
)
STEPS = 3

# Tolerance: float32 everywhere (conftest sets matmul precision "highest"); a sharded run does the same
# arithmetic with sums split across devices and re-associated by all-reduces, so results differ only by
# rounding (~1e-7 relative per op).  Adam divides by sqrt(v) and so amplifies tiny gradient differences on
# near-zero gradients up to ~lr-sized steps in the worst case; 3 steps at lr 3e-3 (warm-up 1) keep observed
# differences around 1e-6, well inside these bounds for parameters of size ~0.02-1.
ATOL, RTOL = 2e-5, 1e-4


def batches(n, seed=0):
    rng = np.random.RandomState(seed)
    return [{"tokens": rng.randint(0, V, (B, L + 1)).astype(np.int32)} for _ in range(n)]


def jit_constrained_step(*, graphdef, tx, loss_fn, state_shardings, batch_shardings, mesh, rules):
    """`steps.jit_train_step`, traced under the rules' activation constraints."""
    fn = functools.partial(steps.train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn)
    return jax.jit(sharding.with_activation_sharding(fn, mesh, rules),
                   in_shardings=(state_shardings, batch_shardings, None),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def layer_aware_optimizer():
    """`steps.make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10)` with AdamW's decay mask
    counting a scanned model's stacked [L, D] norm scales as the vectors they are (its mask tests p.ndim)."""
    schedule = steps.make_schedule(learning_rate=3e-3, warmup_steps=1, total_steps=10)
    mask = lambda params: jax.tree.map(lambda v: unstacked_ndim(v) >= 2, params,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask))


def run(mesh_shape, *, devices=None, cfg=CFG):
    """Final train state after STEPS steps on `mesh_shape`, plus the host copy of the initial params."""
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    rules = sharding.DEFAULT_RULES
    tx = (layer_aware_optimizer() if cfg.scan_layers
          else steps.make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10))
    graphdef, state, shardings = steps.init_train_state(
        lambda rngs: Transformer(cfg, rngs=rngs), tx, seed=0, mesh=mesh, rules=rules
    )
    data = batches(STEPS)
    batch_sh = sharding.batch_shardings(data[0], mesh, rules)
    step = jit_constrained_step(graphdef=graphdef, tx=tx, loss_fn=steps.lm_loss, state_shardings=shardings,
                                batch_shardings=batch_sh, mesh=mesh, rules=rules)
    init = jax.tree.map(np.array, state.params)  # host copy before the state is donated
    for batch in data:
        state, _ = step(state, loop.to_device(batch, batch_sh), None)
    return state, init


@functools.cache
def reference():
    """(params after STEPS steps, initial params) on one device, as host arrays; shared by all cases."""
    state, init = run({"data": 1}, devices=jax.devices()[:1])
    return jax.tree.map(np.array, state.params), init


def _spec(x):
    return tuple(x.sharding.spec)


@pytest.mark.parametrize(
    "shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)], ids=lambda s: "data%d-fsdp%d-tensor%d" % s
)
def test_mesh_equals_single_device(shape, capfd, no_compilation_cache):
    mesh_shape = dict(zip(sharding.MESH_AXES, shape))
    ref, init = reference()
    state, _ = run(mesh_shape)
    # With activation constraints no mesh makes GSPMD replicate-then-repartition (the embedding lookup and its
    # scatter-add gradient did on (2, 2, 2) and (2, 4, 1) before its table's embed dimension was gathered).
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    data, fsdp, tensor = shape
    gate = state.params["blocks"][0]["mlp"]["w_gate"][...]  # ('embed', 'mlp')
    gate_mu = state.opt_state[1][0].mu["blocks"][0]["mlp"]["w_gate"][...]  # AdamW's first moment
    assert len(gate.sharding.device_set) == 8
    # The layout each rule set promises (axes of size 1 shard nothing).
    want = (("fsdp" if fsdp > 1 else None), ("tensor" if tensor > 1 else None))
    got = tuple(_spec(gate)) + (None,) * (2 - len(_spec(gate)))
    assert got == want, (shape, gate.sharding)
    assert gate_mu.sharding.is_equivalent_to(gate.sharding, 2)  # optimizer state sharded like its param
    if tensor > 1:
        lm_head = state.params["lm_head"][...]  # ('embed', 'vocab'): vocab split over tensor
        assert lm_head.addressable_shards[0].data.shape[1] == V // tensor
    assert int(state.step) == STEPS
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=RTOL),
        state.params,
        ref,
    )
    # Three steps moved the parameters, so equality is not between two untouched inits.
    assert not np.allclose(ref["embed"][...], init["embed"][...], atol=1e-4)


def test_scanned_remat_model_on_all_three_axes_equals_single_device():
    """Scanned layers with full remat on (2, 2, 2): the per-layer 1-device run's parameters (norm scales are
    [L, D] here, so AdamW's decay mask must count them as vectors: `layer_aware_optimizer`)."""
    ref, _ = reference()
    cfg = dataclasses.replace(CFG, scan_layers=True, remat_policy="full")
    state, _ = run(dict(zip(sharding.MESH_AXES, (2, 2, 2))), cfg=cfg)
    assert state.params["blocks"]["mlp"]["w_gate"][...].shape == (2, 32, 64)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=RTOL),
                 to_unscanned(state.params), ref)


# Pure FSDP at a size where activations dominate: what each device holds must shrink with the shard count.
FSDP_CFG = TransformerConfig.llama(vocab_size=2048, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2,
                                   head_dim=32, mlp_dim=512, max_len=128, tie_embeddings=True, scan_layers=True)


def compiled_memory(mesh, *, chunk_size):
    """(state bytes, temporary bytes) per device of the compiled offline-CE step (nothing runs)."""
    rules = sharding.DEFAULT_RULES
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    spec = steps.train_state_spec(lambda r: Transformer(FSDP_CFG, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
    batch = {"tokens": jax.ShapeDtypeStruct((16, 129), jnp.int32)}
    batch_sh = sharding.batch_shardings(batch, mesh, rules)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_sh)
    loss_fn = distill.make_loss_fn(mode="offline", loss="ce", chunk_size=chunk_size)
    step = jit_constrained_step(graphdef=spec.graphdef, tx=tx, loss_fn=loss_fn, state_shardings=spec.shardings,
                                batch_shardings=batch_sh, mesh=mesh, rules=rules)
    analysis = step.lower(spec.abstract, batch, None).compile().memory_analysis()
    return analysis.argument_size_in_bytes, analysis.temp_size_in_bytes


def test_pure_fsdp_gathers_weights_and_divides_memory(capfd, no_compilation_cache):
    """(1, 8, 1): no "Involuntary full rematerialization" while XLA partitions the step (its warning goes to
    the process's stderr, file descriptor 2, which capfd captures), and per-device state + temporaries are
    at most 1/6 of the 1-device step's (issue 18's target; 1/8 is the ideal, the gathered layer's weights and
    the replicated norm scales are what remain)."""
    os.write(2, b"fd-2 capture works\n")  # a write that XLA's own logging would make the same way
    single = compiled_memory(sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), chunk_size=0)
    fsdp = compiled_memory(sharding.make_mesh({"fsdp": 8}), chunk_size=0)
    fsdp_chunked = compiled_memory(sharding.make_mesh({"fsdp": 8}), chunk_size=512)
    log = capfd.readouterr().err
    assert "fd-2 capture works" in log
    assert "Involuntary full rematerialization" not in log
    assert sum(fsdp) <= sum(single) / 6, (fsdp, single)
    assert sum(fsdp_chunked) <= sum(single) / 6, (fsdp_chunked, single)
    assert fsdp[0] <= single[0] / 7  # the state itself: all but the norm scales split 8 ways


def test_memory_table_counts_bytes_per_device():
    """benchmarks/scaling_memory.py's computed columns: exact bytes of each device's shards."""
    from benchmarks import scaling_memory  # pylint: disable=g-import-not-at-top

    for _, shape in scaling_memory.meshes(8):
        assert np.prod(list(shape.values())) == 8
    params = CFG.num_params()
    replicated, _, _ = scaling_memory.model_state(CFG, sharding.make_mesh({"data": 8}), with_optimizer=True)
    # float32 params + two float32 AdamW moments, plus a few scalars (step, counts, the RNG key).
    assert 12 * params <= replicated <= 12 * params + 64
    fsdp, _, _ = scaling_memory.model_state(CFG, sharding.make_mesh({"fsdp": 8}), with_optimizer=True)
    # Every parameter has an 'embed' dimension (32, divisible by 8): all but the scalars split 8 ways.
    assert fsdp <= replicated / 8 + 64
    only_params, _, _ = scaling_memory.model_state(CFG, sharding.make_mesh({"data": 8}), with_optimizer=False)
    assert only_params == 4 * params
