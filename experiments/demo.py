"""`make demo`: a strong teacher, one small student distilled five ways on a limited transfer set, 3 seeds
each, and two tables: quality with error bars, and what each method costs.

  python -m experiments.demo --config configs/demo.py --workdir workdirs/demo

Stages (each reuses its finished output, so a second run only re-tabulates):
  1. the teacher, pretrained on every train file of the standard library; kept in the user cache keyed by
     its config and the corpus (configs/demo.py explains the setting), so later runs and work directories
     reuse it and a changed config trains a new one;
  2. its top-k store over the student's transfer set (W/store/store-train);
  3. the same student per method and seed (W/<method>/seed<k>): CE only, offline fkl, online fkl,
     on-policy fkl, TAID;
  4. W/results.md, W/results.json, W/results.png, W/train_ce.png.  Every number comes from the runs'
     metrics.jsonl; a difference from CE only is marked significant only when it exceeds 2 standard errors
     of the difference (Welch, seeds as samples).  Whatever the numbers say is what the tables show.
"""

import json
import math
import os
import re
import statistics
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import lm_distill, lm_pretrain, precompute_teacher
from kdjax import cli, run
from kdjax.data import text as text_data
from kdjax.metrics import read_metrics


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def teacher_dir(config, workdir):
    """Where the teacher lives: the user cache keyed by the teacher's config and the corpus fingerprint,
    or W/teacher when teacher_cache_dir is empty."""
    default = os.path.join(workdir, "teacher")
    if not config.teacher_cache_dir:
        return default
    fingerprint = text_data.load_from_config(config.teacher.data).corpus_fingerprint
    return run.keyed_model_dir(config.teacher_cache_dir, config.teacher, corpus_fingerprint=fingerprint,
                               default=default)


def store_config(config, teacher):
    """The precompute config: the teacher's top-k over exactly the data the students read."""
    from configs import precompute_teacher as pc_config  # pylint: disable=g-import-not-at-top

    pc = pc_config.get_config()
    pc.data = config.student.data.copy_and_resolve_references()
    pc.teacher.workdir = teacher
    pc.k, pc.logprob_dtype = config.store_k, config.store_dtype
    return pc


def student_config(config, mode, loss, seed, teacher, store):
    student = config.student.copy_and_resolve_references()
    student.mode, student.loss, student.seed = mode, loss, seed
    student.teacher.workdir, student.store_dir = teacher, store
    return student


def run_dir(workdir, name, seed):
    return os.path.join(workdir, slug(name), f"seed{seed}")


def run_demo(config, workdir):
    """Every stage, then the tables; returns the results dict written to W/results.json."""
    teacher = teacher_dir(config, workdir)
    print(f"== 1/3 teacher ({teacher})")
    teacher_s = run.timed_once(teacher, lambda: lm_pretrain.train(config.teacher, teacher))[1]["seconds"]

    print("== 2/3 teacher store over the transfer set")
    pc = store_config(config, teacher)
    store_root = os.path.join(workdir, "store")
    manifest, store_time = run.timed_once(store_root, lambda: precompute_teacher.precompute(pc, store_root))
    store_s = store_time["seconds"]
    store = precompute_teacher.store_path(store_root, pc)

    print(f"== 3/3 students: {len(config.runs)} methods x {len(config.seeds)} seeds")
    for name, mode, loss in config.runs:
        for seed in config.seeds:
            print(f"-- {name}, seed {seed}")
            path = run_dir(workdir, name, seed)
            run.timed_once(path, lambda: lm_distill.train(student_config(config, mode, loss, seed, teacher, store), path))
    results = tabulate(config, workdir, teacher=teacher, teacher_s=teacher_s, manifest=manifest, store_s=store_s)
    write_outputs(config, workdir, results)
    return results


# --------------------------------------------------------------------------------------------------------
# Tables: every number below is read back from the runs' metrics.jsonl (and wall_time.json).


def run_record(path, config):
    """One student run's numbers: its final evaluation and its median step time (compilation excluded)."""
    records = read_metrics(path)
    final = [r for r in records if "val/perplexity" in r][-1]
    tokens_per_step = config.student.batch_size * config.student.data.seq_len
    # The first logged window includes compilation; the median of the others is the step time.
    rates = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r][1:]
    with open(os.path.join(path, "wall_time.json")) as f:
        wall = json.load(f)["seconds"]
    return {
        "step": final["step"],
        "perplexity": final["val/perplexity"],
        "kl": final.get("val/kl"),
        "top1_agreement": final.get("val/top1_agreement"),
        "acceptance": final.get("val/acceptance"),
        "teacher_perplexity": final.get("val/teacher_perplexity"),
        "step_s": tokens_per_step / statistics.median(rates) if rates else None,
        "wall_s": wall,
    }


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(method, baseline):
    """Difference of means, its standard error (Welch: sqrt(s1^2/n1 + s2^2/n2)), whether |diff| > 2 SE (the
    table's rule), and Welch's two-sided t-test p-value, shown beside it: with 3 seeds per side the t
    distribution has few degrees of freedom, so 2 SE alone is a lenient bar (about 1 in 10 null differences
    passes it); the p-value says how lenient."""
    from scipy import stats  # pylint: disable=g-import-not-at-top

    a, b = method, baseline
    diff = statistics.fmean(a) - statistics.fmean(b)
    var = lambda x: statistics.variance(x) if len(x) > 1 else 0.0
    se = math.sqrt(var(a) / len(a) + var(b) / len(b))
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if se > 0 else float("nan")
    return diff, se, abs(diff) > 2 * se and se > 0, p


def cost_model(config, mode, loss, manifest):
    """Teacher forwards per trained student token, and student sampling forwards per token (on-policy)."""
    s = config.student
    tokens = s.steps * s.batch_size * s.data.seq_len
    if loss == "ce":
        teacher = 0.0
    elif mode == "offline":
        # The store was computed once: one teacher forward per transfer-set token, shared by every offline run.
        offline_runs = sum(1 for _, m, l in config.runs if m == "offline" and l != "ce") * len(config.seeds)
        teacher = manifest["num_tokens"] / (tokens * offline_runs)
    else:
        teacher = 1.0
    sampling = s.on_policy_fraction * (s.data.seq_len - s.prompt_len) / s.data.seq_len if mode == "on_policy" else 0.0
    return teacher, sampling


def tabulate(config, workdir, *, teacher, teacher_s, manifest, store_s):
    runs = []
    for name, mode, loss in config.runs:
        seeds = {seed: run_record(run_dir(workdir, name, seed), config) for seed in config.seeds}
        runs.append({"name": name, "mode": mode, "loss": loss, "seeds": seeds})
    base = [r["perplexity"] for r in runs[0]["seeds"].values()]
    for r in runs:
        ppl = [s["perplexity"] for s in r["seeds"].values()]
        summary = {key: mean_sd([s[key] for s in r["seeds"].values()])
                   for key in ("perplexity", "kl", "top1_agreement", "acceptance", "step_s", "wall_s")}
        diff, se, significant, p_value = compare(ppl, base)
        teacher_fwd, sampling = cost_model(config, r["mode"], r["loss"], manifest)
        r.update(summary=summary, diff=diff, diff_se=se, significant=significant and r is not runs[0], p_value=p_value,
                 relative=diff / statistics.fmean(base), teacher_forwards_per_token=teacher_fwd,
                 sampling_forwards_per_token=sampling,
                 store_bytes=manifest["total_bytes"] if r["mode"] == "offline" and r["loss"] != "ce" else 0)
    teacher_ppl = mean_sd([s["teacher_perplexity"] for r in runs for s in r["seeds"].values()])[0]
    return {
        "teacher": {"path": teacher, "seconds": teacher_s, "perplexity": teacher_ppl,
                    "ratio_to_ce_student": teacher_ppl / statistics.fmean(base) if teacher_ppl else None},
        "store": {"path": os.path.join(workdir, "store"), "seconds": store_s, "k": manifest["k"],
                  "total_bytes": manifest["total_bytes"], "bytes_per_token": manifest["bytes_per_token"],
                  "num_tokens": manifest["num_tokens"]},
        "seeds": list(config.seeds),
        "runs": runs,
    }


def _pm(mean, sd, fmt):
    return "—" if mean is None else f"{format(mean, fmt)} ± {format(sd, fmt)}"


def markdown(config, results):
    t, s, runs = results["teacher"], results["store"], results["runs"]
    st, te = config.student, config.teacher
    n = len(results["seeds"])
    lines = [
        "# kdjax demo: distillation in the data-limited regime",
        "",
        f"Teacher: {te.model.num_layers} x {te.model.embed_dim}, every train file of the standard library, "
        f"{te.steps} steps ({t['seconds']:.0f} s when trained), validation perplexity {t['perplexity']:.1f} "
        f"= {t['ratio_to_ce_student']:.2f}x the CE-only student's.  Student: {st.model.num_layers} x "
        f"{st.model.embed_dim}, {st.steps} steps of {st.batch_size} x {st.data.seq_len} tokens on a transfer set "
        f"of {st.data.train_max_files or 'all'} train files ({s['num_tokens']:,} tokens, "
        f"{st.steps * st.batch_size * st.data.seq_len / s['num_tokens']:.1f} epochs).  Distillation rows: "
        f"{st.ce_alpha} x CE + {1 - st.ce_alpha} x divergence.  {n} seeds per row (init, data order, sampling); "
        "mean ± standard deviation over seeds, on the held-out files (T = 1).",
        "",
        "| method | val perplexity | vs CE only | KL(teacher ‖ student) | top-1 agreement | acceptance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        m = r["summary"]
        if r is runs[0]:
            vs = "—"
        else:
            mark = " **(significant)**" if r["significant"] else " (within noise)"
            vs = f"{r['diff']:+.1f} ± {r['diff_se']:.1f} ({100 * r['relative']:+.1f}%, p = {r['p_value']:.2g}){mark}"
        lines.append(
            f"| {r['name']} | {_pm(*m['perplexity'], '.1f')} | {vs} | {_pm(*m['kl'], '.3f')} | "
            f"{_pm(*m['top1_agreement'], '.3f')} | {_pm(*m['acceptance'], '.3f')} |"
        )
    lines += [
        "",
        "A difference from CE only is significant when |difference| > 2 standard errors of the difference "
        "(sqrt(s_a^2/n + s_b^2/n) over the seeds); p is Welch's two-sided t-test on the same seeds (with 3 "
        "seeds a side, 2 SE is a lenient bar: read p beside it).",
        "",
        "## What each method costs",
        "",
        "| method | student step (ms) | teacher forwards / student token | student sampling forwards / token | "
        "store on disk | wall time per run (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        m = r["summary"]
        step_ms = "—" if m["step_s"][0] is None else f"{1000 * m['step_s'][0]:.0f}"
        store = f"{r['store_bytes'] / 1e6:.1f} MB ({s['bytes_per_token']:.0f} B/token)" if r["store_bytes"] else "—"
        lines.append(
            f"| {r['name']} | {step_ms} | {r['teacher_forwards_per_token']:.3g} | "
            f"{r['sampling_forwards_per_token']:.3g} | {store} | {m['wall_s'][0]:.0f} |"
        )
    lines += [
        "",
        f"Offline rows share one store, written once in {s['seconds']:.0f} s (one teacher forward per transfer-set "
        "token, amortised over every offline run in the column above).  Online and on-policy rows run the "
        "teacher on every token of every step; on-policy also samples from the student.",
        "",
        "![results](results.png)",
        "",
    ]
    return "\n".join(lines)


def write_outputs(config, workdir, results):
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(config, results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    print(text)
    plot(workdir, config, results)


def plot(workdir, config, results):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    runs = results["runs"]
    names = [r["name"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key, title in ((axes[0], "perplexity", "validation perplexity (lower is better)"),
                           (axes[1], "kl", "KL(teacher || student) (lower is better)")):
        means = [r["summary"][key][0] or 0.0 for r in runs]
        sds = [r["summary"][key][1] or 0.0 for r in runs]
        ax.barh(names, means, xerr=sds, color=["gray"] + ["tab:blue"] * (len(runs) - 1), alpha=0.6)
        for i, r in enumerate(runs):  # every seed as a dot: the spread the error bar summarises
            values = [s[key] for s in r["seeds"].values() if s[key] is not None]
            ax.plot(values, [i] * len(values), "k.", markersize=4)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    axes[1].set_yticklabels([])
    if results["teacher"]["perplexity"]:
        axes[0].axvline(results["teacher"]["perplexity"], color="tab:green", ls="--", label="teacher")
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "results.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        recs = [m for m in read_metrics(run_dir(workdir, r["name"], config.seeds[0])) if "train/ce" in m]
        ax.plot([m["step"] for m in recs], [m["train/ce"] for m in recs], label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"train cross-entropy on the batch (seed {config.seeds[0]})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "train_ce.png"), dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    # Seeds 2 and 3 of a method compile the same programs as seed 1: the persistent cache skips that.
    cli.enable_compilation_cache(os.path.join(os.path.expanduser("~/.cache/kdjax"), "jax"))
    cli.run_main(lambda: run_demo(config, workdir))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/demo.py"))
    flags.DEFINE_string("workdir", None, "Where every stage's outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
