"""Per-device memory of distilling a ~1B student from an ~8B teacher, under each mesh / rule set.

  .venv/bin/python -m benchmarks.scaling_memory [--devices 64] [--compile] [--write docs/scaling.md]

Everything is abstract: shapes come from `jax.eval_shape` and shardings from `kdjax.sharding`'s rules on a
mesh of fake CPU devices, so no 8B array is ever allocated.  Two kinds of numbers:

  computed (exact)  bytes per device of the student's params + AdamW state and of the teacher's params, from
                    each leaf's shard shape under the rules (what `train_state_spec` would allocate);
  compiled (XLA)    with --compile, the offline distillation train step (student fwd/bwd + top-k KD loss
                    from the store, the state donated) is lowered with abstract inputs and compiled for the
                    fake mesh; XLA's `memory_analysis()` gives its temporaries (activations, gradients,
                    logits).  XLA:CPU's buffer assignment, not a TPU's: the TPU compiler fuses and
                    rematerialises differently, so read these as an estimate of the TPU number.

The table goes between the markers for its device count in --write (docs/scaling.md).
"""

import argparse
import functools
import math
import os
import re
import sys
import time


def _set_devices(argv):
    # XLA reads the fake-device count once, when the CPU backend starts: before `import jax`.
    n = 64
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            n = int(a.split("=", 1)[1])
        elif a == "--devices" and i + 1 < len(argv):
            n = int(argv[i + 1])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _set_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kdjax import distill, sharding, steps  # noqa: E402
from kdjax.models.transformer import Transformer, TransformerConfig  # noqa: E402

# The section of --write that holds the table for N devices (one section per device count).
MARKERS = "<!-- BEGIN scaling_memory {n} -->", "<!-- END scaling_memory {n} -->"
GIB = 2.0**30

# Llama-3.2-1B-like student and Llama-3.1-8B-like teacher (public shapes; 128k vocabulary shared).
STUDENT = dict(
    vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
    mlp_dim=8192, tie_embeddings=True,
)
TEACHER = dict(
    vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
    mlp_dim=14336, tie_embeddings=False,
)


def meshes(n):
    """(rule set, mesh shape) pairs for n devices.  Under DEFAULT_RULES a mesh axis of size 1 shards nothing,
    so the mesh shape alone selects the rule set: data parallel, FSDP, FSDP + tensor parallel, all three."""
    tp = 4 if n >= 64 else 2
    shapes = [
        ("data", {"data": n}),
        ("fsdp", {"fsdp": n}),
        ("fsdp + tensor", {"fsdp": n // tp, "tensor": tp}),
        ("data + fsdp + tensor", {"data": 2, "fsdp": n // (2 * tp), "tensor": tp}),
        ("fsdp + tensor", {"fsdp": n // 8, "tensor": 8}) if n > 8 else ("tensor", {"tensor": n}),
    ]
    return [(name, shape) for name, shape in shapes if math.prod(shape.values()) == n and min(shape.values())]


def per_device_bytes(abstract_tree, shardings_tree):
    """Largest per-device byte count of a tree of ShapeDtypeStructs under a prefix tree of shardings."""
    total = {}

    def add(sh, sub):
        for leaf in jax.tree.leaves(sub):
            shard = sh.shard_shape(leaf.shape)
            nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
            # Every device holds one shard per leaf (replicated leaves: the whole leaf).
            for d in sh.mesh.devices.flat:
                total[d.id] = total.get(d.id, 0) + nbytes

    jax.tree.map(add, shardings_tree, abstract_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return max(total.values())


def model_state(cfg, mesh, *, with_optimizer, steps_total=1000):
    """(per-device bytes, spec) of a train state (params + AdamW) or of params alone, from eval_shape."""
    tx = steps.make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=steps_total)
    spec = steps.train_state_spec(
        lambda rngs: Transformer(cfg, rngs=rngs), tx, seed=0, mesh=mesh, rules=sharding.DEFAULT_RULES
    )
    if with_optimizer:
        return per_device_bytes(spec.abstract, spec.shardings), spec, tx
    return per_device_bytes(spec.abstract.params, spec.shardings.params), spec, tx


def compile_offline_step(spec, tx, mesh, *, batch, seq_len, k, chunk_size=0, constrain=True):
    """XLA memory analysis of the offline KD train step (fkl on the store's top-k), abstract inputs only,
    traced with the activation constraints (`sharding.with_activation_sharding`) unless `constrain` is off."""
    rules = sharding.DEFAULT_RULES
    example = {
        "tokens": jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32),
        "teacher_ids": jax.ShapeDtypeStruct((batch, seq_len, k), jnp.int32),
        "teacher_logprobs": jax.ShapeDtypeStruct((batch, seq_len, k), jnp.bfloat16),
        "teacher_label_logprob": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32),
        "teacher_tail_logprob": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32),
    }
    batch_sh = sharding.batch_shardings(example, mesh, rules)
    batch_abs = {
        name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh[name]) for name, x in example.items()
    }
    fn = functools.partial(steps.train_step, graphdef=spec.graphdef, tx=tx,
                           loss_fn=distill.make_loss_fn(mode="offline", loss="fkl", chunk_size=chunk_size))
    if constrain:
        fn = sharding.with_activation_sharding(fn, mesh, rules)
    step = jax.jit(fn, in_shardings=(spec.shardings, batch_sh, None),
                   out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(spec.abstract, batch_abs, None).compile()
    return compiled.memory_analysis(), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=64, help="fake CPU devices (one mesh over all)")
    parser.add_argument("--compile", action="store_true", help="also compile the offline step (slow on CPU)")
    parser.add_argument("--batch", type=int, default=0, help="global batch of sequences (0 = devices)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32, help="teacher-store top-k")
    parser.add_argument("--dtype", default="bfloat16", help="student compute dtype (params stay float32)")
    parser.add_argument("--write", default="", help="markdown file whose marked section gets the table")
    parser.add_argument("--scan_layers", type=int, default=1, help="1: scanned layers (one compiled block)")
    parser.add_argument("--remat_policy", default="full", help="the student's remat_policy")
    parser.add_argument("--chunk_size", type=int, default=2048, help="fused head tokens per chunk (0 = unfused)")
    parser.add_argument("--no_constraints", action="store_true", help="trace without activation constraints")
    args = parser.parse_args()
    n = jax.device_count()
    batch = args.batch or n
    student = TransformerConfig.llama(
        **STUDENT, max_len=args.seq_len, param_dtype="float32", dtype=args.dtype, scan_layers=bool(args.scan_layers),
        remat_policy=args.remat_policy,
    )
    teacher = TransformerConfig.llama(
        **TEACHER, max_len=args.seq_len, param_dtype="bfloat16", dtype="bfloat16"
    )
    ns, nt = student.num_params(), teacher.num_params()
    lines = [
        f"{n} devices; student {ns / 1e9:.2f}B params (float32 params + AdamW moments, "
        f"compute {args.dtype}); "
        f"teacher {nt / 1e9:.2f}B params (bfloat16, frozen). GiB per device, the most loaded device.",
        "",
        "| mesh (data, fsdp, tensor) | rule set | student params + AdamW (computed) | teacher params, online "
        "modes (computed) | offline step temporaries, XLA:CPU (compiled) | offline step total (compiled) |",
        "|---|---|---|---|---|---|",
    ]
    for name, shape in meshes(n):
        mesh = sharding.make_mesh(shape)
        state_b, spec, tx = model_state(student, mesh, with_optimizer=True)
        teacher_b, _, _ = model_state(teacher, mesh, with_optimizer=False)
        temp, total = "not compiled", "not compiled"
        if args.compile:
            mem, secs = compile_offline_step(spec, tx, mesh, batch=batch, seq_len=args.seq_len, k=args.k,
                                             chunk_size=args.chunk_size, constrain=not args.no_constraints)
            temp = f"{mem.temp_size_in_bytes / GIB:.2f}"
            peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            peak -= mem.alias_size_in_bytes  # the donated state is updated in place
            total = f"{peak / GIB:.2f}"
            print(f"{name}: compiled in {secs:.0f}s", file=sys.stderr)
        dims = tuple(dict(mesh.shape).values())
        lines.append(f"| {dims} | {name} | {state_b / GIB:.2f} | {teacher_b / GIB:.2f} | {temp} | {total} |")
    lines += [
        "",
        f"Offline step: global batch {batch} x {args.seq_len} tokens, store top-k {args.k}; scanned layers "
        f"{bool(args.scan_layers)}, remat {args.remat_policy!r}, fused head chunk {args.chunk_size or 'off'}, "
        f"activation constraints {'off' if args.no_constraints else 'on'}. "
        "Generated by `python -m benchmarks.scaling_memory "
        + " ".join(a for a in sys.argv[1:] if not a.startswith("--write") and not a.endswith(".md"))
        + "`.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        begin, end = (m.format(n=n) for m in MARKERS)
        with open(args.write) as f:
            text = f.read()
        if begin not in text or end not in text:
            raise ValueError(f"{args.write} has no {begin} ... {end} section")
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{table}\n{end}", text,
                      flags=re.S)
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
