"""`make demo`: a teacher trained on the whole standard library, one small student distilled five ways on a
limited transfer set, three seeds each, tabulated with error bars and costs.

  python -m experiments.demo --config configs/demo.py --workdir workdirs/demo

The setting is the data-limited regime where soft targets carry the most (Hinton et al. 2015; Turc et al.
2019, "Well-Read Students"): the teacher sees every train file; the student sees a small transfer set for
several epochs, so hard labels alone overfit and the teacher's distributions add what the data cannot.

Shared by every student run (none tuned against the baseline): architecture, optimizer, learning rate,
schedule, steps, batch, data order per seed, ce_alpha = 0.5 for every distillation run, temperature 1.
Each row differs only in its own method's keys (mode, loss, TAID's schedule, on-policy fraction and prompt).
"""

import ml_collections

from configs import common, lm_distill, lm_pretrain

SEEDS = (0, 1, 2)


def get_config(arg=None):
    arg = common.variant(arg, name="configs/demo.py")
    config = ml_collections.ConfigDict()
    # The teacher depends only on its config and the corpus, so it is trained once and kept here (keyed by
    # both; a changed config never reuses a stale teacher).  "" keeps it inside the work directory.
    config.teacher_cache_dir = "~/.cache/kdjax/teachers"

    config.teacher = lm_pretrain.get_config()
    teacher = config.teacher
    teacher.data.max_files = 0  # every file of the standard library
    teacher.model.num_layers = 4
    teacher.model.embed_dim = 256
    teacher.model.num_heads = 4
    teacher.model.num_kv_heads = 2
    teacher.model.head_dim = 64
    teacher.model.mlp_dim = 768
    teacher.steps = 500
    teacher.warmup_steps = 25
    teacher.learning_rate = 3e-3
    teacher.log_every = 25
    teacher.eval_every = 500
    teacher.eval_batches = 24
    teacher.checkpoint_every = 100

    config.store_k = 32
    config.store_dtype = "bfloat16"

    config.student = lm_distill.get_config()
    student = config.student
    student.data = teacher.data.copy_and_resolve_references()
    # The transfer set: a fixed sample of 40 train files (about 5% of the teacher's data); validation is the
    # whole held-out split, the same the teacher is measured on.
    student.data.train_max_files = 40
    student.data.vocab_size = 0  # the teacher's
    student.model.num_layers = 2
    student.model.embed_dim = 128
    student.model.num_heads = 2
    student.model.num_kv_heads = 1
    student.model.head_dim = 64
    student.model.mlp_dim = 384
    student.steps = 150
    student.warmup_steps = 15
    student.log_every = 10
    student.eval_every = 150
    student.eval_batches = 24
    student.checkpoint_every = 150
    # Every distillation run mixes in hard-label CE (Hinton et al.'s recipe): a top-k store says nothing about
    # how the tail mass is spread, and the labels do.  The CE-only baseline is loss "ce".
    student.ce_alpha = 0.5
    student.prompt_len = 64  # on-policy: the student samples the second half of each sequence
    student.on_policy_fraction = 0.5

    # (name, mode, loss): every distillation row uses forward KL; the rows differ in where the teacher signal
    # comes from (the top-k store, the dense teacher, the teacher on the student's own samples) and TAID's
    # interpolated target.
    config.runs = (
        ("CE only", "offline", "ce"),
        ("offline fkl (top-k store)", "offline", "fkl"),
        ("online fkl (dense teacher)", "online", "fkl"),
        ("on-policy fkl (GKD, lambda 0.5)", "on_policy", "fkl"),
        ("TAID (top-k store)", "offline", "taid"),
    )
    config.seeds = SEEDS
    if arg == "tiny":
        for c in (config.teacher, config.student):
            c.data.max_files = 12
            c.data.seq_len = 32
            c.model.num_layers = 1
            c.model.embed_dim = 32
            c.model.num_heads = 2
            c.model.num_kv_heads = 1
            c.model.head_dim = 16
            c.model.mlp_dim = 64
            c.steps, c.warmup_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 1, 4, 4, 2
            c.eval_batches = 2
        config.teacher.data.vocab_size = 512
        config.student.data.train_max_files = 4
        config.student.prompt_len = 16
        config.store_k = 8
        config.seeds = (0, 1)
        config.teacher_cache_dir = ""
    return config
