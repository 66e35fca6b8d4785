"""Run a teacher once over a dataset split and keep its top-k log-probs in an on-disk store.

Launch (teacher = a kdjax work directory, e.g. from experiments.lm_pretrain):
  python -m experiments.precompute_teacher --config configs/precompute_teacher.py --workdir /tmp/store \
      --config.teacher.workdir=/tmp/pretrain
  python -m experiments.precompute_teacher --config configs/precompute_teacher.py:tiny --workdir /tmp/s
  python -m experiments.precompute_teacher --config configs/precompute_teacher.py --workdir /tmp/store --verify
`:tiny` uses a randomly initialised tiny teacher, so it needs no prior artifact.
"""

import ml_collections

from configs import common, lm_pretrain


def get_config(arg=None):
    arg = common.variant(arg, name="configs/precompute_teacher.py")
    base = lm_pretrain.get_config(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Same data keys as pretraining: the store is keyed by the packed example ids of exactly this data.
    config.data = base.data
    # The vocabulary is the teacher's: 0 takes it from its tokenizer.json; any other value must equal it.  A
    # random teacher (:tiny) needs a number.
    config.data.vocab_size = 512 if arg == "tiny" else 0

    config.teacher = ml_collections.ConfigDict()
    config.teacher.workdir = ""  # kdjax work dir with model_config.json, tokenizer.json, checkpoints/
    config.teacher.hf_path = ""  # or a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    # Only for a randomly initialised teacher (teacher.workdir == ""): its architecture.
    config.teacher.model = base.model

    config.split = "train"  # which split to precompute ("train" or "validation")
    config.k = 32
    config.logprob_dtype = "bfloat16"  # "bfloat16", "float16" or "float32"
    config.batch_size = 32  # examples per teacher call (per process)
    config.examples_per_shard = 512

    config.mesh = base.mesh
    config.sharding_rules = base.sharding_rules
    config.distributed = base.distributed

    if arg == "tiny":
        config.k = 8
        config.batch_size = 8
        config.examples_per_shard = 64
    return config
