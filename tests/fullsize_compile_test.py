"""A Llama-3-8B-shaped student's offline and online KD train steps compile for a 2 x 4 mesh and fit a budget.

Nothing is allocated and nothing runs: the state, batch and teacher are `jax.ShapeDtypeStruct`s carrying their
shardings, the step is `jit(...).lower(...).compile()`d for the 8 fake CPU devices, and XLA's
`memory_analysis()` of the partitioned program gives each device's bytes.  The configuration is the one a
user would train with: scanned layers (compile time independent of depth), `full` remat, bfloat16 compute
with float32 params and AdamW moments, the fused chunked head (`loss_chunk_size` 4096) and the activation
constraints, on a mesh of fsdp 2 x tensor 4 (every parameter split 8 ways: embed over fsdp, heads / MLP /
vocabulary over tensor).

Budget: 32 GiB per device.  The state alone is 12 bytes x 8.03B params / 8 = 11.2 GiB; docs/scaling.md
(section 8) has the measured breakdown and what fits on a v5e-8, a v5p-8 and 8 x H100.  XLA:CPU's numbers are an
estimate of a TPU's or GPU's (its bfloat16 dots run in float32, its buffer assignment differs).
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distill, pretrained, sharding, steps
from kdjax.models.transformer import Transformer, TransformerConfig

GIB = 2**30
BUDGET_GIB = 32.0
T, BATCH, TOPK, CHUNK = 2048, 8, 32, 4096
LLAMA3_8B = dict(vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 mlp_dim=14336, max_len=T, rope_theta=500000.0, scan_layers=True)
MESH = {"data": 1, "fsdp": 2, "tensor": 4}


def abstract_batch(mode, mesh, rules):
    batch = {"tokens": jax.ShapeDtypeStruct((BATCH, T + 1), jnp.int32)}
    if mode == "offline":
        batch.update(teacher_ids=jax.ShapeDtypeStruct((BATCH, T, TOPK), jnp.int32),
                     teacher_logprobs=jax.ShapeDtypeStruct((BATCH, T, TOPK), jnp.bfloat16),
                     teacher_tail_logprob=jax.ShapeDtypeStruct((BATCH, T), jnp.float32))
    batch_sh = sharding.batch_shardings(batch, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_sh), batch_sh


def compile_step(mode):
    """(memory_analysis, seconds to lower + compile, per-device bytes of the state and teacher by shapes)."""
    mesh, rules = sharding.make_mesh(MESH), sharding.DEFAULT_RULES
    student = TransformerConfig.llama(**LLAMA3_8B, param_dtype="float32", dtype="bfloat16", remat_policy="full")
    tx = steps.make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
    spec = steps.train_state_spec(lambda r: Transformer(student, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
    batch, batch_sh = abstract_batch(mode, mesh, rules)
    teacher, teacher_sh, teacher_graphdef = None, None, None
    if mode == "online":  # an 8B-shaped teacher in bfloat16, its params passed as `frozen`
        teacher_cfg = TransformerConfig.llama(**LLAMA3_8B, param_dtype="bfloat16", dtype="bfloat16")
        teacher_graphdef, teacher, teacher_sh = pretrained.abstract_model(teacher_cfg, mesh, rules)
        loss_fn = distill.make_loss_fn(mode="online", loss="jsd", hparams={"beta": 0.5},
                                       teacher_graphdef=teacher_graphdef, chunk_size=CHUNK)
    else:
        loss_fn = distill.make_loss_fn(mode="offline", loss="fkl", chunk_size=CHUNK)
    fn = functools.partial(steps.train_step, graphdef=spec.graphdef, tx=tx, loss_fn=loss_fn)
    step = jax.jit(sharding.with_activation_sharding(fn, mesh, rules), in_shardings=(spec.shardings, batch_sh, teacher_sh),
                   out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    analysis = step.lower(spec.abstract, batch, teacher).compile().memory_analysis()
    seconds = time.perf_counter() - start
    expected = shard_bytes(spec.abstract) + shard_bytes(batch) + (0 if teacher is None else shard_bytes(teacher))
    return analysis, seconds, expected, shard_bytes(spec.abstract)


def shard_bytes(abstract_tree):
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (all shardings here are even)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(abstract_tree))


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_llama3_8b_student_step_compiles_within_the_budget(mode, capfd, no_compilation_cache):
    analysis, seconds, expected_args, state_bytes = compile_step(mode)
    args, temp = analysis.argument_size_in_bytes, analysis.temp_size_in_bytes
    peak = args + analysis.output_size_in_bytes - analysis.alias_size_in_bytes + temp
    print(f"{mode}: compiled in {seconds:.0f}s; per device: arguments {args / GIB:.2f} GiB, temporaries "
          f"{temp / GIB:.2f} GiB, peak {peak / GIB:.2f} GiB (budget {BUDGET_GIB})")
    # The arguments are exactly each device's shards: the state split 8 ways (12 bytes per parameter), the
    # batch split over fsdp, the teacher's bfloat16 params split 8 ways.
    assert args == expected_args
    assert 8 * state_bytes <= 1.01 * 12 * TransformerConfig.llama(**LLAMA3_8B).num_params()
    # The donated state is updated in place: the outputs alias it.
    assert analysis.alias_size_in_bytes == state_bytes
    assert peak <= BUDGET_GIB * GIB
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
