"""Train a class-conditional diffusion teacher with label dropout (classifier-free guidance), and the small
classifier behind the image metrics.

  python -m experiments.diffusion_teacher --config configs/diffusion_teacher.py:digits --workdir W [--config.k=v]

Outputs in W: config.json (a rerun must match it), model_config.json (the DenoiserConfig), checkpoints/
(orbax; a rerun resumes from the latest good one), metrics.jsonl and tensorboard/.  For image data also
W/classifier/ (the same layout) holding the metrics' classifier.  The helpers below (model loading, the
x-predictors) are shared with experiments/guided_distill.py.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kdjax import checkpoint, cli, diffusion, hostio, run, sharding, steps
from kdjax.data import images
from kdjax.models.denoiser import Denoiser, DenoiserConfig
from kdjax.models.image_classifier import ClassifierConfig, ImageClassifier

MODEL_CONFIG_FILE = "model_config.json"


# ------------------------------------------------------------------------------------------------------
# Shared helpers: model configs on disk, loading params, x-predictors.


def save_model_config(workdir, cfg):
    """W/model_config.json; an existing different one is an error (the checkpoints depend on it)."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    new = hostio_json(dataclasses.asdict(cfg))
    if os.path.exists(path) and hostio.read_json(path) != new:
        raise run.ConfigError(f"{path} describes another model; not replacing it (use another --workdir)")
    if jax.process_index() == 0:
        hostio.write_json_atomically(path, new)


def hostio_json(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_model_config(workdir, cls=DenoiserConfig):
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no trained model: no {MODEL_CONFIG_FILE}")
    return cls(**hostio.read_json(path))


def load_params(workdir, module_fn, *, mesh, rules):
    """(graphdef, params) of the latest checkpoint in W/checkpoints, straight into the mesh's shardings."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module_fn(nnx.Rngs(0))), nnx.Param)
    shardings = sharding.tree_shardings(abstract, rules, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        params = ckpt.restore_params(sharding.abstract_with_shardings(abstract, shardings))
    finally:
        ckpt.close()
    return graphdef, params, shardings


def x_predictor(model, cfg: DenoiserConfig):
    """(z, logsnr_b, labels_b[, w_b]) -> x_hat from a denoiser in any parametrisation."""
    if cfg.guidance_embed:
        return lambda z, l, c, w: diffusion.x_from_output(model(z, l, c, w), z, l, prediction=cfg.prediction)
    return lambda z, l, c: diffusion.x_from_output(model(z, l, c), z, l, prediction=cfg.prediction)


def denoiser_config(config, data, *, guidance_embed=False, w_scale=4.0) -> DenoiserConfig:
    m = config.model
    return DenoiserConfig(
        data_shape=data.data_shape,
        num_classes=data.num_classes,
        arch=m.arch,
        width=m.width,
        hidden=m.hidden,
        num_blocks=m.num_blocks,
        fourier_features=m.fourier_features,
        prediction=m.prediction,
        guidance_embed=guidance_embed,
        w_scale=w_scale,
    )


def fixed_batch(source, n):
    """The first n examples of `source` as one batch {"x", "label"} (n is clipped to len(source))."""
    rows = [source[i] for i in range(min(n, len(source)))]
    return {"x": np.stack([r["x"] for r in rows]), "label": np.stack([r["label"] for r in rows]).astype(np.int32)}


def chunk_size(config, mesh) -> int:
    """Examples per grain element (see `images.ChunkedSource`): the largest of 32, 16, .., 1 that divides this
    process's batch into a number of chunks the data-parallel mesh axes divide."""
    local, dp = run.local_batch_size(config), mesh.shape["data"] * mesh.shape["fsdp"]
    return next(c for c in (32, 16, 8, 4, 2, 1) if local % c == 0 and (local // c) % dp == 0 or c == 1)


def training_data(source, config, mesh):
    """(checkpointable iterator of chunked batches [B / chunk, chunk, ...], their shardings) for `source`."""
    chunk = chunk_size(config, mesh)
    chunked_config = ml_collections.ConfigDict({"batch_size": config.batch_size // chunk, "seed": config.seed})
    data_iter = run.train_iterator(images.ChunkedSource(source, chunk, seed=config.seed), chunked_config)
    local = run.local_batch_size(config) // chunk
    first = source[0]
    example = {"x": np.zeros((local, chunk, *np.shape(first["x"])), np.float32),
               "label": np.zeros((local, chunk), np.int32)}
    return data_iter, sharding.batch_shardings(example, mesh, tuple(config.sharding_rules))


def chunked(loss_fn):
    """A loss_fn on chunked batches: flattens [c, chunk, ...] to [c * chunk, ...] first."""
    return lambda model, batch, rng, frozen, extra: loss_fn(model, images.flatten_chunks(batch), rng, frozen, extra)


# ------------------------------------------------------------------------------------------------------
# The teacher.


def validate(config):
    with run.Problems("diffusion_teacher config") as p:
        run.check_common(p, config)
        p.check(0.0 < config.p_uncond < 1.0, f"p_uncond must be in (0, 1) to learn the null class, got {config.p_uncond}")
        p.check(config.weighting in diffusion.WEIGHTINGS, f"weighting {config.weighting!r}; expected {diffusion.WEIGHTINGS}")
        p.check(config.eval_size >= 1, f"eval_size must be >= 1, got {config.eval_size}")
        p.run(sharding.make_mesh, config.mesh)
        p.run(lambda: DenoiserConfig(data_shape=(2,), num_classes=2, **_model_kw(config)))


def _model_kw(config):
    m = config.model
    return dict(arch="mlp", width=m.width, hidden=m.hidden, num_blocks=m.num_blocks,
                fourier_features=m.fourier_features, prediction=m.prediction)


def teacher_loss_fn(cfg: DenoiserConfig, *, p_uncond, weighting):
    def loss_fn(model, batch, rng, frozen, extra):
        del frozen, extra
        total, count = diffusion.denoising_loss(
            x_predictor(model, cfg), batch["x"], batch["label"], rng,
            p_uncond=p_uncond, null_class=cfg.null_class, weighting=weighting,
        )
        return total, count, {"weighted_mse": (total, count)}

    return loss_fn


def eval_fn(graphdef, cfg, *, weighting):
    """jit(params, batch) -> {"val/loss": ...}: the conditional denoising loss at a fixed noise draw."""

    @jax.jit
    def evaluate(params, batch):
        loss_fn = teacher_loss_fn(cfg, p_uncond=0.0, weighting=weighting)
        total, count, _ = loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(1234), None, None)
        return total / count

    return lambda params, batch: {"val/loss": float(evaluate(params, batch))}


def train(config, workdir: str) -> dict:
    """Runs (or resumes) teacher training; returns the final validation metrics."""
    validate(config)
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    data = images.load_from_config(config.data)
    print(data.description)
    cfg = denoiser_config(config, data)
    run.prepare_workdir(workdir, config)
    save_model_config(workdir, cfg)
    print(f"teacher: {cfg.num_params() / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}")

    tx = run.make_optimizer(config)
    spec = steps.train_state_spec(lambda rngs: Denoiser(cfg, rngs=rngs), tx, seed=config.seed, mesh=mesh, rules=rules)
    data_iter, batch_sh = training_data(data.train, config, mesh)
    train_step = steps.jit_train_step(
        graphdef=spec.graphdef,
        tx=tx,
        loss_fn=chunked(teacher_loss_fn(cfg, p_uncond=config.p_uncond, weighting=config.weighting)),
        state_shardings=spec.shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
    )
    evaluate = eval_fn(spec.graphdef, cfg, weighting=config.weighting)
    eval_batch = fixed_batch(data.test, config.eval_size)
    _, val = run.fit(
        workdir,
        config,
        spec=spec,
        data_iter=data_iter,
        train_step=train_step,
        batch_shardings=batch_sh,
        run_eval=lambda params: evaluate(params, eval_batch),
        tokens_per_step=config.batch_size,
        desc="teacher",
    )
    return val


# ------------------------------------------------------------------------------------------------------
# The metrics' classifier (image data).


def classifier_config(config, data) -> ClassifierConfig:
    c = config.classifier
    return ClassifierConfig(data_shape=data.data_shape, num_classes=data.num_classes, hidden=c.hidden,
                            feature_dim=c.feature_dim)


def classifier_run_config(config):
    """The classifier's own training config (kdjax.run keys), recorded in W/classifier/config.json."""
    c = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy (the command line's is locked)
    c.steps, c.batch_size, c.learning_rate = config.classifier.steps, config.classifier.batch_size, config.classifier.learning_rate
    c.weight_decay = config.classifier.weight_decay
    c.warmup_steps = min(config.warmup_steps, c.steps - 1)
    c.eval_every = c.checkpoint_every = c.steps
    for key in ("model", "p_uncond", "weighting"):  # not used by the classifier
        del c[key]
    return c


def train_classifier(config, workdir: str) -> dict:
    """Trains (or resumes) the classifier on the real training split; returns its test accuracy."""
    c = classifier_run_config(config)
    with run.Problems("classifier config") as p:
        run.check_common(p, c)
    mesh, rules = sharding.make_mesh(c.mesh), tuple(c.sharding_rules)
    data = images.load_from_config(c.data)
    cfg = classifier_config(config, data)
    run.prepare_workdir(workdir, c)
    save_model_config(workdir, cfg)
    tx = run.make_optimizer(c)
    spec = steps.train_state_spec(lambda rngs: ImageClassifier(cfg, rngs=rngs), tx, seed=c.seed, mesh=mesh, rules=rules)
    data_iter, batch_sh = training_data(data.train, c, mesh)
    noise_std = config.classifier.noise_std

    def loss_fn(model, batch, rng, frozen, extra):
        x = batch["x"] + noise_std * jax.random.normal(rng, batch["x"].shape)
        ce = optax.softmax_cross_entropy_with_integer_labels(model(x), batch["label"])
        return jnp.sum(ce), jnp.asarray(ce.shape[0], jnp.float32), {"ce": (jnp.sum(ce), jnp.float32(ce.shape[0]))}

    train_step = steps.jit_train_step(graphdef=spec.graphdef, tx=tx, loss_fn=chunked(loss_fn), state_shardings=spec.shardings,
                                      batch_shardings=batch_sh, mesh=mesh)
    test = fixed_batch(data.test, len(data.test))
    logits = jax.jit(lambda params, x: nnx.merge(spec.graphdef, params)(x))
    run_eval = lambda params: {"val/accuracy": float(np.mean(np.argmax(logits(params, test["x"]), -1) == test["label"]))}
    _, val = run.fit(workdir, c, spec=spec, data_iter=data_iter, train_step=train_step,
                     batch_shardings=batch_sh, run_eval=run_eval, tokens_per_step=c.batch_size, desc="classifier")
    return val


def main(argv):
    del argv
    config = flags.FLAGS.config

    def job():
        val = train(config, flags.FLAGS.workdir)
        if config.data.name != "mixture2d":
            val.update(train_classifier(config, os.path.join(flags.FLAGS.workdir, "classifier")))
        return val

    result = cli.run_main(job, config)
    print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
