"""Runs every benchmark at one size and writes docs/benchmarks.md with its PNGs (what `make bench` does).

  .venv/bin/python -m benchmarks.run_all [--size cpu|issue] [--out docs] [--skip_store]

The page is assembled from the values the benchmarks return, and every table in it is printed to stdout as
it is produced, so the page shows exactly the numbers the command printed.  The teacher-store benchmark
(`benchmarks.store`) runs as its own process, writes docs/store.md, and its page is folded in.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import jax
import numpy as np

from benchmarks import memory, mfu, online_profile, scan_remat
from benchmarks import step_vs_pytorch as svp

COMMAND = "make bench"


def machine():
    """One line naming the CPU, cores, memory, load and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError):
        mem = ""
    import torch  # pylint: disable=g-import-not-at-top

    load = ", load average {:.1f}/{:.1f}/{:.1f} at start".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    th = svp.thread_settings()
    return (
        f"{cpu}, {os.cpu_count()} CPU cores ({th['cpus']} usable){mem}{load}; {platform.system()} "
        f"{platform.release()}; python {platform.python_version()}, jax {jax.__version__} (backend "
        f"{jax.default_backend()}, {th['jax_threads']}, XLA_FLAGS={th['xla_flags']!r}), torch {torch.__version__} "
        f"(torch.get_num_threads() = {th['torch_threads']}, interop {th['torch_interop_threads']})"
    )


def run_scan_remat(out):
    """`benchmarks.scan_remat` in its own process (it needs 8 fake devices); its results dict, or None."""
    path = os.path.join(out, ".scan_remat.json")
    cmd = [sys.executable, "-m", "benchmarks.scan_remat", "--json", path, "--compile_repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(proc.stdout, end="")
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return None
    with open(path) as f:
        result = json.load(f)
    os.remove(path)
    return result


def run_store(out, extra_args=()):
    """`benchmarks.store` in its own process; returns its page (or None when it failed) and its stdout."""
    cmd = [sys.executable, "-m", "benchmarks.store", "--out", out, *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(proc.stdout, end="")
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return None
    with open(os.path.join(out, "store.md")) as f:
        return f.read()


def store_summary(page):
    """(worst bytes/token over target among bf16 rows, read/step ratio) parsed from the store page."""
    over = []
    for k, dtype, bpt, target in re.findall(r"^\| (\d+) \| (\w+) \| ([\d.]+) \| (\d+) \|", page, re.M):
        if dtype == "bfloat16":
            over.append((float(bpt) / float(target), int(k), float(bpt), float(target)))
    read = re.search(r"Reading delivers \*\*([\d.]+)x\*\*", page)
    return (max(over) if over else None), (float(read.group(1)) if read else None)


def store_write_overhead(page):
    """The write overhead in percent from the store page, or None."""
    m = re.search(r"Writing adds \*\*(-?[\d.]+)%\*\*", page)
    return float(m.group(1)) if m else None


def plot_step(results, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r["kdjax_tps"] for r in results], 0.4, label="kdjax")
    ax.bar(x + 0.2, [r["torch_tps"] for r in results], 0.4, label="PyTorch + transformers")
    for i, r in enumerate(results):
        ax.annotate(f"{r['ratio']:.1f}x", (i - 0.2, r["kdjax_tps"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['mode']} KD step" + (" (fused head)" if r.get("chunk_size") else "") for r in results])
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("KD step throughput, same model and data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_mfu(r, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(5, 3.2))
    vals = [r["peak"] / 1e9, r["achieved"] / 1e9, 0.7 * r["peak"] / 1e9]
    ax.barh(["matmul peak", "online KD step", "target (70%)"], vals, color=["gray", "C0", "none"],
            edgecolor=["gray", "C0", "C3"], linestyle="-")
    ax.set_xlabel("GFLOP/s")
    ax.set_title(f"Model FLOPs utilisation: {100 * r['mfu']:.0f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def closing_notes(step_results, mfu_r, mem_r, store_page):
    """Why each missed target is missed and what would close it, using the measured numbers."""
    notes = []
    offline = next((r for r in step_results if r["mode"] == "offline"), None)
    for r in step_results:
        if r["ratio"] >= 3:
            continue
        load = r.get("load", (float("nan"),) * 2)
        note = (
            f"- **kdjax vs PyTorch, {_label(r)}: {r['ratio']:.2f}x (fastest steps {r['best_ratio']:.2f}x; load "
            f"{load[0]:.1f} before, {load[1]:.1f} after), short of 3x by {3 / r['ratio']:.2f}x.**  "
        )
        if r["mode"] == "online" and offline is not None:
            note += (
                f"Without the teacher in the step kdjax is {offline['ratio']:.1f}x faster "
                f"({1e3 * offline['kdjax_s']:.0f} vs {1e3 * offline['torch_s']:.0f} ms).  Adding the teacher costs kdjax "
                f"{1e3 * (r['kdjax_s'] - offline['kdjax_s']):.0f} ms but PyTorch "
                f"{1e3 * (r['torch_s'] - offline['torch_s']):.0f} ms.  Where kdjax's time goes is in section 1's "
                "profile: the teacher forward in the step costs what it costs alone (plain fp32 matmuls, where "
                "XLA:CPU is no faster than oneDNN); the rest is [B, T, V] elementwise passes of the dense JSD and of "
                "the cross-entropy's gradient, which the fused head (its own row) and the two library changes named "
                "there remove.  On 2 cores shared with other processes both contenders' medians move by tens of "
                "percent between rounds: read the per-round ratios and their spread, and rerun on a quiet machine "
                "(load < 1) before comparing with the 3x target."
            )
        notes.append(note)
    if mfu_r["mfu"] < 0.7:
        notes.append(
            f"- **MFU {100 * mfu_r['mfu']:.1f}% of the measured matmul peak ({mfu_r['achieved'] / 1e9:.1f} of "
            f"{mfu_r['peak'] / 1e9:.1f} GFLOP/s), {70 - 100 * mfu_r['mfu']:.1f} points short of 70%.**  The peak "
            f"is one {mfu_r['matmul_n']}-wide square matmul; the step's matmuls are thin "
            f"(D = {mfu_r.get('student_dim', '?')} for the student, {mfu_r.get('teacher_dim', '?')} for the "
            "teacher) and reach a fraction of that rate, and the step also spends time on work the model-FLOPs "
            "count ignores: softmaxes and the JSD over [B, T, V], attention softmax, norms, GELU, the gradient "
            "clip and AdamW over every parameter, none of which overlaps with matmuls on 2 shared cores.  What "
            "closes it: larger D and batch (bigger matmuls; `--size issue` was not run within the 10-minute "
            "budget), and on a GPU bf16 with the "
            "[B, T, V] loss fused into the LM-head matmul (a chunked log-softmax/JSD kernel), so the "
            "vocabulary-sized elementwise passes stop costing memory bandwidth."
        )
    worst = max(mem_r["rows"], key=lambda row: row["topk"]["peak"] / row["ce"]["peak"])
    ratio = worst["topk"]["peak"] / worst["ce"]["peak"]
    if ratio > 1.25:
        best = min(row["topk"]["peak"] / row["ce"]["peak"] for row in mem_r["rows"])
        btv = mem_r["batch"] * worst["seq_len"] * worst["vocab"] * 4
        extra = (worst["topk"]["temp"] - worst["ce"]["temp"]) / btv
        notes.append(
            f"- **Top-k KD peak memory up to {ratio:.2f}x the CE-only step (V = {worst['vocab']:,}, "
            f"T = {worst['seq_len']}), {ratio / 1.25:.2f}x over the 1.25x target.**  Its temporaries exceed "
            f"CE's by {extra:.1f} float32 [B, T, V] buffers: the tail bucket needs the student's full "
            "log-normaliser, which the loss computes apart from the cross-entropy's log-softmax, so its gradient "
            f"is a second softmax over V.  Elsewhere in the table it is as low as {best:.2f}x (XLA reuses buffers "
            "at the smaller shapes).  What "
            "closes it: compute one student log-softmax for both terms, or a chunked (over V or T) loss so no "
            "[B, T, V] gradient is held whole."
        )
    if store_page:
        (over, k, bpt, target), read = store_summary(store_page)
        if over > 1:
            notes.append(f"- **Store at k = {k}: {bpt:.1f} bytes/token vs {target:.0f}, {over:.2f}x over.**")
        if read is not None and read < 20:
            notes.append(f"- **Store reads {read:.0f}x the step's consumption, short of 20x.**")
        overhead = store_write_overhead(store_page)
        if overhead is not None and overhead > 10:
            notes.append(
                f"- **Store write overhead {overhead:.1f}%, over the store benchmark's own 10% target by "
                f"{overhead - 10:.1f} points** (not one of the issue's targets).  It is the ratio of two best-of-3 "
                "timings, with the zarr writer's threads competing for the same 2 cores as "
                "the teacher's forward and as the other processes on the machine; on an idle machine the "
                "write overlaps the forward, on a loaded one it queues behind it.  More cores (or a GPU teacher, "
                "which leaves the CPU to the writer) close it."
            )
    if not notes:
        notes.append("- Every target was met in this run.")
    return notes


def _label(r):
    return r["mode"] + (f", fused head chunk {r['chunk_size']}" if r.get("chunk_size") else "")


def chunked_targets(mem_r):
    """Issue 18's fused-head memory rows at the largest V and T measured (when the chunked kinds ran)."""
    if not all(kind in mem_r.get("kinds", ()) for kind in memory.KINDS):
        return []
    row = max(mem_r["rows"], key=lambda r: (r["vocab"], r["seq_len"]))
    dense = row["dense_chunked"]["peak"] / row["ce"]["peak"]
    topk = row["topk_chunked"]["peak"] / row["ce_chunked"]["peak"]
    where = f"V = {row['vocab']:,}, T = {row['seq_len']}"
    return [
        f"| chunked dense KD peak <= 0.35x unfused CE-only ({where}) | {dense:.2f}x | "
        + ("met" if dense <= 0.35 else f"missed by {dense / 0.35:.2f}x") + " |",
        f"| chunked top-k KD peak <= 1.05x chunked CE ({where}) | {topk:.2f}x | "
        + ("met" if topk <= 1.05 else f"missed by {topk / 1.05:.2f}x") + " |",
    ]


def scan_targets(sr):
    if not sr:
        return []
    c, m, f = sr["compile"], sr["remat"], sr["fsdp"]
    involuntary = f["fsdp"]["involuntary"]
    return [
        f"| {c['layers']} scanned layers compile >= 4x faster than unscanned (load {c['load_before']:.1f}) | "
        f"{c['speedup']:.1f}x | " + ("met" if c["speedup"] >= 4 else f"missed by {4 / c['speedup']:.2f}x") + " |",
        f"| `full` remat cuts step temporaries >= 2x ({m['layers']} layers) | {m['full_cut']:.2f}x | "
        + ("met" if m["full_cut"] >= 2 else f"missed by {2 / m['full_cut']:.2f}x") + " |",
        f"| pure FSDP (1, 8, 1): state + temporaries <= 1/6 of 1 device, no involuntary rematerialisation | "
        f"{f['fraction']:.3f}, {involuntary} logged | "
        + ("met" if f["fraction"] <= 1 / 6 and not involuntary else "missed") + " |",
    ]


def write_page(out, *, size, step_results, mfu_r, mem_r, store_page, started, seconds, command=COMMAND,
               scan_r=None, profile_r=None):
    os.makedirs(out, exist_ok=True)
    plot_step(step_results, os.path.join(out, "bench_step.png"))
    plot_mfu(mfu_r, os.path.join(out, "bench_mfu.png"))
    memory.plot(mem_r, os.path.join(out, "bench_memory.png"))

    online = [r for r in step_results if r["mode"] == "online"]
    worst_mem = max(row["topk"]["peak"] / row["ce"]["peak"] for row in mem_r["rows"])
    targets = [
        "| target | measured | verdict |",
        "|---|---:|---|",
    ]
    for r in step_results:
        load = r.get("load")
        where = f", load {load[0]:.1f}" if load else ""
        targets.append(
            f"| kdjax >= 3x PyTorch tokens/s ({_label(r)}{where}) | {r['ratio']:.2f}x | "
            + ("met" if r["ratio"] >= 3 else f"missed by {3 / r['ratio']:.2f}x") + " |"
        )
    targets.append(
        f"| distill step >= 70% of the matmul peak | {100 * mfu_r['mfu']:.1f}% | "
        + ("met" if mfu_r["mfu"] >= 0.7 else f"missed by {70 - 100 * mfu_r['mfu']:.1f} points") + " |"
    )
    targets.append(
        f"| top-k KD peak memory <= 1.25x CE-only (worst V, T) | {worst_mem:.2f}x | "
        + ("met" if worst_mem <= 1.25 else f"missed by {worst_mem / 1.25:.2f}x") + " |"
    )
    targets += chunked_targets(mem_r)
    targets += scan_targets(scan_r)
    if store_page:
        (over, k, bpt, target), read = store_summary(store_page)
        targets.append(
            f"| store <= 4.5 k + 16 bytes/token (bf16, worst k = {k}) | {bpt:.1f} (target {target:.0f}) | "
            + ("met" if over <= 1 else f"missed by {over:.2f}x") + " |"
        )
        overhead = store_write_overhead(store_page)
        if overhead is not None:
            targets.append(
                f"| store write overhead <= 10% of the teacher forward (the store benchmark's own) | "
                f"{overhead:.1f}% | " + ("met" if overhead <= 10 else f"missed by {overhead - 10:.1f} points") + " |"
            )
        if read is not None:
            targets.append(
                f"| store reads >= 20x step consumption | {read:.0f}x | "
                + ("met" if read >= 20 else f"missed by {20 / read:.1f}x") + " |"
            )

    lines = [
        "# Benchmarks",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{command}` (size `{size['name']}`, {seconds / 60:.1f} minutes "
        "in all). Every number below is one the command printed.",
        "",
        f"Machine: {machine()}.",
        "",
        "CPU timings on a shared machine are noisy: the contenders alternate and each reports a median, so "
        "a burst of load from elsewhere hits both.  The same scripts run unchanged on a GPU "
        "(`--size issue` gives the issue's shapes).",
        "",
        "## Targets",
        "",
        *targets,
        "",
        "## 1. KD step: kdjax vs PyTorch (`benchmarks/step_vs_pytorch.py`)",
        "",
        "Same GPT-2 teacher and student, same initial weights (copied from kdjax into "
        "`transformers.GPT2LMHeadModel`), same tokens, same optimizer (clip 1.0, AdamW 0.9/0.95, wd 0.1 on "
        "matrices, the same learning-rate schedule), generalized JSD(beta = 0.5).  kdjax runs its real "
        "`steps.jit_train_step` + `distill.make_loss_fn`; PyTorch runs eager with "
        f"`torch.set_num_threads({os.cpu_count()})` and a plain-torch JSD of the same formula.  "
        "`tests/benchmarks_test.py` checks that both sides give the same losses over several steps.",
        "",
        svp.markdown(size, step_results),
        "",
        "![step throughput](bench_step.png)",
        "",
        "### Where the online step's time goes (`benchmarks/online_profile.py`)",
        "",
        online_profile.markdown(size, profile_r) if profile_r else "Not run (`--skip_profile`).",
        "",
        "Reading it: the teacher costs in the step what it costs alone, so the gap issue 18 measured is not the "
        "teacher.  It is [B, T, V] work: the dense JSD's passes (removed by the fused head, `loss_chunk_size`, "
        "which never builds [B, T, V]) and the cross-entropy's gradient, which `losses.cross_entropy` takes "
        "through a materialised [B, T, V] log-softmax and a gathered log-probability (a scatter in the backward "
        "pass) where logsumexp(z) - z[label] gives the same value with one softmax in the backward.  Two library "
        "changes remove what is ours (see docs/benchmarks.md's closing note): that CE formulation in "
        "`kdjax/losses.py`, and in `kdjax/distill.py` no CE gradient at all when ce_alpha = 0 (today 0 * CE is "
        "differentiated: the online step's program holds the CE's scatter).",
        "",
        "## 2. Model FLOPs utilisation (`benchmarks/mfu.py`)",
        "",
        "Model FLOPs per step = 6·N_s·tokens + 12·L_s·T·D_s·tokens (student forward + backward) + "
        "2·N_t·tokens + 4·L_t·T·D_t·tokens (teacher forward), with N the matmul parameters (blocks + tied "
        "LM head; not the position table or the embedding gather) and the attention terms QK^T and PV over "
        "the full T x T square.  Softmax, norms, loss and optimizer are not counted.",
        "",
        mfu.markdown(size, mfu_r),
        "",
        "![mfu](bench_mfu.png)",
        "",
        "## 3. Compiled memory vs vocabulary (`benchmarks/memory.py`)",
        "",
        "`jit(...).lower(abstract inputs).compile().memory_analysis()` for the CE-only step, dense-teacher "
        "(online) KD and top-k KD; nothing is allocated.  Dense KD grows with V twice over (the teacher's "
        "logits and the JSD's [B, T, V] intermediates); top-k KD holds the same student [B, T, V] buffers as "
        "CE plus [B, T, k] targets.",
        "",
        memory.markdown(mem_r),
        "",
        "![memory](bench_memory.png)",
        "",
        "## 4. Scanned layers, remat and FSDP memory (`benchmarks/scan_remat.py`)",
        "",
        scan_remat.markdown(scan_r) if scan_r else "Not run (`--skip_scan`) or failed; see the command's output.",
        "",
        "## 5. Teacher store (`benchmarks/store.py`)",
        "",
    ]
    if store_page:
        body = store_page.split("\n", 1)[1]  # drop its title; demote its sections under this one
        lines += [body.replace("\n## ", "\n### ").strip(), "", "(Also written alone as [store.md](store.md).)"]
    else:
        lines += ["Not run (`--skip_store`) or failed; see the command's output."]
    lines += [
        "",
        "## Closing note: missed targets",
        "",
        *closing_notes(step_results, mfu_r, mem_r, store_page),
        "",
    ]
    path = os.path.join(out, "benchmarks.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(targets))
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svp.add_size_args(parser)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--skip_store", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--vocabs", default="8192,32768,131072")
    parser.add_argument("--seq_lens", default="128,512")
    parser.add_argument("--command", default=COMMAND, help="how the page says it was produced")
    parser.add_argument("--skip_scan", action="store_true")
    parser.add_argument("--skip_profile", action="store_true")
    parser.add_argument("--scan_json", default="", help="results of `benchmarks.scan_remat --json` to use instead of "
                        "running it (read after the other benchmarks)")
    parser.add_argument("--reuse_store", action="store_true",
                        help="with --skip_store: fold in the store page already in --out (dated by its own header)")
    parser.add_argument("--chunk_size", type=int, default=256, help="the fused-head rows' tokens per chunk")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per contender pair")
    parser.add_argument("--max_rounds", type=int, default=6, help="more rounds while the ratios spread > 15%%")
    args = parser.parse_args()
    size = svp.resolve_size(args)
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.time()

    store_page = None if args.skip_store else run_store(args.out)
    if args.skip_store and args.reuse_store and os.path.exists(os.path.join(args.out, "store.md")):
        with open(os.path.join(args.out, "store.md")) as f:
            store_page = f.read()
    scan_r = None if args.skip_scan or args.scan_json else run_scan_remat(args.out)
    step_results = []
    for mode, chunk in (("online", 0), ("online", args.chunk_size), ("offline", 0)):
        step_results.append(svp.run(size, mode=mode, warmup=args.warmup, iters=args.iters, chunk_size=chunk,
                                    rounds=args.rounds, max_rounds=args.max_rounds))
    print(svp.markdown(size, step_results), flush=True)
    profile_r = None if args.skip_profile else online_profile.run(size, chunk_size=args.chunk_size)
    if profile_r:
        print(online_profile.markdown(size, profile_r), flush=True)
    mfu_r = mfu.run(size, matmul_n=args.matmul_n, warmup=args.warmup, iters=args.iters)
    mfu_r.update(student_dim=size["student_dim"], teacher_dim=size["teacher_dim"])
    print(mfu.markdown(size, mfu_r), flush=True)
    mem_r = memory.run(
        vocabs=tuple(int(v) for v in args.vocabs.split(",")),
        seq_lens=tuple(int(t) for t in args.seq_lens.split(",")),
    )
    print(memory.markdown(mem_r), flush=True)
    if args.scan_json:
        with open(args.scan_json) as f:
            scan_r = json.load(f)
    write_page(
        args.out,
        size={**size, "name": args.size},
        step_results=step_results,
        mfu_r=mfu_r,
        mem_r=mem_r,
        store_page=store_page,
        started=started,
        seconds=time.time() - t0,
        command=args.command,
        scan_r=scan_r,
        profile_r=profile_r,
    )


if __name__ == "__main__":
    main()
