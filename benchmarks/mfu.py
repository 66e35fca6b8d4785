"""Model FLOPs utilisation of the online KD step against a matmul peak measured in the same process.

  .venv/bin/python -m benchmarks.mfu [--size cpu|issue] [--matmul_n N]

Peak: a jitted float32 [N, N] @ [N, N] matmul (2·N^3 FLOPs), the best a dense kernel of this backend reaches
here and now, so the fraction is relative to what this machine delivers under its current load, not to a
datasheet number.  Step: kdjax's online KD step of `benchmarks.step_vs_pytorch` (teacher forward, student
forward + backward, JSD, AdamW), its model FLOPs from `step_vs_pytorch.step_flops`:

  6·N_s·tokens + 12·L_s·T·D_s·tokens  (student forward + backward)  +  2·N_t·tokens + 4·L_t·T·D_t·tokens  (teacher)

The two are timed alternately and each reports its median.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import step_vs_pytorch as svp


def run(size, *, matmul_n=2048, warmup=2, iters=6, seed=0):
    kd = svp.make_kdjax(size, mode="online", total_steps=warmup + iters + 2, seed=seed)
    tokens = np.random.RandomState(seed).randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1))
    batch = kd["batch_for"](tokens.astype(np.int32))
    state = kd["state"]
    matmul = jax.jit(lambda a, b: a @ b)
    a = jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.float32)
    mm_times, step_times = [], []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        t1 = time.perf_counter()
        state, metrics = kd["step"](state, batch, kd["frozen"])
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        if i >= warmup:
            mm_times.append(t1 - t0)
            step_times.append(t2 - t1)
    peak = 2 * matmul_n**3 / float(np.median(mm_times))
    flops = svp.step_flops(size)
    step_s = float(np.median(step_times))
    return dict(
        matmul_n=matmul_n,
        peak=peak,
        step_flops=flops,
        step_s=step_s,
        achieved=flops / step_s,
        mfu=flops / step_s / peak,
        tokens_per_s=size["batch"] * size["seq_len"] / step_s,
        iters=iters,
    )


def markdown(size, r):
    verdict = "met" if r["mfu"] >= 0.7 else f"missed by {70 - 100 * r['mfu']:.0f} points ({0.7 / r['mfu']:.1f}x short)"
    return "\n".join(
        [
            f"Config: {svp.describe(size)}. Medians of {r['iters']} alternating runs.",
            "",
            "| measurement | value |",
            "|---|---:|",
            f"| matmul peak (jitted fp32 {r['matmul_n']}x{r['matmul_n']} @ {r['matmul_n']}x{r['matmul_n']}) | "
            f"{r['peak'] / 1e9:.1f} GFLOP/s |",
            f"| online KD step: model FLOPs per step | {r['step_flops'] / 1e9:.2f} GFLOP |",
            f"| online KD step: median time | {1e3 * r['step_s']:.1f} ms ({r['tokens_per_s']:,.0f} tokens/s) |",
            f"| online KD step: model FLOP/s | {r['achieved'] / 1e9:.1f} GFLOP/s |",
            f"| **fraction of the matmul peak** | **{100 * r['mfu']:.1f}%** (target >= 70%: {verdict}) |",
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svp.add_size_args(parser)
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    args = parser.parse_args()
    size = svp.resolve_size(args)
    r = run(size, matmul_n=args.matmul_n, warmup=args.warmup, iters=args.iters)
    print(markdown(size, r))
    return size, r


if __name__ == "__main__":
    main()
