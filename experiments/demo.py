"""`make demo`: teacher -> offline store -> one student distilled six ways at the same budget -> results table.

  python -m experiments.demo --config configs/demo.py --workdir workdirs/demo

Stages (each reuses its finished output, so a second run only re-tabulates):
  1. pretrain the teacher on the default corpus (W/teacher);
  2. precompute its top-k store over the train split (W/store/store-train);
  3. train the same student with CE only, offline fkl, offline jsd(0.5), online rkl, on-policy jsd, TAID (W/<run>);
  4. W/results.md and W/results.png: validation perplexity, KL(teacher || student), top-1 agreement,
     acceptance and wall time of each run.  Whatever the numbers say is what the table shows.
"""

import json
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import lm_distill, lm_pretrain, precompute_teacher
from kdjax import cli
from kdjax.metrics import read_metrics


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def timed(workdir, fn):
    """Runs fn() once; records its wall time in W/wall_time.json so a rerun reports the original run's time."""
    path = os.path.join(workdir, "wall_time.json")
    t0 = time.perf_counter()
    result = fn()
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"seconds": time.perf_counter() - t0}, f)
    with open(path) as f:
        return result, json.load(f)["seconds"]


def run_demo(config, workdir):
    teacher_dir = os.path.join(workdir, "teacher")
    print("== 1/3 teacher")
    teacher_val, teacher_s = timed(teacher_dir, lambda: lm_pretrain.train(config.teacher, teacher_dir))

    print("== 2/3 teacher store")
    pc = precompute_teacher_config(config, teacher_dir)
    store_root = os.path.join(workdir, "store")
    _, store_s = timed(store_root, lambda: precompute_teacher.precompute(pc, store_root))

    print("== 3/3 students")
    rows = []
    for name, mode, loss in config.runs:
        student = config.student.copy_and_resolve_references()
        student.mode, student.loss = mode, loss
        student.teacher.workdir = teacher_dir
        student.store_dir = precompute_teacher.store_path(store_root, pc)
        run_dir = os.path.join(workdir, slug(name))
        print(f"-- {name}")
        val, seconds = timed(run_dir, lambda: lm_distill.train(student, run_dir))
        rows.append(dict(name=name, seconds=seconds, **val))
    write_results(workdir, rows, teacher_val, teacher_s, store_s, config)


def precompute_teacher_config(config, teacher_dir):
    from configs import precompute_teacher as pc_config  # pylint: disable=g-import-not-at-top

    pc = pc_config.get_config()
    pc.data = config.teacher.data
    pc.teacher.workdir = teacher_dir
    pc.k = config.store_k
    pc.logprob_dtype = config.store_dtype
    return pc


def write_results(workdir, rows, teacher_val, teacher_s, store_s, config):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    base = rows[0]["val/perplexity"]
    lines = [
        "# kdjax demo: one student, six ways to train it",
        "",
        f"Teacher: {config.teacher.model.num_layers} layers x {config.teacher.model.embed_dim} "
        f"({config.teacher.steps} steps, {teacher_s:.0f} s), validation perplexity "
        f"{teacher_val['val/perplexity']:.1f}. Store: top-{config.store_k} {config.store_dtype} ({store_s:.0f} s).",
        f"Student: {config.student.model.num_layers} layers x {config.student.model.embed_dim}, "
        f"{config.student.steps} steps of {config.student.batch_size} x {config.student.data.seq_len} tokens each, "
        f"same data order in every run; distillation runs use {config.student.ce_alpha} x CE + "
        f"{1 - config.student.ce_alpha} x divergence. Metrics on held-out standard-library files (T = 1).",
        "",
        "| run | val perplexity | vs CE only | KL(teacher ‖ student) | top-1 agreement | acceptance | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['val/perplexity']:.1f} | {100 * (r['val/perplexity'] / base - 1):+.1f}% | "
            f"{r.get('val/kl', float('nan')):.3f} | {r.get('val/top1_agreement', float('nan')):.3f} | "
            f"{r.get('val/acceptance', float('nan')):.3f} | {r['seconds']:.0f} s |"
        )
    lines += ["", "![results](results.png)", ""]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:-2]))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [r["name"] for r in rows]
    for ax, (key, title) in zip(
        axes,
        [
            ("val/perplexity", "validation perplexity (lower is better)"),
            ("val/kl", "KL(teacher || student) (lower is better)"),
            ("seconds", "wall time, s"),
        ],
    ):
        ax.barh(names, [r.get(key, 0.0) for r in rows], color=["gray"] + ["tab:blue"] * (len(rows) - 1))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "results.png"), dpi=110)
    plt.close(fig)
    # One curve per run: validation perplexity is only at the end; train loss shows the path.
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        recs = [m for m in read_metrics(os.path.join(workdir, slug(r["name"]))) if "train/ce" in m]
        ax.plot([m["step"] for m in recs], [m["train/ce"] for m in recs], label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("train cross-entropy on the batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "train_ce.png"), dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run_demo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to configs/demo.py (with :arg).")
    flags.DEFINE_string("workdir", None, "Where every stage's outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
