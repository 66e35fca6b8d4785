"""One knowledge-distillation step in kdjax against the same step in PyTorch + transformers.

  .venv/bin/python -m benchmarks.step_vs_pytorch [--size cpu|issue] [--vocab V --batch B ...]

Both sides train the same GPT-2-shaped student against the same frozen GPT-2-shaped teacher, from the same
weights (kdjax initialises them, `copy_to_torch` copies them into `transformers.GPT2LMHeadModel`), on the same
tokens, with the same optimizer (global-norm clip 1.0, then AdamW b1 0.9, b2 0.95, weight decay 0.1 on
matrices, the same warm-up + cosine learning rates):

  online:  teacher forward, student forward + backward, generalized JSD(beta = 0.5), AdamW.
           kdjax: `steps.jit_train_step` with `distill.make_loss_fn(mode="online", loss="jsd")`, the teacher's
           params passed as `frozen`.  PyTorch: teacher under no_grad, the JSD written below in plain torch.
  offline: no teacher network in the step.  kdjax: top-k KD (k = 64, tail bucket) on the targets the teacher
           store holds (`teacher_store.topk_targets`, precomputed and on device, as the store's reader
           delivers them).  PyTorch: dense teacher logits [B, T, V] precomputed in memory, the same JSD.

The contenders alternate (kdjax, torch, kdjax, torch, ...) after warm-up steps, and each reports the median
step time, so load from other processes on the machine hits both alike.  With `rounds` > 1 the interleaved
timing repeats (up to `max_rounds`) until the per-round ratios' spread, (max - min) / median, is at most
`target_spread`; the result states the spread reached, the 1-minute load average before and after, and both
contenders' thread settings.  `chunk_size` > 0 runs kdjax's fused chunked head (`loss_chunk_size`).
"""

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import distill, hf, sharding, steps, teacher_store
from kdjax.models.transformer import Transformer, TransformerConfig

# Named sizes.  "issue" is the configuration (about 20M teacher, 5M student); "cpu" is small enough for
# `make bench` to finish in minutes on a 2-core machine; "tiny" is for the smoke test.
SIZES = {
    "issue": dict(vocab=8192, batch=16, seq_len=128, teacher_layers=10, teacher_dim=384, teacher_heads=6,
                  student_layers=4, student_dim=256, student_heads=4),
    "cpu": dict(vocab=8192, batch=8, seq_len=128, teacher_layers=4, teacher_dim=256, teacher_heads=4,
                student_layers=2, student_dim=128, student_heads=2),
    "tiny": dict(vocab=64, batch=2, seq_len=8, teacher_layers=1, teacher_dim=32, teacher_heads=2,
                 student_layers=1, student_dim=16, student_heads=2),
}
OPTIMIZER = dict(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
BETA = 0.5
TOPK = 64


def add_size_args(parser, default="cpu"):
    """--size picks a row of SIZES; any of its fields can be overridden by its own flag."""
    parser.add_argument("--size", default=default, choices=sorted(SIZES))
    for name in SIZES["issue"]:
        parser.add_argument(f"--{name}", type=int, default=None)


def resolve_size(args):
    size = dict(SIZES[args.size])
    size.update({k: getattr(args, k) for k in size if getattr(args, k, None) is not None})
    return size


def gpt2_config(size, role):
    dim = size[f"{role}_dim"]
    heads = size[f"{role}_heads"]
    return TransformerConfig.gpt2(
        vocab_size=size["vocab"],
        num_layers=size[f"{role}_layers"],
        embed_dim=dim,
        num_heads=heads,
        head_dim=dim // heads,
        mlp_dim=4 * dim,
        max_len=size["seq_len"],
    )


def matmul_params(cfg):
    """Parameters that multiply activations: the blocks' matrices and the (tied) LM head.

    Excludes the position table and the embedding lookup (a gather, no FLOPs) and the norms and biases
    (O(D) per token).  This is the N of the 6·N·tokens rule.
    """
    d, f, h, k, e = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * h * e + 2 * d * k * e + h * e * d + 2 * d * f
    return cfg.num_layers * per_layer + cfg.vocab_size * d


def step_flops(size):
    """Model FLOPs of one online KD step (the formula `benchmarks.mfu` reports against the peak).

      student forward + backward: 6 · N_s · tokens + 12 · L_s · T · D_s · tokens
      teacher forward:            2 · N_t · tokens +  4 · L_t · T · D_t · tokens
    N = `matmul_params`; the attention terms are QK^T and PV (2 · 2 · T · D per token and layer, forward),
    counted over the full T x T square as XLA and PyTorch compute it (the causal mask is applied, not skipped).
    Softmax, norms, the loss and the optimizer are elementwise and not counted.
    """
    tokens, t = size["batch"] * size["seq_len"], size["seq_len"]
    s, te = gpt2_config(size, "student"), gpt2_config(size, "teacher")
    student = 6 * matmul_params(s) * tokens + 12 * s.num_layers * t * s.embed_dim * tokens
    teacher = 2 * matmul_params(te) * tokens + 4 * te.num_layers * t * te.embed_dim * tokens
    return student + teacher


# ----------------------------------------------------------------------------------------------------------
# kdjax side: the library's real step on a 1-device mesh.


def make_kdjax(size, *, mode, total_steps, seed=0, chunk_size=0):
    """Returns a dict with the jitted step, its state, the teacher params, and a batch maker."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    opt = dict(OPTIMIZER)
    lr, warmup = opt.pop("learning_rate"), opt.pop("warmup_steps")
    tx = steps.make_optimizer(learning_rate=lr, warmup_steps=warmup, total_steps=total_steps, **opt)
    s_cfg, t_cfg = gpt2_config(size, "student"), gpt2_config(size, "teacher")
    graphdef, state, state_sh = steps.init_train_state(
        lambda rngs: Transformer(s_cfg, rngs=rngs), tx, seed=seed, mesh=mesh, rules=rules
    )
    # The library's own path to params in their shardings; the AdamW moments it also builds for the teacher
    # are never used (a few MB at these sizes) and are freed when this returns.
    t_graphdef, t_state, t_sh = steps.init_train_state(
        lambda rngs: Transformer(t_cfg, rngs=rngs), tx, seed=seed + 100, mesh=mesh, rules=rules
    )
    teacher_params, teacher_sh = t_state.params, t_sh.params
    loss_fn = distill.make_loss_fn(
        mode=mode, loss="jsd", hparams={"beta": BETA}, teacher_graphdef=t_graphdef, chunk_size=chunk_size
    )
    targets_fn = jax.jit(
        lambda p, tok: teacher_store.topk_targets(
            nnx.merge(t_graphdef, p)(tok[:, :-1]), tok[:, 1:], k=min(TOPK, size["vocab"])
        )
    )

    def batch_for(tokens):
        batch = {"tokens": tokens}
        if mode == "offline":
            batch.update(targets_fn(teacher_params, tokens))
        return batch

    example = jax.eval_shape(batch_for, jax.ShapeDtypeStruct((size["batch"], size["seq_len"] + 1), jnp.int32))
    batch_sh = sharding.batch_shardings(example, mesh, rules)
    step = steps.jit_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        state_shardings=state_sh,
        batch_shardings=batch_sh,
        mesh=mesh,
        frozen_shardings=teacher_sh if mode == "online" else None,
    )
    return dict(
        step=step,
        state=state,
        graphdef=graphdef,
        teacher_graphdef=t_graphdef,
        teacher_params=teacher_params,
        frozen=teacher_params if mode == "online" else None,
        batch_for=lambda tokens: jax.device_put(batch_for(tokens), batch_sh),
        schedule=steps.make_schedule(learning_rate=lr, warmup_steps=warmup, total_steps=total_steps),
        total_steps=total_steps,
    )


# ----------------------------------------------------------------------------------------------------------
# PyTorch side: transformers' GPT2LMHeadModel and the JSD formula written out.


def torch_jsd(student_logits, teacher_logits, beta=BETA):
    """Mean over tokens of  beta · KL(p || m) + (1 - beta) · KL(q || m),  m = beta · p + (1 - beta) · q.

    p = softmax(teacher), q = softmax(student), float32: the formula of `kdjax.losses.jsd` in plain torch.
    """
    import torch  # pylint: disable=g-import-not-at-top

    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    p, q = logp.exp(), logq.exp()
    m = beta * p + (1 - beta) * q
    logm = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
    per_token = beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
    return per_token.mean()


def torch_gpt2(cfg):
    """A `transformers.GPT2LMHeadModel` of `cfg`'s shape (config.json keys from `kdjax.hf`, dropout 0)."""
    import transformers  # pylint: disable=g-import-not-at-top

    return transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(hf.kdjax_to_hf_config(cfg)))


def copy_to_torch(graphdef, params, torch_model):
    """Loads kdjax GPT-2 params into a `GPT2LMHeadModel` of the same shape (in place), through the tensor
    layout `kdjax.hf.save_hf` writes (q|k|v fused into c_attn, Conv1D's [in, out] order)."""
    import torch  # pylint: disable=g-import-not-at-top

    tensors = hf.hf_state_dict(nnx.merge(graphdef, params), model_type="gpt2")
    state = {name: torch.tensor(np.asarray(x, np.float32)) for name, x in tensors.items()}
    # The tied head and the causal-mask buffers are not in a checkpoint; everything else must be.
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    not_in_checkpoints = ("lm_head.weight", "attn.bias", "attn.masked_bias")
    if unexpected or any(not name.endswith(not_in_checkpoints) for name in missing):
        raise AssertionError(f"layout mismatch: missing {missing}, unexpected {unexpected}")


def make_torch(kd, size):
    """The PyTorch contender, from the kdjax side's initial weights.  Returns step(tokens) -> loss tensor."""
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(os.cpu_count())
    student = torch_gpt2(gpt2_config(size, "student"))
    teacher = torch_gpt2(gpt2_config(size, "teacher"))
    copy_to_torch(kd["graphdef"], kd["state"].params, student)
    copy_to_torch(kd["teacher_graphdef"], kd["teacher_params"], teacher)
    student.train()
    teacher.eval()
    teacher.requires_grad_(False)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0,
        betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
        eps=1e-8,
    )
    # The learning rates of optax's schedule, computed once: a JAX call per step would bill torch for it.
    lrs = np.asarray(kd["schedule"](np.arange(kd["total_steps"])), np.float64)
    counter = {"step": 0}

    def step(tokens, teacher_logits=None):
        lr = float(lrs[min(counter["step"], len(lrs) - 1)])
        for group in opt.param_groups:
            group["lr"] = lr
        inputs = tokens[:, :-1]
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher(inputs).logits
        loss = torch_jsd(student(inputs).logits, teacher_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), OPTIMIZER["grad_clip"])
        opt.step()
        counter["step"] += 1
        return loss.detach()

    def dense_teacher_logits(tokens):
        with torch.no_grad():
            return teacher(tokens[:, :-1]).logits

    return dict(step=step, dense_teacher_logits=dense_teacher_logits)


# ----------------------------------------------------------------------------------------------------------


def thread_settings():
    """Both contenders' CPU thread settings, as they run here."""
    import torch  # pylint: disable=g-import-not-at-top

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        cpus=cpus,
        # XLA:CPU runs each op on an intra-op pool of one thread per usable core unless XLA_FLAGS says otherwise.
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        jax_threads=f"XLA:CPU intra-op pool, {cpus} usable cores",
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
    )


def _spread(ratios):
    return (max(ratios) - min(ratios)) / float(np.median(ratios)) if len(ratios) > 1 else float("nan")


def run(size, *, mode="online", warmup=2, iters=6, seed=0, chunk_size=0, rounds=1, max_rounds=None,
        target_spread=0.15):
    """Interleaved timing of both sides.  Returns a dict of medians, tokens/s, ratio and the losses seen.

    Round 1 records the losses of its warmup + iters steps; every round times `iters` interleaved steps and
    gives one ratio (median torch / median kdjax).  At least `rounds` rounds run, more (up to `max_rounds`)
    while the ratios' spread exceeds `target_spread`.
    """
    import torch  # pylint: disable=g-import-not-at-top

    max_rounds = max(rounds, max_rounds or rounds)
    total_steps = warmup + max_rounds * iters + 2
    kd = make_kdjax(size, mode=mode, total_steps=total_steps, seed=seed, chunk_size=chunk_size)
    pt = make_torch(kd, size)
    rng = np.random.RandomState(seed)
    tokens_np = rng.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1)).astype(np.int32)
    batch = kd["batch_for"](tokens_np)
    tokens_pt = torch.from_numpy(tokens_np.astype(np.int64))
    # Offline PyTorch keeps the dense teacher logits in memory, as a dense-logit cache would hand them over.
    teacher_logits = pt["dense_teacher_logits"](tokens_pt) if mode == "offline" else None
    state = kd["state"]
    kd_times, pt_times, kd_losses, pt_losses, round_ratios = [], [], [], [], []
    load_before = os.getloadavg()[0]
    while len(round_ratios) < rounds or (len(round_ratios) < max_rounds and _spread(round_ratios) > target_spread):
        first = not round_ratios
        kd_round, pt_round = [], []
        for i in range((warmup if first else 0) + iters):
            t0 = time.perf_counter()
            state, metrics = kd["step"](state, batch, kd["frozen"])
            total, count = jax.block_until_ready(metrics["loss"])
            t1 = time.perf_counter()
            loss_pt = pt["step"](tokens_pt, teacher_logits)
            t2 = time.perf_counter()
            if first:
                kd_losses.append(float(total) / float(count))
                pt_losses.append(float(loss_pt))
            if not first or i >= warmup:
                kd_round.append(t1 - t0)
                pt_round.append(t2 - t1)
        round_ratios.append(float(np.median(pt_round) / np.median(kd_round)))
        kd_times += kd_round
        pt_times += pt_round
    tokens = size["batch"] * size["seq_len"]
    kd_s, pt_s = float(np.median(kd_times)), float(np.median(pt_times))
    return dict(
        round_ratios=round_ratios,
        spread=_spread(round_ratios),
        load=(load_before, os.getloadavg()[0]),
        threads=thread_settings(),
        chunk_size=chunk_size,
        mode=mode,
        kdjax_s=kd_s,
        torch_s=pt_s,
        kdjax_tps=tokens / kd_s,
        torch_tps=tokens / pt_s,
        ratio=pt_s / kd_s,
        # Fastest step of each: closer to what an unloaded machine gives, reported beside the medians.
        best_ratio=min(pt_times) / min(kd_times),
        kdjax_losses=kd_losses,
        torch_losses=pt_losses,
        iters=iters,
        warmup=warmup,
    )


def describe(size):
    s, t = gpt2_config(size, "student"), gpt2_config(size, "teacher")
    return (
        f"teacher {t.num_layers}x{t.embed_dim} ({t.num_params() / 1e6:.1f}M params), "
        f"student {s.num_layers}x{s.embed_dim} ({s.num_params() / 1e6:.1f}M), vocab {size['vocab']}, "
        f"batch {size['batch']} x length {size['seq_len']}"
    )


def markdown(size, results):
    th = results[0].get("threads") or thread_settings()
    lines = [
        f"Config: {describe(size)}. Median of {results[0]['iters']} interleaved steps per round after "
        f"{results[0]['warmup']} warm-up steps; rounds repeat until the per-round ratios' spread "
        "((max - min) / median) is stated below.  Threads: kdjax "
        f"{th['jax_threads']} (XLA_FLAGS={th['xla_flags']!r}); PyTorch torch.get_num_threads() = "
        f"{th['torch_threads']}, interop {th['torch_interop_threads']}.",
        "",
        "| step | kdjax ms | PyTorch ms | kdjax tokens/s | PyTorch tokens/s | kdjax / PyTorch | "
        "(fastest steps) | per-round ratios [spread] | load before / after | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        verdict = "met" if r["ratio"] >= 3 else f"missed by {3 / r['ratio']:.2f}x"
        label = {"online": "online KD (teacher fwd + student fwd/bwd + JSD + AdamW)",
                 "offline": f"offline KD (kdjax top-{TOPK} from store vs PyTorch dense logits)"}[r["mode"]]
        if r.get("chunk_size"):
            label += f", kdjax fused head (chunk {r['chunk_size']})"
        rounds = r.get("round_ratios", [r["ratio"]])
        spread = f"{100 * r['spread']:.0f}%" if len(rounds) > 1 else "one round"
        load = r.get("load", (os.getloadavg()[0],) * 2)
        lines.append(
            f"| {label} | {1e3 * r['kdjax_s']:.1f} | {1e3 * r['torch_s']:.1f} | {r['kdjax_tps']:,.0f} | "
            f"{r['torch_tps']:,.0f} | **{r['ratio']:.2f}x** | ({r['best_ratio']:.2f}x) | "
            f"{', '.join(f'{x:.2f}' for x in rounds)} [{spread}] | "
            f"{load[0]:.1f} / {load[1]:.1f} | >= 3x: {verdict} |"
        )
    online = [r for r in results if r["mode"] == "online"]
    if online:
        r = online[0]
        lines += [
            "",
            f"Online first-step loss (same weights, same tokens): kdjax {r['kdjax_losses'][0]:.6f}, "
            f"PyTorch {r['torch_losses'][0]:.6f}.",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--modes", default="online,offline")
    parser.add_argument("--chunk_size", type=int, default=0, help="kdjax's fused head: tokens per chunk (0 = unfused)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max_rounds", type=int, default=0)
    args = parser.parse_args()
    size = resolve_size(args)
    results = [run(size, mode=m, warmup=args.warmup, iters=args.iters, chunk_size=args.chunk_size,
                   rounds=args.rounds, max_rounds=args.max_rounds) for m in args.modes.split(",")]
    print(markdown(size, results))
    return size, results


if __name__ == "__main__":
    main()
