"""Scanned layers, remat and activation sharding: compile time, step temporaries and FSDP memory scaling.

  .venv/bin/python -m benchmarks.scan_remat [--json out.json]      (sets 8 fake CPU devices for itself)

Three measurements of `steps.train_step` with `steps.lm_loss` (CE; the models are llama-shaped, d 256), all by
compiling from abstract inputs (nothing runs):

  compile:  seconds to lower + compile the step for 24 layers, unscanned (a Python loop: one copy of the block
            per layer in the program) vs scanned (`scan_layers=True`: one block under lax.scan).  Issue 18's
            target: scanned >= 4x faster.  Each is compiled `repeats` times (a fresh config each time, so no
            cache hit) and the median reported with the 1-minute load average.
  remat:    XLA's `memory_analysis()` temporaries of the 8-layer step under each `remat_policy`.  Target: "full"
            cuts them >= 2x against "none".
  fsdp:     per-device arguments (params + AdamW state + batch) + temporaries of the scanned step on a
            (1, 8, 1) pure-FSDP mesh with activation constraints, against the same step on 1 device, and
            whether XLA logged "Involuntary full rematerialization" while partitioning (captured from file
            descriptor 2).  Target: <= 1/6 of the 1-device figure, no involuntary rematerialisation.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __name__ == "__main__":  # before jax starts: 8 fake devices for the FSDP mesh
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kdjax import sharding, steps  # noqa: E402
from kdjax.models.transformer import REMAT_POLICIES, Transformer, TransformerConfig  # noqa: E402

MIB = 2**20
INVOLUNTARY = "Involuntary full rematerialization"


def model_config(layers, *, scan, remat="none", dim=256, vocab=4096, seq_len=256, salt=0):
    """A llama-shaped model; `salt` (an unused rope_theta offset) makes each config a new compilation."""
    return TransformerConfig.llama(vocab_size=vocab, num_layers=layers, embed_dim=dim, num_heads=dim // 64,
                                   num_kv_heads=max(dim // 128, 1), head_dim=64, mlp_dim=4 * dim, max_len=seq_len,
                                   scan_layers=scan, remat_policy=remat, tie_embeddings=True,
                                   rope_theta=10000.0 + salt)


def lower_step(cfg, mesh, *, batch=8, constrain=True):
    """The jitted CE train step lowered from abstract, sharded inputs."""
    rules = sharding.DEFAULT_RULES
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    spec = steps.train_state_spec(lambda r: Transformer(cfg, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
    tokens = jax.ShapeDtypeStruct((batch, cfg.max_len + 1), jnp.int32)
    batch_sh = sharding.batch_shardings({"tokens": tokens}, mesh, rules)
    example = {"tokens": jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=batch_sh["tokens"])}
    fn = functools.partial(steps.train_step, graphdef=spec.graphdef, tx=tx, loss_fn=steps.lm_loss)
    if constrain:
        fn = sharding.with_activation_sharding(fn, mesh, rules)
    step = jax.jit(fn, in_shardings=(spec.shardings, batch_sh, None),
                   out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
    return step.lower(spec.abstract, example, None)


def one_device():
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def compile_seconds(layers, *, scan, salt):
    start = time.perf_counter()
    lower_step(model_config(layers, scan=scan, salt=salt), one_device()).compile()
    return time.perf_counter() - start


def compile_times(*, layers=24, repeats=3):
    out = {"layers": layers, "repeats": repeats, "load_before": os.getloadavg()[0]}
    for scan in (False, True):
        out["scanned" if scan else "unscanned"] = [compile_seconds(layers, scan=scan, salt=100 * scan + i)
                                                  for i in range(repeats)]
    out["load_after"] = os.getloadavg()[0]
    out["speedup"] = statistics.median(out["unscanned"]) / statistics.median(out["scanned"])
    return out


def remat_temporaries(*, layers=8, scan=True):
    out = {"layers": layers, "scanned": scan}
    for policy in REMAT_POLICIES:
        try:
            analysis = lower_step(model_config(layers, scan=scan, remat=policy), one_device()).compile().memory_analysis()
            out[policy] = analysis.temp_size_in_bytes
        except ValueError as e:  # "offload" on a backend without pinned host memory
            out[policy] = str(e)
    out["full_cut"] = out["none"] / out["full"]
    return out


def _captured_stderr(fn):
    """(fn(), what was written to file descriptor 2 meanwhile): XLA's C++ warnings go there, not to Python."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return result, f.read().decode(errors="replace")


def fsdp_scaling(*, layers=4, batch=16, devices=8):
    """Per-device bytes of the scanned step on 1 device vs a pure-FSDP mesh, with and without constraints."""
    cfg = model_config(layers, scan=True, dim=128, vocab=2048, seq_len=128)
    out = {"layers": layers, "batch": batch, "devices": devices}
    meshes = {"1 device": (one_device(), True), "fsdp": (sharding.make_mesh({"fsdp": devices}), True),
              "fsdp, no activation constraints": (sharding.make_mesh({"fsdp": devices}), False)}
    for name, (mesh, constrain) in meshes.items():
        analysis, log = _captured_stderr(
            lambda m=mesh, c=constrain: lower_step(cfg, m, batch=batch, constrain=c).compile().memory_analysis())
        out[name] = dict(arguments=analysis.argument_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
                         involuntary=log.count(INVOLUNTARY))
    total = lambda r: r["arguments"] + r["temporaries"]
    out["fraction"] = total(out["fsdp"]) / total(out["1 device"])
    return out


def markdown(r):
    c, m, f = r["compile"], r["remat"], r["fsdp"]
    med = lambda xs: statistics.median(xs)
    lines = [
        f"Compile time of the CE train step, {c['layers']} layers (d 256, V 4096, T 256; median of {c['repeats']} "
        f"fresh compiles each; 1-minute load average {c['load_before']:.1f} before, {c['load_after']:.1f} after):",
        "",
        "| layers | unscanned s | scanned s | speedup | target >= 4x |",
        "|---:|---:|---:|---:|---|",
        f"| {c['layers']} | {med(c['unscanned']):.1f} | {med(c['scanned']):.1f} | **{c['speedup']:.1f}x** | "
        + ("met" if c["speedup"] >= 4 else f"missed by {4 / c['speedup']:.2f}x") + " |",
        "",
        f"Step temporaries by `remat_policy`, {m['layers']} scanned layers (XLA:CPU `memory_analysis()`, MiB):",
        "",
        "| " + " | ".join(REMAT_POLICIES) + " | none / full | target >= 2x |",
        "|" + "---:|" * (len(REMAT_POLICIES) + 1) + "---|",
        "| " + " | ".join(f"{m[p] / MIB:.1f}" if isinstance(m[p], int) else "n/a" for p in REMAT_POLICIES)
        + f" | **{m['full_cut']:.2f}x** | " + ("met" if m["full_cut"] >= 2 else f"missed by {2 / m['full_cut']:.2f}x")
        + " |",
        "",
        f"Pure FSDP on {f['devices']} devices vs 1 device ({f['layers']} scanned layers, d 128, V 2048, T 128, batch "
        f"{f['batch']}; per device, MiB):",
        "",
        "| mesh | params + AdamW + batch | temporaries | total | involuntary rematerialisations logged |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("1 device", "fsdp", "fsdp, no activation constraints"):
        x = f[name]
        lines.append(f"| {name} | {x['arguments'] / MIB:.2f} | {x['temporaries'] / MIB:.2f} | "
                     f"{(x['arguments'] + x['temporaries']) / MIB:.2f} | {x['involuntary']} |")
    verdict = "met" if f["fraction"] <= 1 / 6 and f["fsdp"]["involuntary"] == 0 else "missed"
    lines += ["", f"FSDP / 1 device (with constraints): **{f['fraction']:.3f}** (target <= 1/6 = 0.167 and no "
              f"involuntary rematerialisation: {verdict})."]
    return "\n".join(lines)


def run(*, compile_layers=24, compile_repeats=3, remat_layers=8):
    return {"compile": compile_times(layers=compile_layers, repeats=compile_repeats),
            "remat": remat_temporaries(layers=remat_layers), "fsdp": fsdp_scaling()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile_layers", type=int, default=24)
    parser.add_argument("--compile_repeats", type=int, default=3)
    parser.add_argument("--remat_layers", type=int, default=8)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: run as `python -m benchmarks.scan_remat` (it sets them) or with XLA_FLAGS")
    r = run(compile_layers=args.compile_layers, compile_repeats=args.compile_repeats, remat_layers=args.remat_layers)
    print(markdown(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
