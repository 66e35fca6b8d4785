"""Compiled memory of the train step: CE-only vs dense-teacher KD vs top-k KD, as the vocabulary grows.

  .venv/bin/python -m benchmarks.memory [--vocabs 8192,32768,131072] [--seq_lens 128,512]

Nothing runs and nothing is allocated: each step is lowered from abstract inputs (`jax.ShapeDtypeStruct`s
carrying their shardings, on a 1-device mesh) and compiled, and XLA's `compiled.memory_analysis()` reports
the buffers it planned.  Steps (all `steps.jit_train_step`, state donated):

  ce:      `steps.lm_loss`, the student alone.
  dense:   online KD, `distill.make_loss_fn(mode="online", loss="jsd")`: the teacher runs in the step, and its
           [B, T, V] logits meet the student's in the dense JSD.
  topk:    offline KD, `mode="offline"`, k = 64: the batch carries the store's [B, T, k] targets.

The model is deliberately tiny (2 layers x 256 for student and teacher) so that the [B, T, V] terms dominate.
Peak estimate = arguments + outputs - aliased (donated) + temporaries.
"""

import argparse

import jax
import jax.numpy as jnp

from kdjax import distill, sharding, steps
from kdjax.models.transformer import Transformer, TransformerConfig

KINDS = ("ce", "dense", "topk")
MIB = 2**20


def model_config(vocab, seq_len, layers, dim):
    return TransformerConfig.gpt2(
        vocab_size=vocab, num_layers=layers, embed_dim=dim, num_heads=dim // 64 or 1,
        head_dim=min(dim, 64), mlp_dim=4 * dim, max_len=seq_len,
    )


def analyse(kind, *, vocab, seq_len, batch, layers=2, dim=256, k=64):
    """memory_analysis() of one compiled step, in bytes."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    cfg = model_config(vocab, seq_len, layers, dim)
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    model_fn = lambda rngs: Transformer(cfg, rngs=rngs)
    spec = steps.train_state_spec(model_fn, tx, seed=0, mesh=mesh, rules=rules)
    batch = {"tokens": jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)}
    frozen, frozen_sh = None, None
    if kind == "ce":
        loss_fn = steps.lm_loss
    elif kind == "dense":
        # The teacher has the student's shape: its params enter as arguments, its logits as temporaries.
        t_spec = steps.train_state_spec(model_fn, tx, seed=1, mesh=mesh, rules=rules)
        frozen, frozen_sh = t_spec.abstract.params, t_spec.shardings.params
        loss_fn = distill.make_loss_fn(mode="online", loss="jsd", hparams={"beta": 0.5},
                                       teacher_graphdef=t_spec.graphdef)
    elif kind == "topk":
        b, t = batch["tokens"].shape[0], seq_len
        batch.update(
            teacher_ids=jax.ShapeDtypeStruct((b, t, k), jnp.int32),
            teacher_logprobs=jax.ShapeDtypeStruct((b, t, k), jnp.float32),
            teacher_tail_logprob=jax.ShapeDtypeStruct((b, t), jnp.float32),
        )
        loss_fn = distill.make_loss_fn(mode="offline", loss="jsd", hparams={"beta": 0.5})
    else:
        raise ValueError(f"unknown step {kind!r}; expected one of {KINDS}")
    batch_sh = sharding.batch_shardings(batch, mesh, rules)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_sh)
    step = steps.jit_train_step(
        graphdef=spec.graphdef, tx=tx, loss_fn=loss_fn, state_shardings=spec.shardings,
        batch_shardings=batch_sh, mesh=mesh, frozen_shardings=frozen_sh,
    )
    m = step.lower(spec.abstract, batch, frozen).compile().memory_analysis()
    out = dict(
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        temp=m.temp_size_in_bytes,
    )
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def run(*, vocabs=(8192, 32768, 131072), seq_lens=(128, 512), batch=8, layers=2, dim=256, k=64):
    rows = []
    for seq_len in seq_lens:
        for vocab in vocabs:
            row = dict(vocab=vocab, seq_len=seq_len)
            for kind in KINDS:
                row[kind] = analyse(kind, vocab=vocab, seq_len=seq_len, batch=batch, layers=layers, dim=dim, k=k)
            rows.append(row)
            print(
                f"V={vocab:6d} T={seq_len:4d} peak MiB: "
                + "  ".join(f"{kind} {row[kind]['peak'] / MIB:8.1f}" for kind in KINDS),
                flush=True,
            )
    return dict(rows=rows, batch=batch, layers=layers, dim=dim, k=k)


def markdown(r):
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
        verdict = "met" if ratio <= 1.25 else f"missed by {ratio / 1.25:.2f}x"
        lines.append(
            f"| {row['vocab']:,} | {row['seq_len']} | {ce['peak'] / MIB:.1f} | {dense['peak'] / MIB:.1f} | "
            f"{topk['peak'] / MIB:.1f} | {ce['temp'] / MIB:.1f} | {dense['temp'] / MIB:.1f} | "
            f"{topk['temp'] / MIB:.1f} | {dense['peak'] / ce['peak']:.2f}x | **{ratio:.2f}x** | {verdict} |"
        )
    return "\n".join(lines)


def plot(r, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    seq_lens = sorted({row["seq_len"] for row in r["rows"]})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5 * len(seq_lens), 3.8), squeeze=False)
    for ax, t in zip(axes[0], seq_lens):
        rows = [row for row in r["rows"] if row["seq_len"] == t]
        for kind, marker, label in zip(KINDS, "osd", ("CE only", "dense-teacher KD", f"top-{r['k']} KD")):
            ax.plot([row["vocab"] for row in rows], [row[kind]["peak"] / MIB for row in rows],
                    marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("compiled peak memory, MiB")
        ax.set_title(f"train step memory, T = {t}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", default="8192,32768,131072")
    parser.add_argument("--seq_lens", default="128,512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--plot", default="", help="write the PNG here")
    args = parser.parse_args()
    r = run(
        vocabs=tuple(int(v) for v in args.vocabs.split(",")),
        seq_lens=tuple(int(t) for t in args.seq_lens.split(",")),
        batch=args.batch,
    )
    print(markdown(r))
    if args.plot:
        plot(r, args.plot)
    return r


if __name__ == "__main__":
    main()
