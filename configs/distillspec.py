"""DistillSpec: align a small draft to a real-size target by distillation, then measure speculative decoding.

  python -m experiments.distillspec --config configs/distillspec.py --workdir workdirs/distillspec
  python -m experiments.distillspec --config configs/distillspec.py --workdir W --eval_only \
      --config.target_workdir=T --config.eval.drafts=raw=DIR1,distilled=DIR2   (kdjax work dirs or HF dirs)

The target (stage 1) is sized for the *speed* table and trained on the budget of the *quality* table: a base LM
(by default the `make demo` teacher, 4 x 256, ~5M parameters, kept in the same cache, so whichever of the two
commands runs first trains it and the other reuses it) is embedded function-preservingly in a real-size
architecture (`target_model`, 8 x 512, ~33M parameters: the extra heads, hidden units, residual dimensions and
layers are zero, the norms rescaled).  The target then costs per token what a 33M model costs (~10 ms on
this CPU, so a ~2M draft costs c ~ 0.02 of it) and predicts exactly what the base predicts; the drafts are
distilled from the base, the same function at a sixth of the cost.  A target of your own: target_workdir or
target_hf_path (used as it is), or target_model.num_layers = 0 (the base itself is the target).

The draft is the small model both arms share: `draft_init_steps` of cross-entropy, then `draft.steps` more
of cross-entropy (the raw draft) or of distillation (each row of `runs`), so raw and distilled drafts have
the same budget, initialisation and data order.

`runs`: (name, mode, loss, on_policy_fraction, sample_temperature), every row a distilled draft; every
table compares each with the raw draft.  The default two (chosen before any run): draft-generated data,
DistillSpec's recommendation, and, since the paper finds the best choice depends on greedy vs sampled
decoding, the target's greedy continuations: the very prefixes greedy speculative decoding visits.
DistillSpec's data sources are
modes of `kdjax.distill`: fixed data = "online" (the target's logits on real text), target-generated =
"teacher_generated" (sample_temperature 0 = the target decodes greedily, 1 = it samples), draft-generated =
"on_policy" with fraction 1, and the mixture of fixed and draft-generated data = "on_policy" with fraction
lambda in (0, 1).  Divergences: fkl, rkl, jsd (draft.jsd_beta), tvd, and tvdpp (draft-generated only).
":sweep" runs every data source with fkl and every divergence on draft-generated data.
"""

import ml_collections

from configs import common, demo, lm_distill, lm_pretrain

RAW = "raw"  # the name of the CE-only draft in the tables (no row of `runs` may use it)


def _target_model(config):
    """The real-size architecture the base is embedded in (same head_dim; heads and kv heads scaled alike)."""
    m = config.target_model
    m.num_layers = 8
    m.embed_dim = 512
    m.num_heads = 8
    m.num_kv_heads = 4
    m.mlp_dim = 2048


def _draft(config):
    d = config.draft
    d.data = config.base.data.copy_and_resolve_references()
    d.data.vocab_size = 0  # the target's tokenizer
    d.model.num_layers = 3
    d.model.embed_dim = 192
    d.model.num_heads = 3
    d.model.num_kv_heads = 1
    d.model.head_dim = 64
    d.model.mlp_dim = 512
    d.batch_size = 8
    d.steps = 100  # stage 2, for the raw draft (CE) and every distilled one
    d.warmup_steps = 10
    d.learning_rate = 2e-3
    d.ce_alpha = 0.0  # DistillSpec trains on the divergence alone
    d.prompt_len = 32  # target- and draft-generated data continue 32 real tokens, like the evaluation
    d.log_every = 20
    d.eval_every = 100
    d.eval_batches = 4
    d.checkpoint_every = 50


def get_config(arg=None):
    arg = common.variant(arg, ("tiny", "sweep"), name="configs/distillspec.py")
    config = ml_collections.ConfigDict()
    # A given target (kdjax work directory or Hugging Face directory), used as it is; else stage 1 builds one.
    config.target_workdir = ""
    config.target_hf_path = ""
    # The base LM: the demo's teacher config and cache (the same key: `make demo`'s teacher is reused); ""
    # keeps it in W/base.
    demo_config = demo.get_config()
    config.base_cache_dir = demo_config.teacher_cache_dir
    config.base = demo_config.teacher
    config.base_workdir = ""  # or a trained base LM (a kdjax work directory), e.g. a demo teacher elsewhere
    # The architecture the base is embedded in (num_layers = 0: the base is the target).
    config.target_model = ml_collections.ConfigDict()
    _target_model(config)

    config.draft = lm_distill.get_config()
    _draft(config)
    config.draft_init_steps = 200  # stage 1b: cross-entropy steps both arms start from

    # (name, mode, loss, on_policy_fraction, sample_temperature)
    config.runs = (
        ("draft-generated fkl", "on_policy", "fkl", 1.0, 1.0),
        ("target-generated (greedy) fkl", "teacher_generated", "fkl", 1.0, 0.0),
    )

    config.eval = ml_collections.ConfigDict()
    config.eval.seed = 0
    config.eval.num_prompts = 8  # held-out prompts for acceptance and block efficiency (one batch)
    config.eval.prompt_len = 32
    config.eval.new_tokens = 96
    config.eval.gammas = (1, 2, 3, 5, 7)
    config.eval.temperatures = (0.0, 1.0)
    config.eval.lenience = (1.0, 0.5, 0.2, 0.1, 0.05)  # the lossy sweep (eps), at lossy_gamma, temperature 1
    config.eval.lossy_gamma = 5
    config.eval.lossy_temperature = 1.0
    # Wall clock: batch 1, each of the first timing_prompts prompts, best of timing_repeats round-robin calls.
    config.eval.timing_prompts = 1
    config.eval.timing_repeats = 2
    config.eval.timing_gammas = (1, 2, 3, 5, 7)
    # --eval_only: the drafts to compare, "name=DIR,name=DIR" (kdjax work dirs or Hugging Face dirs); the
    # first is the baseline of the ratios (the raw draft).
    config.eval.drafts = ""

    if arg == "sweep":
        config.runs = (
            ("fixed-data fkl", "online", "fkl", 1.0, 1.0),
            ("target-generated (greedy) fkl", "teacher_generated", "fkl", 1.0, 0.0),
            ("target-generated (sampled) fkl", "teacher_generated", "fkl", 1.0, 1.0),
            ("draft-generated fkl", "on_policy", "fkl", 1.0, 1.0),
            ("mixture lambda=0.5 fkl", "on_policy", "fkl", 0.5, 1.0),
            ("draft-generated rkl", "on_policy", "rkl", 1.0, 1.0),
            ("draft-generated jsd", "on_policy", "jsd", 1.0, 1.0),
            ("draft-generated tvd", "on_policy", "tvd", 1.0, 1.0),
            ("draft-generated tvd++", "on_policy", "tvdpp", 1.0, 1.0),
        )
    if arg == "tiny":
        config.base_cache_dir = ""
        t = lm_pretrain.get_config("tiny")
        t.data.max_files = 12
        t.steps, t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 4, 1, 2, 4, 4, 2
        config.base = t
        m = config.target_model
        m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 3, 96, 6, 3, 256
        d = config.draft
        d.data = t.data.copy_and_resolve_references()
        d.data.vocab_size = 0
        d.model.num_layers, d.model.embed_dim, d.model.num_heads, d.model.num_kv_heads = 1, 32, 2, 1
        d.model.head_dim, d.model.mlp_dim = 16, 64
        d.prompt_len = 8
        d.steps, d.warmup_steps, d.log_every, d.eval_every, d.checkpoint_every, d.eval_batches = 2, 1, 1, 2, 2, 2
        config.draft_init_steps = 2
        # Two distilled drafts, 2 steps each: DistillSpec's own data sources (the draft's samples with TVD++,
        # the target's greedy text).  Every source x divergence pair runs through the same lm_distill.train
        # in tests/lm_distill_test.py; tests/distillspec_test.py checks the sweep's stage configs.
        config.runs = (
            ("draft-generated tvd++", "on_policy", "tvdpp", 1.0, 1.0),
            ("target-generated (greedy) rkl", "teacher_generated", "rkl", 1.0, 0.0),
        )
        e = config.eval
        e.num_prompts, e.prompt_len, e.new_tokens = 4, 8, 12
        e.gammas, e.lenience, e.lossy_gamma = (2,), (1.0, 0.5), 2
        e.timing_prompts, e.timing_repeats, e.timing_gammas = 1, 1, (2,)
    return config
