"""Guided distillation (Meng et al. 2023) end to end: teacher -> stage 1 (a w-conditioned student matches the
classifier-free-guided teacher) -> stage 2 (progressive distillation, halving N down to 1) -> evaluation.

Launch (each stage resumes; a rerun of a finished job only re-evaluates and rewrites the results):
  python -m experiments.guided_distill --config configs/guided_distill.py:2d --workdir workdirs/diffusion/2d
  python -m experiments.guided_distill --config configs/guided_distill.py:digits --workdir workdirs/diffusion/digits
  python -m experiments.guided_distill --config configs/guided_distill.py:tiny --workdir /tmp/gd   (tests)

The argument is parsed as in configs/diffusion_teacher.py: `2d` or `digits` (default), optionally `tiny`.
"""

import ml_collections

from configs import diffusion_teacher


def stage_config(*, steps, learning_rate, batch_size, warmup_steps):
    c = ml_collections.ConfigDict()
    c.steps = steps
    c.learning_rate = learning_rate
    c.batch_size = batch_size
    c.warmup_steps = warmup_steps
    c.weighting = "snr_plus_one"
    return c


def get_config(arg=None):
    data, tiny = diffusion_teacher.parse_variant(arg, name="configs/guided_distill.py")
    config = ml_collections.ConfigDict()
    variant = ",".join([data] + (["tiny"] if tiny else []))
    config.teacher = diffusion_teacher.get_config(variant)  # trained into W/teacher unless teacher_workdir is set
    config.teacher_workdir = ""  # an existing diffusion_teacher work directory to distil instead
    config.seed = 0

    # Guidance weights the student learns (w ~ U[w_min, w_max]); requests outside are refused.
    config.w_min = 0.0
    config.w_max = 4.0
    # Stage 1: regress the guided teacher (2 evaluations per step) with one evaluation; init from the teacher.
    config.stage1 = stage_config(steps=5000, learning_rate=5e-4, batch_size=128, warmup_steps=100)
    # Stage 2: start_steps -> start_steps / 2 -> ... -> 1, each halving initialised from the previous student.
    config.stage2 = stage_config(steps=1500, learning_rate=2e-4, batch_size=128, warmup_steps=50)
    # The stage-1 student's step count, the first teacher of stage 2 (it is evaluated against the 256-step
    # guided teacher; fewer halvings keep the one command within its budget).
    config.stage2.start_steps = 64
    config.stage2.min_steps = 1

    config.eval = ml_collections.ConfigDict()
    config.eval.ws = (0.0, 1.0, 2.0, 4.0)
    config.eval.num_samples = 1000  # per (model, steps, w); classes round-robin
    config.eval.teacher_steps = (256, 16, 8, 4, 2, 1)  # the guided teacher's own DDIM at these N (FD-vs-steps curve)
    config.eval.student_steps = (8, 4, 2, 1)
    config.eval.clip = (False, True)  # x_hat clipped to [-1, 1] while sampling, both reported (images only)
    config.eval.grid_per_class = 4  # sample-grid columns per class
    config.eval.sw_projections = 256
    config.eval.seed = 1
    config.eval.precision_recall_k = 3

    diffusion_teacher.common_keys(config)  # mesh, rules, logging and checkpoint cadence for the stages
    config.log_every = 250
    config.eval_every = 100_000  # stages evaluate once, at their end
    config.checkpoint_every = 500

    if data == "2d":
        config.stage1 = stage_config(steps=2000, learning_rate=5e-4, batch_size=256, warmup_steps=100)
        config.stage2 = stage_config(steps=500, learning_rate=2e-4, batch_size=256, warmup_steps=50)
        config.stage2.start_steps = 64
        config.stage2.min_steps = 1
        config.eval.num_samples = 4000
        config.eval.clip = (False,)  # the 2-D data are not bounded to [-1, 1]
    if tiny:
        config.stage1 = stage_config(steps=2, learning_rate=1e-3, batch_size=32, warmup_steps=0)
        config.stage2 = stage_config(steps=2, learning_rate=1e-3, batch_size=32, warmup_steps=0)
        config.stage2.start_steps = 2
        config.stage2.min_steps = 1
        config.eval.ws = (0.0, 2.0)
        config.eval.num_samples = 64
        config.eval.teacher_steps = (2,)
        config.eval.student_steps = (1,)
        config.eval.grid_per_class = 2
        config.eval.sw_projections = 16
        config.log_every = 1
        config.checkpoint_every = 1
    return config
