"""One step implementation on every mesh: data, fsdp and tensor parallel runs equal the 1-device run.

The mesh shape alone selects the parallelism: with `sharding.DEFAULT_RULES` a mesh axis of size 1 shards
nothing, so (8,1,1) is pure data parallelism (replicated params), (2,4,1) data x FSDP (params and optimizer
state sharded on `embed`), (2,2,2) all three, and (1,1,8) pure tensor parallelism (heads / mlp / vocab split,
batch replicated).
"""

import functools

import jax
import numpy as np
import pytest

from kdjax import loop, sharding, steps
from kdjax.models.transformer import Transformer, TransformerConfig

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


def run(mesh_shape, *, devices=None):
    """Final train state after STEPS steps on `mesh_shape`, plus the host copy of the initial params."""
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    rules = sharding.DEFAULT_RULES
    tx = steps.make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10)
    graphdef, state, shardings = steps.init_train_state(
        lambda rngs: Transformer(CFG, rngs=rngs), tx, seed=0, mesh=mesh, rules=rules
    )
    data = batches(STEPS)
    batch_sh = sharding.batch_shardings(data[0], mesh, rules)
    step = steps.jit_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=steps.lm_loss,
        state_shardings=shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
    )
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
def test_mesh_equals_single_device(shape):
    mesh_shape = dict(zip(sharding.MESH_AXES, shape))
    ref, init = reference()
    state, _ = run(mesh_shape)
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
