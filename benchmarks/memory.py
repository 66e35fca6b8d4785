"""Compiled memory of the train step: CE-only vs dense-teacher KD vs top-k KD, unfused and chunked
(`kdjax.fused_head`), as the vocabulary grows; and the chunked steps' throughput beside the unfused ones.

  .venv/bin/python -m benchmarks.memory [--vocabs 8192,32768,131072] [--seq_lens 128,512] [--chunk_size 256]
  .venv/bin/python -m benchmarks.memory --time_vocab 8192 [--repeats 5]    # throughput, chunked vs unfused

Nothing runs and nothing is allocated: each step is lowered from abstract inputs (`jax.ShapeDtypeStruct`s
carrying their shardings, on a 1-device mesh) and compiled, and XLA's `compiled.memory_analysis()` reports
the buffers it planned.  Steps (all `steps.jit_train_step`, state donated):

  ce:      `steps.lm_loss`, the student alone.
  dense:   online KD, `distill.make_loss_fn(mode="online", loss="jsd")`: the teacher runs in the step, and its
           [B, T, V] logits meet the student's in the dense JSD.
  topk:    offline KD, `mode="offline"`, k = 64: the batch carries the store's [B, T, k] targets.
  *_chunked: the same three objectives through `kdjax.fused_head.fused_loss` (chunk_size tokens per chunk):
           the model runs up to its final norm, and the head + loss never hold a [B, T, V] array.

The model is deliberately tiny (2 layers x 256 for student and teacher) so that the [B, T, V] terms dominate.
Peak estimate = arguments + outputs - aliased (donated) + temporaries.
Targets (issue 18): at V = 131k, T = 512 the chunked dense KD step's peak <= 0.35x the unfused CE step's, the
chunked top-k step's <= 1.05x the chunked CE step's; at V = 8k the chunked steps run at >= 0.9x the unfused
steps' speed (`--time_vocab`: real steps, interleaved repeats, load average and thread settings reported).
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import distill, fused_head, sharding, steps
from kdjax.models.transformer import Transformer, TransformerConfig

UNFUSED = ("ce", "dense", "topk")
KINDS = UNFUSED + tuple(f"{kind}_chunked" for kind in UNFUSED)
MIB = 2**20
CHUNK_SIZE = 256


def model_config(vocab, seq_len, layers, dim):
    return TransformerConfig.gpt2(
        vocab_size=vocab, num_layers=layers, embed_dim=dim, num_heads=dim // 64 or 1,
        head_dim=min(dim, 64), mlp_dim=4 * dim, max_len=seq_len,
    )


def final_hidden(model, tokens_bt):
    """The student's final normed hidden states [B, T, D]: what `Transformer._logits` multiplies by the head.

    The forward's own logits are unused here, so XLA removes their matmul (dead code) under jit.
    """
    _, hidden = model(tokens_bt, return_hidden=True)
    return model.final_norm(hidden[-1])


def unembedding(model):
    """The model's head as a `fused_head.Head`: `lm_head` [D, V], or the tied `embed` table [V, D] as it is."""
    dtype = jnp.dtype(model.cfg.dtype)
    if model.lm_head is None:
        return fused_head.Head(model.embed[...].astype(dtype), layout="vd")
    return fused_head.Head(model.lm_head[...].astype(dtype))


def chunked_loss_fn(*, mode, loss, chunk_size, hparams=None, tail="bucket", teacher_graphdef=None):
    """`loss_fn(model, batch, rng, frozen, extra)` for `steps.train_step` on the fused head: what
    `distill.make_loss_fn(mode, loss, ce_alpha=0)` computes for mode "online" / "offline" (and loss "ce")."""

    def loss_fn(model, batch, rng, frozen, extra):
        del rng, extra
        inputs, labels = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
        teacher = None
        if loss != "ce" and mode == "online":
            t_model = nnx.merge(teacher_graphdef, frozen)
            teacher = fused_head.DenseTeacher(final_hidden(t_model, inputs), unembedding(t_model))
            teacher = jax.lax.stop_gradient(teacher)
        elif loss != "ce":
            teacher = fused_head.TopkTeacher(batch["teacher_logprobs"], batch["teacher_ids"],
                                             batch.get("teacher_tail_logprob"))
        out = fused_head.fused_loss(
            final_hidden(model, inputs), unembedding(model), labels, mask, chunk_size=chunk_size, teacher=teacher,
            loss=loss, hparams=hparams, tail=tail, ce_weight=1.0 if loss == "ce" else 0.0,
            kd_weight=0.0 if loss == "ce" else 1.0)
        if loss == "ce":
            return out.total, out.ce[1], {"ce": out.ce}
        return out.total, out.kd[1], {"ce": out.ce, "kd": out.kd}

    return loss_fn


def build_step(kind, *, vocab, seq_len, batch, layers=2, dim=256, k=64, chunk_size=CHUNK_SIZE):
    """(jitted step, state spec, abstract batch, frozen spec or None) for one of KINDS, on a 1-device mesh."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    cfg = model_config(vocab, seq_len, layers, dim)
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    model_fn = lambda rngs: Transformer(cfg, rngs=rngs)
    spec = steps.train_state_spec(model_fn, tx, seed=0, mesh=mesh, rules=rules)
    batch = {"tokens": jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)}
    base, chunked = kind.removesuffix("_chunked"), kind.endswith("_chunked")
    t_spec = None
    if base == "ce":
        loss_fn = chunked_loss_fn(mode="online", loss="ce", chunk_size=chunk_size) if chunked else steps.lm_loss
    elif base == "dense":
        # The teacher has the student's shape: its params enter as arguments, its logits as temporaries.
        t_spec = steps.train_state_spec(model_fn, tx, seed=1, mesh=mesh, rules=rules)
        args = dict(mode="online", loss="jsd", hparams={"beta": 0.5}, teacher_graphdef=t_spec.graphdef)
        loss_fn = chunked_loss_fn(**args, chunk_size=chunk_size) if chunked else distill.make_loss_fn(**args)
    elif base == "topk":
        b, t = batch["tokens"].shape[0], seq_len
        batch.update(
            teacher_ids=jax.ShapeDtypeStruct((b, t, k), jnp.int32),
            teacher_logprobs=jax.ShapeDtypeStruct((b, t, k), jnp.float32),
            teacher_tail_logprob=jax.ShapeDtypeStruct((b, t), jnp.float32),
        )
        args = dict(mode="offline", loss="jsd", hparams={"beta": 0.5})
        loss_fn = chunked_loss_fn(**args, chunk_size=chunk_size) if chunked else distill.make_loss_fn(**args)
    else:
        raise ValueError(f"unknown step {kind!r}; expected one of {KINDS}")
    batch_sh = sharding.batch_shardings(batch, mesh, rules)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_sh)
    step = steps.jit_train_step(
        graphdef=spec.graphdef, tx=tx, loss_fn=loss_fn, state_shardings=spec.shardings,
        batch_shardings=batch_sh, mesh=mesh, frozen_shardings=None if t_spec is None else t_spec.shardings.params,
    )
    return step, spec, batch, t_spec


def analyse(kind, *, vocab, seq_len, batch, layers=2, dim=256, k=64, chunk_size=CHUNK_SIZE):
    """memory_analysis() of one compiled step, in bytes."""
    step, spec, batch, t_spec = build_step(kind, vocab=vocab, seq_len=seq_len, batch=batch, layers=layers,
                                           dim=dim, k=k, chunk_size=chunk_size)
    frozen = None if t_spec is None else t_spec.abstract.params
    m = step.lower(spec.abstract, batch, frozen).compile().memory_analysis()
    out = dict(
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        temp=m.temp_size_in_bytes,
    )
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def run(*, vocabs=(8192, 32768, 131072), seq_lens=(128, 512), batch=8, layers=2, dim=256, k=64,
        chunk_size=CHUNK_SIZE, kinds=KINDS):
    rows = []
    for seq_len in seq_lens:
        for vocab in vocabs:
            row = dict(vocab=vocab, seq_len=seq_len)
            for kind in kinds:
                row[kind] = analyse(kind, vocab=vocab, seq_len=seq_len, batch=batch, layers=layers, dim=dim, k=k,
                                    chunk_size=chunk_size)
            rows.append(row)
            print(
                f"V={vocab:6d} T={seq_len:4d} peak MiB: "
                + "  ".join(f"{kind} {row[kind]['peak'] / MIB:8.1f}" for kind in kinds),
                flush=True,
            )
    return dict(rows=rows, batch=batch, layers=layers, dim=dim, k=k, chunk_size=chunk_size, kinds=tuple(kinds))


def _verdict(ratio, target):
    return "met" if ratio <= target else f"missed by {ratio / target:.2f}x"


def markdown(r):
    """The unfused table (issue 5's top-k <= 1.25x CE target) and, when measured, the chunked one."""
    kinds = r.get("kinds", UNFUSED)
    lines = []
    if all(kind in kinds for kind in UNFUSED):
        lines += unfused_markdown(r)
    if all(kind in kinds for kind in KINDS):
        lines += ["", chunked_markdown(r)]
    return "\n".join(lines).strip() or f"(no table for kinds {kinds})"


def unfused_markdown(r):
    lines = [
        f"Student and teacher {r['layers']} layers x {r['dim']}, batch {r['batch']}, top-k k = {r['k']}; "
        "MiB from XLA's `memory_analysis()` (peak = arguments + outputs - donated + temporaries).",
        "",
        "| V | T | CE-only peak | dense KD peak | top-k KD peak | CE temp | dense temp | top-k temp "
        "| dense / CE | top-k / CE | target top-k <= 1.25x CE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        ce, dense, topk = row["ce"], row["dense"], row["topk"]
        ratio = topk["peak"] / ce["peak"]
        lines.append(
            f"| {row['vocab']:,} | {row['seq_len']} | {ce['peak'] / MIB:.1f} | {dense['peak'] / MIB:.1f} | "
            f"{topk['peak'] / MIB:.1f} | {ce['temp'] / MIB:.1f} | {dense['temp'] / MIB:.1f} | "
            f"{topk['temp'] / MIB:.1f} | {dense['peak'] / ce['peak']:.2f}x | **{ratio:.2f}x** | "
            f"{_verdict(ratio, 1.25)} |"
        )
    return lines


def chunked_markdown(r):
    """The fused, chunked head (`kdjax.fused_head`) beside the unfused CE step: issue 18's memory targets."""
    lines = [
        f"Chunked head + loss (`kdjax.fused_head`, {r['chunk_size']} tokens per chunk); same models and batch.",
        "",
        "| V | T | CE chunked peak | dense KD chunked peak | top-k KD chunked peak | dense chunked temp "
        "| dense chunked / unfused CE (target <= 0.35x) | top-k chunked / CE chunked (target <= 1.05x) |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in r["rows"]:
        ce, cec, dc, tc = row["ce"], row["ce_chunked"], row["dense_chunked"], row["topk_chunked"]
        dense_ratio, topk_ratio = dc["peak"] / ce["peak"], tc["peak"] / cec["peak"]
        lines.append(
            f"| {row['vocab']:,} | {row['seq_len']} | {cec['peak'] / MIB:.1f} | {dc['peak'] / MIB:.1f} | "
            f"{tc['peak'] / MIB:.1f} | {dc['temp'] / MIB:.1f} | **{dense_ratio:.2f}x** {_verdict(dense_ratio, 0.35)} "
            f"| **{topk_ratio:.2f}x** {_verdict(topk_ratio, 1.05)} |"
        )
    return "\n".join(lines)


def plot(r, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    seq_lens = sorted({row["seq_len"] for row in r["rows"]})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5 * len(seq_lens), 3.8), squeeze=False)
    labels = {"ce": "CE only", "dense": "dense-teacher KD", "topk": f"top-{r['k']} KD"}
    for ax, t in zip(axes[0], seq_lens):
        rows = [row for row in r["rows"] if row["seq_len"] == t]
        for kind in r.get("kinds", UNFUSED):
            base = kind.removesuffix("_chunked")
            chunked = kind != base
            ax.plot([row["vocab"] for row in rows], [row[kind]["peak"] / MIB for row in rows],
                    marker="osd"[UNFUSED.index(base)], linestyle="--" if chunked else "-",
                    markerfacecolor="none" if chunked else None,
                    color=f"C{UNFUSED.index(base)}", label=labels[base] + (" (chunked)" if chunked else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("compiled peak memory, MiB")
        ax.set_title(f"train step memory, T = {t}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# Throughput: the chunked steps beside the unfused ones, on real data, interleaved.


def _concrete_batch(abstract, vocab, seed):
    """Random tokens and a valid top-k store (distinct ids, log-probs with their exact tail) for `abstract`."""
    rs = np.random.RandomState(seed)
    b, t1 = abstract["tokens"].shape
    batch = {"tokens": rs.randint(0, vocab, (b, t1)).astype(np.int32)}
    if "teacher_ids" in abstract:
        k = abstract["teacher_ids"].shape[-1]
        start = rs.randint(0, vocab, (b, t1 - 1, 1))
        batch["teacher_ids"] = ((start + np.arange(k)) % vocab).astype(np.int32)
        head = rs.randn(b, t1 - 1, k)
        head_lp = head - np.log(np.sum(np.exp(head), axis=-1, keepdims=True))
        batch["teacher_logprobs"] = (np.log(0.9) + head_lp).astype(np.float32)  # 90% of the mass in the top-k
        batch["teacher_tail_logprob"] = np.full((b, t1 - 1), np.log(0.1), np.float32)
    return {name: jax.device_put(x, abstract[name].sharding) for name, x in batch.items()}


def _load():
    return os.getloadavg()[0]


def _usable_cpus():
    # The cores this process may run on (taskset / cgroup pinning), not the machine's count.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_steps(*, vocab=8192, seq_len=512, batch=8, layers=2, dim=256, k=64, chunk_size=1024, repeats=5, iters=3,
               pairs=UNFUSED):
    """Seconds per step of each unfused step and its chunked twin, timed in alternation (one repeat = `iters`
    steps of each kind in turn, so machine load hits both alike).  Returns per-kind lists of seconds and
    the per-repeat throughput ratios chunked / unfused = t_unfused / t_chunked."""
    runners, first_loss = {}, {}
    for kind in [name for base in pairs for name in (base, f"{base}_chunked")]:
        step, spec, abstract, t_spec = build_step(kind, vocab=vocab, seq_len=seq_len, batch=batch, layers=layers,
                                                  dim=dim, k=k, chunk_size=chunk_size)
        frozen = None if t_spec is None else t_spec.init().params
        state = spec.init()
        data = _concrete_batch(abstract, vocab, seed=0)
        state, metrics = step(state, data, frozen)  # compile and warm up
        total, count = jax.device_get(metrics["loss"])
        first_loss[kind] = float(total) / max(float(count), 1.0)  # same init and data: unfused == chunked
        runners[kind] = [step, state, data, frozen]
    load_before = _load()
    seconds = {kind: [] for kind in runners}
    for _ in range(repeats):
        for kind, runner in runners.items():
            step, state, data, frozen = runner
            start = time.perf_counter()
            for _ in range(iters):
                state, metrics = step(state, data, frozen)
            jax.block_until_ready(metrics)
            seconds[kind].append((time.perf_counter() - start) / iters)
            runner[1] = state
    ratios = {base: [u / c for u, c in zip(seconds[base], seconds[f"{base}_chunked"])] for base in pairs}
    return dict(seconds=seconds, ratios=ratios, first_loss=first_loss, vocab=vocab, seq_len=seq_len, batch=batch,
                layers=layers, dim=dim, chunk_size=chunk_size, repeats=repeats, iters=iters,
                load=(load_before, _load()), cpus=_usable_cpus(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                backend=jax.default_backend())


def time_markdown(r):
    lines = [
        f"Throughput at V = {r['vocab']:,}, T = {r['seq_len']}, batch {r['batch']}, {r['layers']} layers x {r['dim']}, "
        f"chunk {r['chunk_size']} tokens; {r['repeats']} interleaved repeats of {r['iters']} steps on "
        f"{r['backend']} ({r['cpus']} usable CPUs, XLA_FLAGS={r['xla_flags']!r}); 1-minute load average "
        f"{r['load'][0]:.1f} before, {r['load'][1]:.1f} after.",
        "",
        "| step | unfused s/step (median) | chunked s/step (median) | chunked / unfused throughput: median "
        "[min, max] over repeats | target >= 0.9x | first-step loss unfused / chunked |",
        "|---|---:|---:|---|---|---|",
    ]
    for base, ratios in r["ratios"].items():
        med = statistics.median(ratios)
        lines.append(
            f"| {base} | {statistics.median(r['seconds'][base]):.3f} | "
            f"{statistics.median(r['seconds'][base + '_chunked']):.3f} | **{med:.2f}x** [{min(ratios):.2f}, "
            f"{max(ratios):.2f}] | {'met' if med >= 0.9 else f'missed by {0.9 / med:.2f}x'} | "
            f"{r['first_loss'][base]:.6f} / {r['first_loss'][base + '_chunked']:.6f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", default="8192,32768,131072")
    parser.add_argument("--seq_lens", default="128,512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=CHUNK_SIZE, help="tokens per chunk of the fused head")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"a subset of {KINDS}")
    parser.add_argument("--plot", default="", help="write the PNG here")
    parser.add_argument("--time_vocab", type=int, default=0, help="time the steps at this V instead")
    parser.add_argument("--time_chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    if args.time_vocab:
        t = int(args.seq_lens.split(",")[-1])
        r = time_steps(vocab=args.time_vocab, seq_len=t, batch=args.batch, chunk_size=args.time_chunk_size,
                       repeats=args.repeats, iters=args.iters)
        print(time_markdown(r))
        return r
    kinds = tuple(args.kinds.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown --kinds {sorted(unknown)}; expected a subset of {KINDS}")
    r = run(
        vocabs=tuple(int(v) for v in args.vocabs.split(",")),
        seq_lens=tuple(int(t) for t in args.seq_lens.split(",")),
        batch=args.batch,
        chunk_size=args.chunk_size,
        kinds=kinds,
    )
    print(markdown(r))
    if args.plot:
        plot(r, args.plot)
    return r


if __name__ == "__main__":
    main()
