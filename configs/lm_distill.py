"""Distil a teacher LM into a smaller student: offline (teacher store), online, on-policy, seqkd, TAID.

Launch (teacher = a kdjax work directory; offline also needs its store from experiments.precompute_teacher):
  python -m experiments.lm_distill --config configs/lm_distill.py --workdir /tmp/kd \
      --config.teacher.workdir=/tmp/teacher --config.store_dir=/tmp/store/store-train --config.loss=jsd
  python -m experiments.lm_distill --config configs/lm_distill.py --workdir /tmp/kd_online \
      --config.teacher.workdir=/tmp/teacher --config.mode=online --config.loss=rkl
"""

import ml_collections

from configs import common, lm_pretrain


def get_config(arg=None):
    arg = common.variant(arg, name="configs/lm_distill.py")
    config = lm_pretrain.get_config(arg)
    # offline | online | on_policy | seqkd | teacher_generated (the teacher's continuations, dense KD)
    config.mode = "offline"
    # fkl rkl jsd tvd skl srkl | taid | tvdpp (on_policy with on_policy_fraction=1) | ce (no teacher: baseline)
    config.loss = "fkl"
    config.temperature = 1.0
    config.ce_alpha = 0.0  # weight of hard-label cross-entropy mixed into the divergence
    config.jsd_beta = 0.5
    config.skew_alpha = 0.1
    config.topk_tail = "bucket"  # offline top-k: "bucket" (tail mass kept) or "renormalize"
    # > 0: the LM head and every loss are computed chunk by chunk over this many tokens (kdjax.fused_head), so
    # no [B, T, V] logits exist (real vocabularies); 0: the plain path.  Same values and gradients.
    config.loss_chunk_size = 0

    # The vocabulary is the teacher's (or the store's, or a pretrained student's): 0 takes it from there; any
    # other value must equal it.  Only the CE-only baseline without any teacher needs a number here.
    config.data.vocab_size = 0

    config.teacher = ml_collections.ConfigDict()
    config.teacher.workdir = ""  # kdjax work dir (model_config.json, tokenizer.json, checkpoints/)
    config.teacher.hf_path = ""  # or a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    # Offline: the teacher store of the train split.  Evaluation runs the teacher model when one is given;
    # without one, a store of the validation split (store_validation_dir) gives the teacher's side of the
    # metrics (teacher perplexity, top-1 agreement, top-k KL); without either, only the student's CE.
    config.store_dir = ""
    config.store_validation_dir = ""

    # The student starts from scratch (config.model), from a kdjax work dir (pretrain-then-distil), or from a
    # Hugging Face directory (its own architecture); export_hf_dir writes the result in HF format at the end.
    config.student = ml_collections.ConfigDict({"init_workdir": "", "hf_path": ""})
    config.export_hf_dir = ""

    # on_policy: probability that a batch is replaced by student samples; seqkd / on_policy: prompt length and
    # sampling temperature (separate from the loss temperature).
    config.on_policy_fraction = 0.5
    config.prompt_len = 16
    config.sample_temperature = 1.0

    config.taid = ml_collections.ConfigDict({"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99})

    # A smaller student than the pretraining default.
    config.model.num_layers = 2
    config.model.embed_dim = 128
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.model.head_dim = 64
    config.model.mlp_dim = 384
    if arg == "tiny":
        config.prompt_len = 8
        config.model.num_layers = 1
        config.model.embed_dim = 32
        config.model.num_heads = 2
        config.model.num_kv_heads = 1
        config.model.head_dim = 16
        config.model.mlp_dim = 64
        config.steps = 2
        config.warmup_steps = 1
        config.log_every = 1
        config.eval_every = 2
        config.eval_batches = 2
        config.checkpoint_every = 2
    return config
