"""Guided distillation end to end: conditional teacher -> stage 1 -> stage 2 halvings -> evaluation and results.

  python -m experiments.guided_distill --config configs/guided_distill.py:digits --workdir W [--config.k=v]

Stages, each in its own directory and resumable (a rerun finishes what is missing, then re-evaluates):
  W/teacher              the conditional teacher with label dropout (experiments.diffusion_teacher), and for
                         image data W/teacher/classifier, the metrics' classifier;
  W/stage1               a student taking w (Fourier features added to its time embedding) regresses the
                         guided teacher  (1 + w) x(z, c) - w x(z, null),  w ~ U[w_min, w_max]; initialised
                         from the teacher (its w weights start at zero);
  W/stage2_n<N>          progressive distillation to N steps from the 2N-step student (N = start/2 .. min),
                         each initialised from, and taught by, the previous one at the same w.
Then W/results.json, W/results.md, W/samples_<model>.png (sample grids) and W/fd_vs_steps.png.  See
docs/diffusion.md for the formulas and a measured table.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments import diffusion_teacher as teacher_lib
from kdjax import cli, diffusion, hostio, run, sample_metrics, sharding, steps
from kdjax.data import images
from kdjax.models.denoiser import Denoiser
from kdjax.models.image_classifier import ClassifierConfig, ImageClassifier

STAGE_KEYS = ("steps", "learning_rate", "batch_size", "warmup_steps", "weighting")
SHARED_KEYS = ("seed", "accum_steps", "weight_decay", "grad_clip", "log_every", "eval_every", "checkpoint_every",
               "mesh", "sharding_rules", "distributed", "debug_sleep_per_step", "allow_resume_changes", "w_min", "w_max")


# ------------------------------------------------------------------------------------------------------
# Validation and the plan.


def halvings(config) -> list[int]:
    """The stage-2 student step counts: start/2, start/4, ..., min_steps."""
    out, n = [], config.stage2.start_steps
    while n > config.stage2.min_steps:
        n = diffusion.halve_steps(n)
        out.append(n)
    return out


def validate(config):
    """Every check that needs no data or model, before anything is read or written."""
    with run.Problems("guided_distill config") as p:
        if config.teacher_workdir:
            run.check_path(p, config.teacher_workdir, "teacher_workdir", must_contain=teacher_lib.MODEL_CONFIG_FILE)
        else:
            p.run(teacher_lib.validate, config.teacher)
        p.check(0.0 <= config.w_min < config.w_max, f"need 0 <= w_min < w_max, got [{config.w_min}, {config.w_max}]")
        s2 = config.stage2
        p.check(diffusion.is_power_of_two(s2.start_steps) and diffusion.is_power_of_two(s2.min_steps)
                and s2.min_steps < s2.start_steps,
                f"stage2.start_steps={s2.start_steps} and min_steps={s2.min_steps} must be powers of two with "
                "min_steps < start_steps (each stage halves N)")
        for name in ("stage1", "stage2"):
            p.run(run.check_common, p.prefixed(name), stage_run_config(config, name))
            weighting = config[name].get("weighting")
            p.check(weighting in diffusion.WEIGHTINGS,
                    f"{name}.weighting={weighting!r}; expected one of {diffusion.WEIGHTINGS}")
        ladder = set(halvings(config)) if not p.items else set()
        for n in config.eval.student_steps:
            p.check(not ladder or n in ladder, f"eval.student_steps has {n}, not a stage-2 step count {sorted(ladder)}")
        for n in config.eval.teacher_steps:
            p.check(isinstance(n, int) and n >= 1, f"eval.teacher_steps must be positive ints, got {n!r}")
        for w in config.eval.ws:
            p.check(config.w_min <= w <= config.w_max, f"eval.ws has w={w}, outside [w_min, w_max]")
        p.check(config.eval.num_samples >= 2 * config.eval.precision_recall_k + 2, "eval.num_samples is too small")
        p.run(sharding.make_mesh, config.mesh)


def stage_run_config(config, stage: str, **identity):
    """A stage's own config (what kdjax.run reads and records in its W/<stage>/config.json)."""
    c = config.copy_and_resolve_references()
    out = {k: c[stage][k] for k in STAGE_KEYS}
    out.update({k: c[k] for k in SHARED_KEYS})
    out.update(identity)
    import ml_collections  # pylint: disable=g-import-not-at-top

    return ml_collections.ConfigDict(out)


# ------------------------------------------------------------------------------------------------------
# Training stages.


def _copy(tree):
    # Train steps donate their state: the teacher's arrays must not be the student's starting buffers.
    return jax.tree.map(lambda x: x.copy(), tree)


def stage1_loss_fn(student_cfg, teacher_graphdef, teacher_cfg, *, w_min, w_max, weighting):
    def loss_fn(model, batch, rng, frozen, extra):
        del extra
        teacher_x = teacher_lib.x_predictor(nnx.merge(teacher_graphdef, frozen), teacher_cfg)
        total, count = diffusion.guided_distill_loss(
            teacher_lib.x_predictor(model, student_cfg), teacher_x, batch["x"], batch["label"], rng,
            w_min=w_min, w_max=w_max, null_class=teacher_cfg.null_class, weighting=weighting,
        )
        return total, count, {"weighted_mse": (total, count)}

    return loss_fn


def stage2_loss_fn(student_cfg, teacher_graphdef, *, num_student_steps, w_min, w_max, weighting):
    def loss_fn(model, batch, rng, frozen, extra):
        del extra
        teacher_x = teacher_lib.x_predictor(nnx.merge(teacher_graphdef, frozen), student_cfg)
        total, count = diffusion.progressive_distill_loss(
            teacher_lib.x_predictor(model, student_cfg), teacher_x, batch["x"], batch["label"], rng,
            num_student_steps=num_student_steps, w_min=w_min, w_max=w_max, weighting=weighting,
        )
        return total, count, {"weighted_mse": (total, count)}

    return loss_fn


def train_stage(stage_config, workdir, *, data, student_cfg, teacher, loss_fn, init_params, desc):
    """Trains one student (resuming if W/checkpoints has a run); `teacher` = (graphdef, params, shardings)."""
    mesh, rules = sharding.make_mesh(stage_config.mesh), tuple(stage_config.sharding_rules)
    run.prepare_workdir(workdir, stage_config)
    teacher_lib.save_model_config(workdir, student_cfg)
    tx = run.make_optimizer(stage_config)
    spec = steps.train_state_spec(lambda rngs: Denoiser(student_cfg, rngs=rngs), tx, seed=stage_config.seed,
                                  mesh=mesh, rules=rules)
    data_iter, batch_sh = teacher_lib.training_data(data.train, stage_config, mesh)
    train_step = steps.jit_train_step(graphdef=spec.graphdef, tx=tx, loss_fn=teacher_lib.chunked(loss_fn),
                                      state_shardings=spec.shardings,
                                      batch_shardings=batch_sh, mesh=mesh, frozen_shardings=teacher[2])
    eval_batch = teacher_lib.fixed_batch(data.test, stage_config.batch_size)
    eval_loss = jax.jit(lambda params, frozen, batch: (lambda t, c, _: t / c)(
        *loss_fn(nnx.merge(spec.graphdef, params), batch, jax.random.key(99), frozen, None)))
    _, val = run.fit(
        workdir, stage_config, spec=spec, data_iter=data_iter,
        train_step=train_step, batch_shardings=batch_sh, frozen=teacher[1], tokens_per_step=stage_config.batch_size,
        run_eval=lambda params: {"val/loss": float(eval_loss(params, teacher[1], eval_batch))},
        init_params=init_params() if not _has_checkpoint(workdir) else None, desc=desc,
    )
    return val


def _has_checkpoint(workdir):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def train_all(config, workdir):
    """Teacher (unless given), classifier (images), stage 1, the stage-2 halvings.  Returns the stage dirs."""
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    teacher_dir = config.teacher_workdir or os.path.join(workdir, "teacher")
    times = {}
    if not config.teacher_workdir:
        print("== teacher")
        _, times["teacher"] = run.timed_once(teacher_dir, lambda: teacher_lib.train(config.teacher, teacher_dir))
    data = images.load_from_config(_data_config(config, teacher_dir))
    if data.mixture is None:
        print("== classifier")
        clf_dir = os.path.join(teacher_dir, "classifier")
        _, times["classifier"] = run.timed_once(clf_dir, lambda: teacher_lib.train_classifier(config.teacher, clf_dir))
    teacher_cfg = teacher_lib.load_model_config(teacher_dir)
    student_cfg = teacher_cfg.__class__(**{**teacher_cfg.__dict__, "guidance_embed": True, "w_scale": config.w_max})
    teacher = teacher_lib.load_params(teacher_dir, lambda r: Denoiser(teacher_cfg, rngs=r), mesh=mesh, rules=rules)

    print("== stage 1: guided teacher -> w-conditioned student")
    s1 = stage_run_config(config, "stage1", teacher_workdir=os.path.abspath(teacher_dir))
    s1_dir = os.path.join(workdir, "stage1")

    def stage1_init():
        params = steps.train_state_spec(lambda r: Denoiser(student_cfg, rngs=r), run.make_optimizer(s1),
                                        seed=s1.seed, mesh=mesh, rules=rules).init().params
        return student_from_teacher(params, teacher[1])

    loss = stage1_loss_fn(student_cfg, teacher[0], teacher_cfg, w_min=config.w_min, w_max=config.w_max,
                          weighting=s1.weighting)
    _, times["stage1"] = run.timed_once(s1_dir, lambda: train_stage(s1, s1_dir, data=data, student_cfg=student_cfg,
                                                           teacher=teacher, loss_fn=loss, init_params=stage1_init,
                                                           desc="stage 1"))
    dirs, prev_dir = {config.stage2.start_steps: s1_dir}, s1_dir
    for n in halvings(config):
        print(f"== stage 2: {2 * n} -> {n} steps")
        prev = teacher_lib.load_params(prev_dir, lambda r: Denoiser(student_cfg, rngs=r), mesh=mesh, rules=rules)
        sc = stage_run_config(config, "stage2", num_student_steps=n, teacher_workdir=os.path.abspath(prev_dir))
        stage_dir = os.path.join(workdir, f"stage2_n{n}")
        loss = stage2_loss_fn(student_cfg, prev[0], num_student_steps=n, w_min=config.w_min, w_max=config.w_max,
                              weighting=sc.weighting)
        _, times[f"stage2_n{n}"] = run.timed_once(stage_dir, lambda: train_stage(
            sc, stage_dir, data=data, student_cfg=student_cfg, teacher=prev, loss_fn=loss,
            init_params=lambda: _copy(prev[1]), desc=f"stage 2 n={n}"))
        dirs[n], prev_dir = stage_dir, stage_dir
    return dict(teacher_dir=teacher_dir, data=data, teacher_cfg=teacher_cfg, student_cfg=student_cfg,
                student_dirs=dirs, times=times)


def student_from_teacher(student_params, teacher_params):
    """The student's params with every parameter the teacher has copied from it (all but the w embedding,
    which starts at zero): the student then equals the conditional teacher at every w."""
    merged = _merge(nnx.to_pure_dict(student_params), nnx.to_pure_dict(_copy(teacher_params)))
    nnx.replace_by_pure_dict(student_params, merged)
    return student_params


def _merge(base, update):
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _data_config(config, teacher_dir):
    """The data the teacher was trained on (its recorded config when given a work directory)."""
    if not config.teacher_workdir:
        return config.teacher.data
    import ml_collections  # pylint: disable=g-import-not-at-top

    return ml_collections.ConfigDict(hostio.read_json(os.path.join(teacher_dir, run.CONFIG_FILE))["data"])


# ------------------------------------------------------------------------------------------------------
# Evaluation.


def make_sampler(graphdef, cfg, *, null_class):
    """jit(params, z_1, labels, w; num_steps, clip) -> (x, evals): DDIM of a guided teacher (cond + null in one
    batched forward, 2 evaluations per step) or of a w-conditioned student (1 per step)."""

    def sample(params, z_1, labels, w, *, num_steps, clip):
        x_fn = teacher_lib.x_predictor(nnx.merge(graphdef, params), cfg)
        if cfg.guidance_embed:
            denoise = lambda z, l: (x_fn(z, l, labels, w), 1)
        else:
            denoise = lambda z, l: (diffusion.guided_x(x_fn, z, l, labels, w, null_class=null_class), 2)
        return diffusion.ddim_sample(denoise, z_1, num_steps=num_steps, clip=clip)

    return jax.jit(sample, static_argnames=("num_steps", "clip"))


def draw(sampler, params, z_1, labels, w, *, num_steps, clip):
    """(samples, evals per sample, wall seconds per sample); compile time is excluded."""
    w_b = np.full(labels.shape, w, np.float32)
    compiled = sampler.lower(params, z_1, labels, w_b, num_steps=num_steps, clip=clip).compile()
    t0 = time.perf_counter()
    x, evals = compiled(params, z_1, labels, w_b)
    x = np.asarray(jax.block_until_ready(x))
    return x, int(evals), (time.perf_counter() - t0) / len(labels)


class Scorer:
    """Metrics of a sample set against the held-out data: the 2-D mixture's or the classifier's."""

    def __init__(self, config, data, classifier=None):
        self.config, self.data, self.mixture = config, data, data.mixture
        self.test = teacher_lib.fixed_batch(data.test, len(data.test))
        if classifier is not None:
            graphdef, params = classifier
            fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, return_features=True))
            self.classify = lambda x: tuple(np.asarray(a) for a in fwd(params, np.asarray(x, np.float32)))
            self.test_features = self.classify(self.test["x"])[1]

    def __call__(self, x, labels) -> dict:
        e = self.config.eval
        if self.mixture is not None:
            per_class = sample_metrics.sliced_wasserstein_per_class(
                x, labels, self.test["x"], self.test["label"], num_projections=e.sw_projections)
            return {
                "sw": sample_metrics.sliced_wasserstein(x, self.test["x"], num_projections=e.sw_projections),
                "sw_per_class": per_class,
                "sw_worst_class": max(per_class.values()),
                "own_class": sample_metrics.own_class_fraction(
                    x, labels, means=self.mixture.means, component_class=self.mixture.component_class),
            }
        logits, feats = self.classify(x)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        return {
            "fd": sample_metrics.frechet_distance(feats, self.test_features),
            **sample_metrics.classifier_scores(probs, labels),
            **sample_metrics.precision_recall(self.test_features, feats, k=e.precision_recall_k),
            "diversity": sample_metrics.within_class_diversity(feats, labels),
        }


def evaluate(config, workdir, plan) -> dict:
    """Samples every (model, N, w, clip) from the same noise and labels; returns the results record."""
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    data, tcfg, scfg, e = plan["data"], plan["teacher_cfg"], plan["student_cfg"], config.eval
    teacher = teacher_lib.load_params(plan["teacher_dir"], lambda r: Denoiser(tcfg, rngs=r), mesh=mesh, rules=rules)
    classifier = None
    if data.mixture is None:
        clf_dir = os.path.join(plan["teacher_dir"], "classifier")
        ccfg = teacher_lib.load_model_config(clf_dir, ClassifierConfig)
        classifier = teacher_lib.load_params(clf_dir, lambda r: ImageClassifier(ccfg, rngs=r), mesh=mesh, rules=rules)[:2]
    score = Scorer(config, data, classifier)

    n = e.num_samples
    labels = (np.arange(n) % data.num_classes).astype(np.int32)
    z_1 = np.asarray(jax.random.normal(jax.random.key(e.seed), (n, *data.data_shape)), np.float32)
    diffusion.check_request(labels, list(e.ws), num_classes=data.num_classes, w_range=(config.w_min, config.w_max))
    models = [("teacher", N, teacher, tcfg) for N in e.teacher_steps]
    start = config.stage2.start_steps
    students = {N: teacher_lib.load_params(d, lambda r: Denoiser(scfg, rngs=r), mesh=mesh, rules=rules)
                for N, d in plan["student_dirs"].items() if N == start or N in e.student_steps}
    models += [("stage1" if N == start else "student", N, students[N], scfg) for N in sorted(students, reverse=True)]
    samplers = {id(c): make_sampler(p[0], c, null_class=tcfg.null_class) for _, _, p, c in models}
    ref_steps = max(e.teacher_steps)
    rows, grids = [], {}
    for clip in e.clip:
        for w in e.ws:
            reference = None
            for name, steps_n, params, cfg in models:
                x, evals, sec = draw(samplers[id(cfg)], params[1], z_1, labels, w, num_steps=steps_n, clip=clip)
                if name == "teacher" and steps_n == ref_steps:
                    reference = x
                row = dict(model=name, steps=steps_n, w=float(w), clip=bool(clip), evals=evals,
                           seconds_per_sample=sec, **score(x, labels))
                if reference is not None:
                    row["rmse_to_teacher"] = float(np.sqrt(np.mean((x - reference).reshape(n, -1) ** 2, axis=1)).mean())
                rows.append(row)
                print(_row_line(row))
                if clip == e.clip[-1] or data.mixture is not None:
                    grids[(name, steps_n, float(w))] = x
    real = real_data_floor(config, data, score)
    return dict(rows=rows, real=real, grids=grids, labels=labels, ref_steps=ref_steps)


def real_data_floor(config, data, score):
    """The metrics of real held-out-like data against the test split: the best a sampler can show."""
    n = min(config.eval.num_samples, len(data.train))
    batch = teacher_lib.fixed_batch(data.train, n)
    return score(batch["x"], batch["label"])


def _row_line(row):
    keys = [k for k in ("fd", "accuracy", "confidence", "precision", "recall", "sw", "own_class", "rmse_to_teacher")
            if k in row]
    return (f"{row['model']:>8} N={row['steps']:<4} w={row['w']:<3} clip={int(row['clip'])} evals={row['evals']:<4} "
            + " ".join(f"{k}={row[k]:.4g}" for k in keys))


# ------------------------------------------------------------------------------------------------------
# Results: json, markdown, sample grids, FD-vs-steps plot.


def write_results(config, workdir, result, times, command):
    if jax.process_index() != 0:
        return
    rows = result["rows"]
    record = {"rows": rows, "real_data": result["real"], "stage_times": times, "command": command,
              "config": run.resolved_config(config)}
    hostio.write_json_atomically(os.path.join(workdir, "results.json"), json.loads(json.dumps(record, default=str)))
    hostio.write_atomically(os.path.join(workdir, "results.md"), results_markdown(config, record).encode())
    write_grids(config, workdir, result)
    write_steps_plot(config, workdir, rows)


def results_markdown(config, record) -> str:
    rows, real = record["rows"], record["real_data"]
    image = "fd" in rows[0]
    cols = (["fd", "accuracy", "confidence", "precision", "recall", "diversity"] if image
            else ["sw", "sw_worst_class", "own_class"]) + ["rmse_to_teacher", "evals", "seconds_per_sample"]
    lines = [f"# Guided distillation results ({config.teacher.data.name})", "",
             f"Command: `{record['command']}`", "",
             "Real data (train split vs test split, same metrics): "
             + ", ".join(f"{k} {v:.4g}" for k, v in real.items() if not isinstance(v, dict)), ""]
    for clip in sorted({r["clip"] for r in rows}):
        lines += [f"## clip x_hat to [-1, 1]: {'on' if clip else 'off'}", "",
                  "| model | steps | w | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
        for r in (r for r in rows if r["clip"] == clip):
            cells = [_fmt(r.get(c)) for c in cols]
            lines.append(f"| {r['model']} | {r['steps']} | {r['w']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Stage wall-clock (first run; 1-minute load average at start / end)", "",
              "| stage | seconds | load start | load end |", "|---|---|---|---|"]
    for stage, t in record["stage_times"].items():
        lines.append(f"| {stage} | {t['seconds']:.1f} | {t['load_start']:.2f} | {t['load_end']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4g}"


def _plt():
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def write_grids(config, workdir, result):
    """W/samples_<model>_<N>.png: one panel per w; image grids (classes x grid_per_class) or 2-D scatters."""
    plt, labels = _plt(), result["labels"]
    per = config.eval.grid_per_class
    for (name, steps_n), group in _group(result["grids"]).items():
        fig, axes = plt.subplots(1, len(group), figsize=(3.2 * len(group), 3.4), squeeze=False)
        for ax, (w, x) in zip(axes[0], sorted(group.items())):
            if x.ndim == 2:
                ax.scatter(x[:, 0], x[:, 1], c=labels, s=1, cmap="tab10", vmin=0, vmax=9)
                ax.set_xlim(-2, 2), ax.set_ylim(-2, 2), ax.set_aspect("equal")
            else:
                ax.imshow(_tile(x, labels, per), cmap="gray", vmin=-1, vmax=1)
                ax.axis("off")
            ax.set_title(f"{name} N={steps_n} w={w:g}")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, f"samples_{name}_{steps_n}.png"), dpi=90)
        plt.close(fig)


def _group(grids):
    out = {}
    for (name, steps_n, w), x in grids.items():
        out.setdefault((name, steps_n), {})[w] = x
    return out


def _tile(x, labels, per):
    """Images [n, H, W, 1] -> one [K*H, per*W] array: row k holds the first `per` samples of class k."""
    k = int(labels.max()) + 1
    h, w = x.shape[1:3]
    canvas = np.ones((k * (h + 1), per * (w + 1))) * -1
    for c in range(k):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per]):
            canvas[c * (h + 1): c * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = x[i, :, :, 0]
    return canvas


def write_steps_plot(config, workdir, rows):
    """W/fd_vs_steps.png: FD (images) or sliced Wasserstein (2-D) against sampling steps, per w."""
    plt = _plt()
    key = "fd" if "fd" in rows[0] else "sw"
    clip = max(r["clip"] for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, w in enumerate(config.eval.ws):
        color = f"C{i}"
        for model, style in (("teacher", "--"), ("student", "-")):
            pts = sorted((r["steps"], r[key]) for r in rows
                         if r["w"] == w and r["clip"] == clip and r["model"] in ((model, "stage1") if model == "student" else (model,)))
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{model} w={w:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("FD (classifier features)" if key == "fd" else "sliced Wasserstein")
    ax.set_title(f"{config.teacher.data.name}: guided teacher DDIM (--) vs distilled student (-), clip={'on' if clip else 'off'}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "fd_vs_steps.png"), dpi=100)
    plt.close(fig)


def run_all(config, workdir, command="") -> dict:
    validate(config)
    plan = train_all(config, workdir)
    print("== evaluation")
    (result, times) = (evaluate(config, workdir, plan), plan["times"])
    write_results(config, workdir, result, times, command)
    print(f"wrote {workdir}/results.md")
    return result


def main(argv):
    del argv
    config = flags.FLAGS.config
    command = " ".join(["python -m experiments.guided_distill"] + sys.argv[1:])
    cli.run_main(lambda: run_all(config, flags.FLAGS.workdir, command), config)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg).")
    flags.DEFINE_string("workdir", None, "Where every stage's directory and the results go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
