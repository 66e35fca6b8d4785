"""Diversity-rewarded CFG distillation of a category-conditional LM on the standard library (Cideron et al. 2024).

Launch (every stage resumes; a rerun of a finished job only re-evaluates what is missing and rewrites results):
  python -m experiments.cfg_distill --config configs/cfg_distill.py --workdir workdirs/cfg_distill
  python -m experiments.cfg_distill --config configs/cfg_distill.py:tiny --workdir /tmp/cfgd     (tests)

The default is the one-command CPU size (see docs/cfg_distill.md for its measured table and times).
"""

import ml_collections

from configs import common


def stage(*, steps, batch_size, learning_rate, warmup_steps):
    c = ml_collections.ConfigDict()
    c.steps = steps
    c.batch_size = batch_size
    c.learning_rate = learning_rate
    c.warmup_steps = warmup_steps
    return c


def get_config(arg=None):
    arg = common.variant(arg, name="configs/cfg_distill.py")
    config = ml_collections.ConfigDict()
    config.seed = 0

    # The labelled stdlib corpus (kdjax.data.categories): 14 categories, prefix "# category: <name>\n"
    # left-padded with EOS; examples are prefix + a window of one file.
    config.data = ml_collections.ConfigDict()
    config.data.vocab_size = 2048
    config.data.seq_len = 96  # prefix + window, the teacher's context
    config.data.max_files = 0  # 0 = every file; > 0 a deterministic subset (before the category table)
    config.data.val_fraction = 0.05  # per category
    config.data.prefix_len = 0  # 0 = the longest category prefix
    config.data.cache_dir = "~/.cache/kdjax"

    # W/teacher: the conditional LM, trained with condition dropout at p_uncond.
    config.teacher = stage(steps=1200, batch_size=16, learning_rate=3e-3, warmup_steps=50)
    config.teacher.p_uncond = 0.15
    config.teacher.model = ml_collections.ConfigDict(dict(
        family="llama", num_layers=2, embed_dim=128, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=384,
        tie_embeddings=True, param_dtype="float32", dtype="float32"))

    # W/classifier: the quality metric's category classifier, trained on real windows' first max_new_tokens
    # tokens (each example cut to a random length in [min_len, max_new_tokens], as generations may end early).
    config.classifier = stage(steps=1500, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    config.classifier.min_len = 8
    config.classifier.model = ml_collections.ConfigDict(dict(
        num_layers=1, embed_dim=64, num_heads=2, head_dim=32, mlp_dim=128))

    # W/student_b<beta>: students initialised from the teacher, on-policy, one per beta (0 = the quality model).
    config.student = stage(steps=200, batch_size=4, learning_rate=1e-3, warmup_steps=10)
    config.guidance = 3.0  # the CFG teacher the students imitate
    config.loss = "rkl"  # kdjax.losses.LOSSES name: rkl = KL(student || CFG teacher), the paper's direction
    config.temperature = 1.0
    config.jsd_beta = 0.5
    config.skew_alpha = 0.1
    config.betas = (0.0, 0.01, 0.05)  # weight of the diversity reward; must include 0
    # G per prompt: >= 3, since with the leave-one-out baseline 2 generations share one reward and every
    # advantage is 0 (kdjax.guidance explains); batch_size counts prompts, so a step samples batch_size x G.
    config.num_generations = 4
    config.embedding = "teacher_null"  # teacher_null | teacher_cond (kdjax.guidance.EMBEDDINGS)
    config.max_new_tokens = 64  # generation length (training rollouts and evaluation)
    config.sample_temperature = 1.0

    # theta(kappa) = (1 - kappa) theta_{beta=0} + kappa theta_{beta=interp_beta}.
    config.kappas = (0.0, 0.25, 0.5, 0.75, 1.0)
    config.interp_beta = 0.05

    config.eval = ml_collections.ConfigDict()
    config.eval.guidances = (1.0, 2.0, 3.0, 5.0)  # the CFG teacher's curve
    config.eval.groups_per_category = 8  # prompts per category
    config.eval.generations = 8  # generations per prompt (diversity is measured within a prompt's)
    config.eval.seed = 1

    # Shared by every stage.
    config.accum_steps = 1
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    config.log_every = 50
    config.eval_every = 100_000  # stages evaluate at their end
    config.eval_batches = 0  # the teacher's and the classifier's final evaluations: 0 = the whole validation split
    config.checkpoint_every = 200
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
    )
    config.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 1, "process_id": 0})
    config.debug_sleep_per_step = 0.0
    config.allow_resume_changes = ""

    if arg == "tiny":
        config.data.max_files = 120
        config.data.vocab_size = 512
        config.data.seq_len = 40
        config.teacher = stage(steps=4, batch_size=16, learning_rate=3e-3, warmup_steps=0)
        config.teacher.p_uncond = 0.15
        config.teacher.model = ml_collections.ConfigDict(dict(
            family="llama", num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
            tie_embeddings=True, param_dtype="float32", dtype="float32"))
        config.classifier = stage(steps=4, batch_size=16, learning_rate=2e-3, warmup_steps=0)
        config.classifier.min_len = 4
        config.classifier.model = ml_collections.ConfigDict(dict(
            num_layers=1, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32))
        config.student = stage(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=0)
        config.num_generations = 3
        config.betas = (0.0, 0.5)
        config.interp_beta = 0.5
        config.max_new_tokens = 12
        config.eval.groups_per_category = 1
        config.eval.generations = 2
        config.log_every = 2
        config.checkpoint_every = 2
        config.eval_batches = 2
    return config
