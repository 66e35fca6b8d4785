"""A class-conditional diffusion teacher trained with label dropout (classifier-free guidance).

Launch:
  python -m experiments.diffusion_teacher --config configs/diffusion_teacher.py:digits --workdir W
  python -m experiments.diffusion_teacher --config configs/diffusion_teacher.py:2d --workdir W
  python -m experiments.diffusion_teacher --config configs/diffusion_teacher.py:tiny --workdir W   (tests)
  any locally prepared TFDS image dataset:  ... :digits --config.data.name=tfds:cifar10 --config.model.arch=conv

The argument is a comma-separated list of variants: `2d` or `digits` (the default) picks the data and the
model size, `tiny` shrinks everything for tests (`tiny` alone is the 2-D data).
"""

import ml_collections

from configs import common, lm_pretrain

VARIANTS = ("2d", "digits", "tiny")


def parse_variant(arg, *, name):
    """(data, tiny) from 'digits', '2d', 'tiny', '2d,tiny', ...; ValueError for anything else."""
    tokens = common.variants(arg, VARIANTS, name=name, exclusive=(("2d", "digits"),))
    tiny = "tiny" in tokens
    data = "digits" if "digits" in tokens else "2d" if ("2d" in tokens or tiny) else "digits"
    return data, tiny


def data_config(data):
    c = ml_collections.ConfigDict()
    c.name = "mixture2d" if data == "2d" else "digits"  # or "tfds:<name>" for a prepared TFDS image dataset
    # 2-D ring mixture (ignored for images): classes overlap at this std.
    c.num_classes = 4
    c.components_per_class = 2
    c.mixture_std = 0.4  # real data: 66% of points are nearest a component of their own class
    c.train_size = 50_000
    c.test_size = 4_000
    c.seed = 0
    # TFDS images (ignored otherwise).
    c.tfds_data_dir = ""
    c.tfds_image_key = "image"
    c.tfds_label_key = "label"
    c.tfds_train_split = "train"
    c.tfds_test_split = "test"
    return c


def common_keys(config):
    """Keys every training stage has (kdjax.run's validation and loop read them)."""
    config.accum_steps = 1
    config.weight_decay = 0.0
    config.grad_clip = 1.0
    config.log_every = 200
    config.eval_every = 1000
    config.checkpoint_every = 1000
    # The mesh, its rules and the multi-process settings are the LM experiments' (one definition), except that
    # the class-embedding tables (logical axis "vocab") are tiny here and stay replicated.
    base = lm_pretrain.get_config()
    config.mesh = base.mesh
    config.sharding_rules = tuple((k, None if k == "vocab" else v) for k, v in base.sharding_rules)
    config.distributed = base.distributed
    config.debug_sleep_per_step = 0.0  # tests only: slow a run down to kill it mid-way
    config.allow_resume_changes = ""
    return config


def get_config(arg=None):
    data, tiny = parse_variant(arg, name="configs/diffusion_teacher.py")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data_config(data)

    config.model = ml_collections.ConfigDict()
    config.model.arch = "mlp"  # "conv" for H x W x C images
    config.model.width = 192
    config.model.hidden = 384
    config.model.num_blocks = 3
    config.model.fourier_features = 32
    config.model.prediction = "v"

    config.p_uncond = 0.1  # label dropout to the null class
    config.weighting = "snr_plus_one"  # x-MSE weight: "snr_plus_one" (= v-MSE) or "snr_trunc"
    config.batch_size = 128
    config.steps = 15_000
    config.learning_rate = 1e-3
    config.warmup_steps = 200
    config.eval_size = 512  # test examples in the validation loss (a fixed noise draw)
    common_keys(config)

    # The classifier behind the image metrics (accuracy, confidence, FD features); unused on 2-D data.
    config.classifier = ml_collections.ConfigDict()
    config.classifier.hidden = 256
    config.classifier.feature_dim = 64
    config.classifier.steps = 2000
    config.classifier.batch_size = 128
    config.classifier.learning_rate = 2e-3
    config.classifier.weight_decay = 1e-2
    config.classifier.noise_std = 0.1  # input-noise augmentation, so features also rank imperfect samples

    if data == "2d":
        config.model.width = 64
        config.model.hidden = 128
        config.model.num_blocks = 3
        config.steps = 4000
        config.batch_size = 256
    if tiny:
        config.data.train_size = 512
        config.data.test_size = 256
        config.model.width = 16
        config.model.hidden = 32
        config.model.num_blocks = 1
        config.model.fourier_features = 8
        config.batch_size = 32
        config.steps = 8
        config.warmup_steps = 2
        config.eval_size = 64
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.classifier.hidden = 16
        config.classifier.feature_dim = 8
        config.classifier.steps = 6
        config.classifier.batch_size = 32
    return config
