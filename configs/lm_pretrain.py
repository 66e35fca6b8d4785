"""Pretrain a small decoder LM on the default corpus (the Python standard library's source files).

Launch:
  python -m experiments.lm_pretrain --config configs/lm_pretrain.py --workdir /tmp/pretrain
  python -m experiments.lm_pretrain --config configs/lm_pretrain.py:tiny --workdir /tmp/t --config.steps=20
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.variant(arg, name="configs/lm_pretrain.py")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # "stdlib" (the Python standard library's sources), "tfds:<name>" (a TFDS text dataset prepared locally),
    # or your own text: "files:<dir|glob>", "jsonl:<file|dir|glob>", "parquet:<file|dir|glob>",
    # "arrow:<file|dir|glob>" (e.g. a `datasets` save_to_disk directory).  See README "Your own text".
    config.data.corpus = "stdlib"
    config.data.text_field = "text"  # jsonl: the field with the text ("a/b" reaches into nested objects)
    config.data.text_column = "text"  # parquet / arrow: the string column with the text
    config.data.tfds_text_key = "text"
    config.data.tfds_data_dir = ""  # "" = TFDS' default data dir
    config.data.max_files = 0  # stdlib and local corpora: 0 = every file; >0 a deterministic subset of files
    config.data.train_max_files = 0  # stdlib: >0 trains on a fixed subset of the train files (validation whole)
    config.data.val_fraction = 0.05
    config.data.vocab_size = 4096
    config.data.seq_len = 128
    # Tokenizer and token arrays are cached here and shared between runs (and experiments).
    config.data.cache_dir = "~/.cache/kdjax"

    config.model = ml_collections.ConfigDict()
    config.model.family = "llama"  # "llama" or "gpt2": switches norms, MLP, positions, biases
    config.model.num_layers = 4
    config.model.embed_dim = 192
    config.model.num_heads = 3
    config.model.num_kv_heads = 1
    config.model.head_dim = 64
    config.model.mlp_dim = 512
    config.model.tie_embeddings = True
    config.model.param_dtype = "float32"
    config.model.dtype = "float32"
    # One compiled block scanned over stacked layer params (compile time flat in depth; checkpoints and HF
    # exports convert, see kdjax.models.transformer.to_scanned), and what each block keeps for the backward
    # pass: "none" | "full" | "dots_saveable" | "dots_with_no_batch_dims_saveable" | "offload".
    config.model.scan_layers = False
    config.model.remat_policy = "none"

    config.batch_size = 16  # global, across all devices and processes
    config.accum_steps = 1
    config.steps = 300
    config.learning_rate = 3e-3
    config.warmup_steps = 30
    config.weight_decay = 0.1
    config.grad_clip = 1.0

    config.log_every = 20
    config.eval_every = 100
    config.eval_batches = 16  # 0 = the whole validation split
    config.checkpoint_every = 100

    # Mesh over all devices; the rules map the model's logical axes onto it.
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
        # Activations (constraints inside the model): batch data-parallel, model dimension replicated.
        ("activation_batch", ("data", "fsdp")),
        ("activation_length", None),
        ("activation_embed", None),
        ("activation_heads", "tensor"),
        ("activation_kv_heads", "tensor"),
        ("activation_head_dim", None),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
    )
    # Multi-process runs (jax.distributed): "" / 1 / 0 = unset, then KDJAX_COORDINATOR, KDJAX_NUM_PROCESSES
    # and KDJAX_PROCESS_ID are read; on a Cloud TPU pod slice leave all unset (detected).  See docs/scaling.md.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  # "host:port" of process 0
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    # Seconds slept per step; only tests set it, to kill a run mid-way deterministically slowly.
    config.debug_sleep_per_step = 0.0
    # A rerun resumes the work directory's run and must have the same config (W/config.json), except for keys
    # that only change logging, saving or the mesh.  Comma-separated keys allowed to differ anyway ("all" for
    # any), e.g. "steps" to train a finished run longer (the learning-rate schedule then changes too).
    config.allow_resume_changes = ""

    if arg == "tiny":
        config.data.max_files = 60
        config.data.vocab_size = 512
        config.data.seq_len = 32
        config.model.num_layers = 2
        config.model.embed_dim = 64
        config.model.num_heads = 4
        config.model.num_kv_heads = 2
        config.model.head_dim = 16
        config.model.mlp_dim = 128
        config.batch_size = 16
        config.steps = 30
        config.warmup_steps = 5
        config.log_every = 5
        config.eval_every = 15
        config.eval_batches = 4
        config.checkpoint_every = 10
    return config
