"""Where the online KD step's time goes: the step against its parts, timed in alternation.

  .venv/bin/python -m benchmarks.online_profile [--size cpu] [--repeats 6]

Issue 18 measured the online step ~300 ms slower than "offline step + teacher forward + dense-JSD gradient"
timed alone.  This times, interleaved (one of each in turn per repeat, medians reported with [min, max] and
the load average), on `benchmarks.step_vs_pytorch`'s models:

  online              the benchmark's online KD step (teacher forward in the step, dense JSD, AdamW)
  online_logits_in    the same step with the teacher's logits given in the batch (no teacher network)
  student_ce          the step with loss "ce" (student forward + backward, CE, AdamW; teacher unused)
  online_fused        the online step through the fused chunked head (`loss_chunk_size`)
  teacher_fwd         the teacher's forward alone
  jsd_grad            value and gradient of the dense JSD on [B, T, V] logits alone
  ce_grad             value and gradient of `losses.cross_entropy` alone (log_softmax, then a gather)
  ce_grad_lse         the same value as logsumexp(z) - z[label]: no [B, T, V] log-softmax kept, no
                      gradient through a gathered log-probability

so that online - online_logits_in is the in-step teacher's cost (compare teacher_fwd), online_logits_in -
student_ce the dense JSD's (compare jsd_grad), and ce_grad vs ce_grad_lse what the CE's formulation costs.
"""

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import step_vs_pytorch as svp
from kdjax import distill, losses, steps


def _keep_logits(student, batch, rng, frozen, spec):
    """The online mode's batch builder, keeping the batch's `teacher_logits` for the signal below."""
    out, aux = distill.MODES["online"].build(student, batch, rng, frozen, spec)
    return {**out, "teacher_logits": batch["teacher_logits"]}, aux


LOGITS_IN = distill.Mode(_keep_logits, lambda teacher, batch, inputs: batch["teacher_logits"])


def _step_runner(kd, loss_fn, batch, frozen):
    step = jax.jit(functools.partial(steps.train_step, graphdef=kd["graphdef"], tx=kd["tx"], loss_fn=loss_fn),
                   donate_argnums=0)
    box = [jax.tree.map(jnp.copy, kd["state"])]

    def run():
        box[0], metrics = step(box[0], batch, frozen)
        jax.block_until_ready(metrics)

    return run


def runners(size, *, chunk_size=256, seed=0):
    kd = svp.make_kdjax(size, mode="online", total_steps=1000, seed=seed)
    kd["tx"] = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=1000)
    tokens = np.random.RandomState(seed).randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1))
    batch = kd["batch_for"](tokens.astype(np.int32))
    tg, tp = kd["teacher_graphdef"], kd["teacher_params"]
    teacher_fwd = jax.jit(lambda p, x: nnx.merge(tg, p)(x[:, :-1]))
    t_logits = teacher_fwd(tp, batch["tokens"])
    s_logits = jax.random.normal(jax.random.key(seed), t_logits.shape)
    labels, mask = batch["tokens"][:, 1:], jnp.ones(t_logits.shape[:2])
    jsd = functools.partial(distill.make_loss_fn, loss="jsd", hparams={"beta": svp.BETA}, teacher_graphdef=tg)
    jsd_grad = jax.jit(jax.value_and_grad(lambda s, t: losses.LOSSES["jsd"](s, t, mask, beta=svp.BETA)[0]))
    ce_grad = jax.jit(jax.value_and_grad(lambda s: losses.cross_entropy(s, labels, mask)[0]))

    def ce_lse(s):
        label_z = jnp.take_along_axis(s, labels[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(s, axis=-1) - label_z) * mask)

    ce_lse_grad = jax.jit(jax.value_and_grad(ce_lse))
    return {
        "online": _step_runner(kd, jsd(mode="online"), batch, tp),
        "online_logits_in": _step_runner(kd, jsd(mode=LOGITS_IN), {**batch, "teacher_logits": t_logits}, tp),
        "student_ce": _step_runner(kd, distill.make_loss_fn(mode="online", loss="ce", teacher_graphdef=tg), batch, tp),
        "online_fused": _step_runner(kd, jsd(mode="online", chunk_size=chunk_size), batch, tp),
        "teacher_fwd": lambda: jax.block_until_ready(teacher_fwd(tp, batch["tokens"])),
        "jsd_grad": lambda: jax.block_until_ready(jsd_grad(s_logits, t_logits)),
        "ce_grad": lambda: jax.block_until_ready(ce_grad(s_logits)),
        "ce_grad_lse": lambda: jax.block_until_ready(ce_lse_grad(s_logits)),
    }


def run(size, *, repeats=6, chunk_size=256):
    fns = runners(size, chunk_size=chunk_size)
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    load_before = os.getloadavg()[0]
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return dict(seconds=seconds, repeats=repeats, chunk_size=chunk_size, load=(load_before, os.getloadavg()[0]))


def markdown(size, r):
    ms = {k: 1e3 * statistics.median(v) for k, v in r["seconds"].items()}
    lines = [
        f"Config: {svp.describe(size)}; medians of {r['repeats']} interleaved repeats, ms [min, max]; 1-minute load "
        f"average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after.",
        "",
        "| what | ms | [min, max] |",
        "|---|---:|---|",
    ]
    for name, v in r["seconds"].items():
        lines.append(f"| {name} | {ms[name]:.0f} | [{1e3 * min(v):.0f}, {1e3 * max(v):.0f}] |")
    lines += [
        "",
        f"- Teacher in the step: online - online_logits_in = {ms['online'] - ms['online_logits_in']:.0f} ms against "
        f"{ms['teacher_fwd']:.0f} ms alone.",
        f"- Dense JSD in the step: online_logits_in - student_ce = {ms['online_logits_in'] - ms['student_ce']:.0f} ms "
        f"against {ms['jsd_grad']:.0f} ms alone.",
        f"- Cross-entropy formulation: {ms['ce_grad']:.0f} ms (log-softmax, gather) vs {ms['ce_grad_lse']:.0f} ms "
        "(logsumexp - gathered logit), the same value and gradient.",
        f"- Fused head (chunk {r['chunk_size']}): {ms['online_fused']:.0f} ms vs {ms['online']:.0f} ms unfused.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svp.add_size_args(parser)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--chunk_size", type=int, default=256)
    args = parser.parse_args()
    size = svp.resolve_size(args)
    r = run(size, repeats=args.repeats, chunk_size=args.chunk_size)
    print(markdown(size, r))
    return r


if __name__ == "__main__":
    main()
