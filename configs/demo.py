"""`make demo`: pretrain a teacher, precompute its store, distil one student six ways, tabulate.

  python -m experiments.demo --config configs/demo.py --workdir workdirs/demo
Every stage resumes or reuses its finished output, so a second run only re-tabulates.
"""

import ml_collections

from configs import common, lm_distill, lm_pretrain


def get_config(arg=None):
    arg = common.variant(arg, name="configs/demo.py")
    config = ml_collections.ConfigDict()
    # A subset of the standard library sized to the step budget, so the store covers what students read.
    data = lm_pretrain.get_config().data
    data.max_files = 120

    config.teacher = lm_pretrain.get_config()
    config.teacher.data = data
    config.teacher.model.num_layers = 4
    config.teacher.model.embed_dim = 256
    config.teacher.model.num_heads = 4
    config.teacher.model.num_kv_heads = 2
    config.teacher.model.head_dim = 64
    config.teacher.model.mlp_dim = 1024
    config.teacher.steps = 150
    config.teacher.warmup_steps = 15
    config.teacher.eval_every = 150
    config.teacher.checkpoint_every = 50

    config.store_k = 32
    config.store_dtype = "bfloat16"

    config.student = lm_distill.get_config()  # the student architecture and optimizer, shared by every run
    config.student.data = data
    config.student.steps = 100
    config.student.warmup_steps = 10
    config.student.eval_every = 100
    config.student.checkpoint_every = 50
    config.student.prompt_len = 96  # on-policy: the student samples the last quarter of each sequence
    # Every distillation run mixes in hard-label CE (Hinton et al.'s recipe): a top-k store says nothing about
    # how the tail mass is spread, and the labels do.  The CE-only baseline ignores it (loss "ce").
    config.student.ce_alpha = 0.5

    # name -> (mode, loss); every run has the same student, data order and step budget.
    config.runs = (
        ("CE only (baseline)", "offline", "ce"),
        ("offline fkl (top-k store)", "offline", "fkl"),
        ("offline jsd(0.5) (top-k store)", "offline", "jsd"),
        ("online rkl", "online", "rkl"),
        ("on-policy jsd (lambda=0.5)", "on_policy", "jsd"),
        ("TAID (top-k store)", "offline", "taid"),
    )
    if arg == "tiny":
        for c in (config.teacher, config.student):
            c.data.max_files = 12
            c.data.vocab_size = 512
            c.data.seq_len = 32
            c.model.num_layers = 1
            c.model.embed_dim = 32
            c.model.num_heads = 2
            c.model.num_kv_heads = 1
            c.model.head_dim = 16
            c.model.mlp_dim = 64
            c.steps, c.warmup_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 1, 2, 2, 1
            c.eval_batches = 2
        config.student.prompt_len = 16
        config.store_k = 8
    return config
