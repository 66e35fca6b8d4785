"""Teacher-store benchmark: fidelity curve, bytes/token, write overhead, read speed vs the train step.

  .venv/bin/python -m benchmarks.store [--teacher_workdir W] [--out docs] [--parts fidelity,write,read]

1. Fidelity curve: for k in {8, 32, 128} and log-prob dtype in {bf16, fp16, fp32}, a real store is written for
   held-out (validation) examples and read back; we report its on-disk bytes/token and
   KL(full teacher || reconstructed) per token, where the reconstruction keeps the stored top-k log-probs and
   spreads the stored tail mass uniformly over the other V - k ids.  Written as a markdown table and a PNG.
2. Write overhead: the same examples through the teacher forward alone (jitted logits + top-k, results fetched
   to host) vs through `write_store` (the same forward, with the host work - fetch, token checksums, shard
   assembly, zarr write, fsync, sha256 - pipelined behind it), interleaved, `--reps` times.  Both sides are
   steady state (compiled before timing); the first, compiling `write_store` call is reported on its own.
   The machine's load average is printed with every measurement: on a shared machine the spread is wide.
3. Read speed: tokens/s of batches read from the store through `StoreSource` + grain (per-example token
   checksums included), against the tokens/s that a train step of the demo student consumes (the CE-only
   pretraining step: the cheapest step, so the ratio is a lower bound for a KD step).

The teacher is a kdjax work directory; without --teacher_workdir a small one is pretrained first (cached in
workdirs/bench_teacher), since a random teacher's near-uniform distributions would make the curve meaningless.
Timing-only runs (`--parts write,read`) without a trained teacher use a randomly initialised one of the same
architecture over random tokens: the cost of a forward does not depend on the weights.  `--parts` re-measures
only those sections of the page; the others are kept from the existing page.
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import lm_pretrain as pretrain_config
from experiments import lm_pretrain
from kdjax import pretrained, sharding, steps, teacher_store
from kdjax.data import pipeline
from kdjax.data import text as text_data
from kdjax.models.transformer import Transformer, TransformerConfig

KS = (8, 32, 128)
DTYPES = ("bfloat16", "float16", "float32")
PARTS = ("fidelity", "write", "read")
BENCH_TEACHER = os.path.join("workdirs", "bench_teacher")
# One page, one section per part, in this order; a run replaces only the sections of the parts it ran.
SECTIONS = {"fidelity": "## Fidelity curve", "write": "## Write overhead", "read": "## Read speed"}


def load_avg():
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def teacher_workdir(args, parts):
    if args.teacher_workdir:
        return args.teacher_workdir
    if "fidelity" not in parts and not os.path.exists(os.path.join(BENCH_TEACHER, "model_config.json")):
        return None  # timing only: a random teacher of the same architecture costs the same
    config = pretrain_config.get_config()
    config.steps = args.teacher_steps
    config.eval_every = config.checkpoint_every = args.teacher_steps
    lm_pretrain.train(config, BENCH_TEACHER)  # resumes / re-evaluates if already trained
    return BENCH_TEACHER


class Setup:
    """The teacher (graphdef, params), a jitted logits function, held-out examples and the store manifest."""

    def __init__(self, workdir, n_examples):
        config = pretrain_config.get_config()
        self.config, self.workdir, self.seq_len = config, workdir, config.data.seq_len
        mesh = sharding.make_mesh({"data": -1})
        if workdir:
            teacher = pretrained.load_workdir(workdir, mesh=mesh, rules=sharding.DEFAULT_RULES)
            data = text_data.load_from_config(
                config.data,
                tokenizer_path=os.path.join(workdir, "tokenizer.json"),
                vocab_size=teacher.tokenizer.vocab_size,
            )
            graphdef, self.params, self.vocab = teacher.graphdef, teacher.params, teacher.config.vocab_size
            self.tokenizer = teacher.tokenizer
            self.examples = [data.validation[i] for i in range(min(n_examples, len(data.validation)))]
        else:
            self.vocab = config.data.vocab_size
            model = Transformer(_model_config(config, self.vocab), rngs=nnx.Rngs(0))
            graphdef, self.params = nnx.split(model, nnx.Param)
            self.tokenizer = '{"random teacher": "no tokenizer"}'
            tokens = np.random.default_rng(0).integers(0, self.vocab, (n_examples, self.seq_len + 1), np.int32)
            self.examples = [{"tokens": t, "example_id": np.int64(i)} for i, t in enumerate(tokens)]
        self.logits_fn = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
        self.manifest = {
            "teacher_fingerprint": teacher_store.params_fingerprint(self.params),
            "teacher": teacher_store.teacher_record(workdir=workdir) if workdir else {"description": "random"},
            "dataset": "stdlib" if workdir else "random tokens",
            "split": "validation",
        }

    def write(self, path, examples, **kw):
        return teacher_store.write_store(
            path,
            source=examples,
            logits_fn=self.logits_fn,
            params=self.params,
            manifest=self.manifest,
            tokenizer=self.tokenizer,
            progress=False,
            **kw,
        )


def _model_config(config, vocab):
    """The pretraining config's model (the benchmark teacher's and the demo student's architecture)."""
    return TransformerConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": vocab, "max_len": config.data.seq_len}
    )


def reconstruction_kl(logprobs_ntv, k, dtype):
    """Mean over tokens of KL(p || p_hat); p_hat = stored top-k (in `dtype`) + uniform tail over V - k ids."""
    v = logprobs_ntv.shape[-1]
    top_lp, top_ids = jax.lax.top_k(logprobs_ntv, k)
    stored = top_lp.astype(dtype).astype(jnp.float32)
    p = jnp.exp(logprobs_ntv)
    in_top = jnp.put_along_axis(jnp.zeros(logprobs_ntv.shape, bool), top_ids, True, axis=-1, inplace=False)
    tail_lp = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logprobs_ntv), axis=-1)
    uniform_tail = tail_lp - jnp.log(max(v - k, 1))
    kl_top = jnp.sum(jnp.exp(top_lp) * (top_lp - stored), axis=-1)
    kl_tail = jnp.sum(jnp.where(in_top, 0.0, p * (logprobs_ntv - uniform_tail[..., None])), axis=-1)
    return float(jnp.mean(kl_top + kl_tail)), float(jnp.mean(jnp.exp(tail_lp)))


def measure_fidelity(setup, tmp, *, batch_size):
    """One row per (k, dtype): real stores' bytes/token and the reconstruction KL."""
    subset = setup.examples
    tokens = np.stack([e["tokens"] for e in subset])
    logprobs = jnp.concatenate(
        [
            jax.nn.log_softmax(setup.logits_fn(setup.params, tokens[i : i + batch_size, :-1]).astype(jnp.float32))
            for i in range(0, len(subset), batch_size)
        ]
    )
    rows = []
    for k in KS:
        for dtype in DTYPES:
            manifest = setup.write(
                os.path.join(tmp, f"k{k}-{dtype}"),
                subset,
                k=k,
                batch_size=batch_size,
                examples_per_shard=32,
                logprob_dtype=dtype,
            )
            kl, tail = reconstruction_kl(logprobs, k, jnp.dtype(dtype))
            row = dict(k=k, dtype=dtype, bytes_per_token=manifest["bytes_per_token"], kl=kl, tail=tail)
            rows.append(dict(row, target=4.5 * k + 16))
            print(f"k={k:4d} {dtype:9s} {row['bytes_per_token']:7.1f} B/token  KL {kl:.5f}  tail {tail:.4f}")
    return {"rows": rows, "n": len(subset)}


class HostThreadCPU:
    """Sums the CPU time (`time.thread_time`) of every call the writer's background threads run, by wrapping
    `BoundedWorker.submit` while active: the host work itself, without the teacher or any waiting."""

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __enter__(self):
        self._submit = teacher_store.BoundedWorker.submit
        meter = self

        def submit(worker, fn, *args):
            def timed(*a):
                start = time.thread_time()
                try:
                    return fn(*a)
                finally:
                    with meter._lock:
                        meter.seconds += time.thread_time() - start

            return meter._submit(worker, timed, *args)

        teacher_store.BoundedWorker.submit = submit
        return self

    def __exit__(self, *exc):
        teacher_store.BoundedWorker.submit = self._submit
        return False


def measure_write(setup, tmp, *, batch_size, reps):
    """Forward alone vs write_store over the same examples, interleaved `reps` times, both compiled first."""
    examples = setup.examples[: len(setup.examples) // batch_size * batch_size]
    tokens = np.stack([e["tokens"] for e in examples])
    batches = [tokens[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    targets_fn = jax.jit(
        lambda p, t: teacher_store.topk_targets(setup.logits_fn(p, t[:, :-1]), t[:, 1:], k=32)
    )
    jax.block_until_ready(targets_fn(setup.params, batches[0]))
    kw = dict(k=32, batch_size=batch_size, examples_per_shard=64)
    c0 = time.process_time()
    setup.write(os.path.join(tmp, "write-cold"), examples, **kw)  # compiles write_store's teacher program
    cold_cpu = time.process_time() - c0
    # Wall time, and CPU time of the whole process (XLA's and our threads): the extra CPU work the writer
    # does is what competes with a CPU teacher, and it is less sensitive to other processes than wall time.
    forward_s, write_s, forward_cpu, write_cpu, host_cpu, loads = [], [], [], [], [], [load_avg()]
    for rep in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            jax.device_get(targets_fn(setup.params, b))
        forward_s.append(time.perf_counter() - t0)
        forward_cpu.append(time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        with HostThreadCPU() as meter:
            setup.write(os.path.join(tmp, f"write-{rep}"), examples, **kw)
        write_s.append(time.perf_counter() - t0)
        write_cpu.append(time.process_time() - c0)
        host_cpu.append(meter.seconds)
        shutil.rmtree(os.path.join(tmp, f"write-{rep}"))
        loads.append(load_avg())
    overhead = np.array(write_s) / np.array(forward_s) - 1
    n_tok = len(examples) * setup.seq_len
    result = dict(
        n_tok=n_tok,
        forward_tps=n_tok / float(np.median(forward_s)),
        write_tps=n_tok / float(np.median(write_s)),
        overhead=float(np.median(overhead)),
        overhead_min=float(overhead.min()),
        overhead_max=float(overhead.max()),
        cpu_overhead=float(np.median(write_cpu) / np.median(forward_cpu) - 1),
        host_cpu_share=float(np.median(np.array(host_cpu) / np.array(write_cpu))),
        compile_cpu=cold_cpu - float(np.median(write_cpu)),
        write_median_cpu=float(np.median(write_cpu)),
        reps=reps,
        loads=loads,
    )
    print(
        f"write overhead median {100 * result['overhead']:.1f}% (min {100 * result['overhead_min']:.1f}%, "
        f"max {100 * result['overhead_max']:.1f}%) over {reps} reps; extra CPU time "
        f"{100 * result['cpu_overhead']:.1f}%, host threads' share {100 * result['host_cpu_share']:.1f}%; loads {loads}"
    )
    return result


def measure_read(setup, tmp, *, batch_size):
    """Tokens/s through StoreSource + grain, and the demo student's train step tokens/s."""
    examples = setup.examples
    path = os.path.join(tmp, "read")
    setup.write(path, examples, k=32, batch_size=batch_size, examples_per_shard=64)
    store = teacher_store.open_store(path)
    source = teacher_store.StoreSource(examples, store)
    ds = pipeline.train_dataset(source, batch_size=setup.config.batch_size, seed=0)
    it = pipeline.train_iterator(ds)
    next(it)
    t0, read_batches = time.perf_counter(), 50
    for _ in range(read_batches):
        next(it)
    read_tps = read_batches * setup.config.batch_size * setup.seq_len / (time.perf_counter() - t0)
    it.close()
    store.close()
    step_tps = train_step_tokens_per_s(setup.config, setup.vocab)
    print(f"read {read_tps:,.0f} tokens/s; train step {step_tps:,.0f} tokens/s; load {load_avg()}")
    return {"read": read_tps, "step": step_tps, "load": load_avg()}


def train_step_tokens_per_s(config, vocab):
    """Tokens/s of the demo student's train step on random tokens (compile excluded, median of 10)."""
    mesh = sharding.make_mesh({"data": -1})
    model_cfg = _model_config(config, vocab)
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=100)
    graphdef, state, shardings = steps.init_train_state(
        lambda rngs: Transformer(model_cfg, rngs=rngs),
        tx,
        seed=0,
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
    )
    batch = {
        "tokens": np.random.RandomState(0)
        .randint(0, vocab, (config.batch_size, config.data.seq_len + 1))
        .astype(np.int32)
    }
    bsh = sharding.batch_shardings(batch, mesh, sharding.DEFAULT_RULES)
    step = steps.jit_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=steps.lm_loss,
        state_shardings=shardings,
        batch_shardings=bsh,
        mesh=mesh,
    )
    batch = jax.device_put(batch, bsh)
    state, m = step(state, batch, None)
    jax.block_until_ready(m)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return config.batch_size * config.data.seq_len / float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_workdir", default="")
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--examples", type=int, default=96, help="held-out examples for the fidelity curve")
    parser.add_argument("--write_examples", type=int, default=768, help="examples per write-overhead run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved forward / write_store repetitions")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: unknown {unknown}; choose from {PARTS}")

    workdir = teacher_workdir(args, parts)
    setup = Setup(workdir, max(args.examples, args.write_examples))
    tmp = tempfile.mkdtemp(prefix="kdjax_store_bench_")
    results = {"load_start": load_avg()}
    try:
        if "fidelity" in parts:
            fidelity_setup = Setup(workdir, args.examples) if len(setup.examples) > args.examples else setup
            results["fidelity"] = measure_fidelity(fidelity_setup, tmp, batch_size=args.batch_size)
        setup.examples = setup.examples[: args.write_examples]
        if "write" in parts:
            results["write"] = measure_write(setup, tmp, batch_size=args.batch_size, reps=args.reps)
        if "read" in parts:
            results["read"] = measure_read(setup, tmp, batch_size=args.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_report(args.out, results, setup)


def plot_fidelity(rows, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype, marker in zip(DTYPES, "osd"):
        pts = [r for r in rows if r["dtype"] == dtype]
        ax.plot([r["bytes_per_token"] for r in pts], [r["kl"] for r in pts], marker=marker, label=dtype)
        for r in pts:
            ax.annotate(
                f"k={r['k']}",
                (r["bytes_per_token"], r["kl"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token on disk")
    ax.set_ylabel("KL(teacher || reconstruction), nats/token")
    ax.set_title("Teacher-store fidelity (held-out tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fidelity_section(f, setup):
    rows = f["rows"]
    lines = [
        SECTIONS["fidelity"],
        "",
        f"Teacher: `{setup.workdir}` (vocab {setup.vocab}); {f['n']} held-out examples of {setup.seq_len} tokens.",
        "KL(full teacher || reconstruction): top-k log-probs as stored, tail mass (stored in fp32) spread",
        "uniformly over the other V - k ids. Bytes/token are the store's real on-disk bytes (ids, log-probs,",
        "label log-prob, tail log-prob, example ids and token checksums, zarr shard index and crc32c) over the",
        "tokens it holds. Target: at most 4.5 k + 16.",
        "",
        "| k | log-prob dtype | bytes/token | target | KL (nats/token) | mean tail mass |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['dtype']} | {r['bytes_per_token']:.1f} | {r['target']:.0f} | "
            f"{r['kl']:.2e} | {r['tail']:.4f} |"
        )
    spread = max(
        max(r["kl"] for r in rows if r["k"] == k) - min(r["kl"] for r in rows if r["k"] == k) for k in KS
    )
    return lines + [
        "",
        f"At equal k the dtypes differ by at most {spread:.1e} nats/token (bf16 and fp16 overlap in the plot):",
        "dropping the tail costs orders of magnitude more than rounding the kept log-probs, so spend bytes on k,",
        "not on precision.",
        "",
        "![fidelity](store_fidelity.png)",
    ]


def write_section(w, setup):
    teacher = f"teacher `{setup.workdir}`" if setup.workdir else "a random teacher of the benchmark teacher's size"
    return [
        SECTIONS["write"],
        "",
        f"{w['n_tok']:,} tokens ({w['n_tok'] // setup.seq_len} examples of {setup.seq_len}) through {teacher}, "
        f"k = 32, bf16 log-probs, batch 16; {w['reps']} interleaved repetitions, medians. `write_store` runs the",
        "teacher on the main thread and pipelines the host work behind it (one thread fetches each batch's",
        "targets, checksums its tokens and assembles shards; one writes, fsyncs and records finished shards).",
        f"Load average (1/5/15 min) before and after each repetition: {', '.join(w['loads'])}.",
        "",
        "| measurement | tokens/s |",
        "|---|---:|",
        f"| teacher forward + top-k, results on host | {w['forward_tps']:,.0f} |",
        f"| the same through `write_store` (host work pipelined) | {w['write_tps']:,.0f} |",
        "",
        f"- Writing adds **{100 * w['overhead']:.1f}%** to the teacher's forward time (target <= 10%); "
        f"{100 * w['overhead_min']:.1f}% to {100 * w['overhead_max']:.1f}% across repetitions. In CPU time (all",
        f"  threads of the process, less sensitive to the machine's other load) it adds {100 * w['cpu_overhead']:.1f}%,",
        f"  of which the host threads' own work (fetch, checksums, assembly, zarr encode, sha256) is "
        f"{100 * w['host_cpu_share']:.1f}% of the",
        "  process's CPU time; the rest of the difference is spent in the teacher's (XLA's) threads.",
        f"- Not counted above: the first `write_store` call used {w['compile_cpu']:.1f} CPU-seconds more than a warm",
        f"  one ({w['write_median_cpu']:.1f}): compilation, paid once per process and teacher (later calls with the",
        "  same `logits_fn` reuse the compiled program). The old writer compiled on every call.",
        "- On CPU the teacher and the host threads share the cores, so pipelining hides only waiting (fsync,",
        "  file I/O); with an accelerator the host work runs while the device computes the next batch.",
    ]


def read_section(r):
    return [
        SECTIONS["read"],
        "",
        "| measurement | tokens/s |",
        "|---|---:|",
        f"| store read through `StoreSource` + grain (token checksums checked) | {r['read']:,.0f} |",
        f"| demo student's train step (CE-only, the cheapest step) | {r['step']:,.0f} |",
        "",
        f"- Reading delivers **{r['read'] / r['step']:.0f}x** the tokens/s the train step consumes "
        f"(target >= 20x); load average {r['load']}.",
    ]


# Not measured: what the store guarantees (kdjax/teacher_store.py has the details and tests/teacher_store_test.py
# the tests).
CHECKS = [
    "",
    "What a store guarantees (format 2; see `kdjax/teacher_store.py`):",
    "",
    "- **Provenance.** The manifest records the teacher (`teacher_fingerprint`, and where it came from), the",
    "  tokenizer (its `tokenizer.json` is kept in the store), the data set, split, example count and length.",
    "  `check_provenance` compares them with a run before its first step and names every difference; per",
    "  example, a checksum of the tokens the targets were computed from is checked by `StoreSource` for every",
    "  example it serves, so a store over other data can never hand out another text's targets.",
    "- **Integrity.** Every shard has a sha256 completion record (checked on first read) and every chunk a",
    "  crc32c; a corrupt shard fails with one `CorruptShardError` naming it. `verify_stores(root)` checks every",
    "  store under a directory (`store-train`, `store-validation`, ...).",
    "- **Crash safety.** Shards are written under temporary names and renamed into place; a rerun after a kill",
    "  writes only the missing shards, byte-identical to an uninterrupted run, with any number of processes.",
    "  A store of format 1 is refused with a message to re-run `experiments.precompute_teacher`.",
    "",
    "Each section below says when and how it was measured; `--parts` re-measures only some of them.",
]


def _old_sections(path):
    """{part: lines} of an existing page's sections, to keep those not re-measured."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read()
    out = {}
    for part, heading in SECTIONS.items():
        m = re.search(rf"^{re.escape(heading)}.*?(?=^## |\Z)", text, re.M | re.S)
        if m:
            out[part] = m.group(0).rstrip("\n").split("\n")
    return out


def write_report(out, results, setup):
    os.makedirs(out, exist_ok=True)
    page = os.path.join(out, "store.md")
    sections = _old_sections(page)
    measured = [p for p in PARTS if p in results]
    # Each section says when and how it was measured: a run of some parts keeps the others as they were.
    stamp = [
        "",
        f"_Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"CPU cores (shared), jax {jax.__version__} ({jax.default_backend()}), load average "
        f"{results['load_start']} at start, by `.venv/bin/python -m benchmarks.store --parts "
        f"{','.join(measured)}`._",
        "",
    ]
    if "fidelity" in results:
        plot_fidelity(results["fidelity"]["rows"], os.path.join(out, "store_fidelity.png"))
        section = fidelity_section(results["fidelity"], setup)
        sections["fidelity"] = [section[0], *stamp, *section[2:]]
    if "write" in results:
        section = write_section(results["write"], setup)
        sections["write"] = [section[0], *stamp, *section[2:]]
    if "read" in results:
        section = read_section(results["read"])
        sections["read"] = [section[0], *stamp, *section[2:]]
    lines = ["# Teacher store: fidelity, size and speed", *CHECKS]
    for part in PARTS:
        if part in sections:
            lines += ["", *sections[part]]
    with open(page, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
