"""Pretrain a decoder LM with next-token cross-entropy.  Until LM distillation lands this is `make demo`.

  python -m experiments.lm_pretrain --config configs/lm_pretrain.py --workdir /tmp/pretrain [--config.k=v]

Outputs in the work directory: checkpoints/ (orbax; a rerun of the same command resumes from the
latest), metrics.jsonl and tensorboard/ (train and validation curves), model_config.json and the
tokenizer.json the model was trained with.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import checkpoint, cli, loop, pretrained, sharding, steps
from kdjax import distributed
from kdjax.data import pipeline
from kdjax.data import text as text_data
from kdjax.metrics import MetricsWriter
from kdjax.models.transformer import Transformer, TransformerConfig


def model_config(config, vocab_size) -> TransformerConfig:
    return TransformerConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": vocab_size, "max_len": config.data.seq_len}
    )


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the pretraining job; returns the final validation metrics."""
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules)
    data = text_data.load_from_config(config.data)
    print(data.description)
    model_cfg = model_config(config, data.tokenizer.vocab_size)
    pretrained.save_model_files(workdir, model_cfg, data.tokenizer)
    print(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}")

    tx = steps.make_optimizer(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
    )
    spec = steps.train_state_spec(
        lambda rngs: Transformer(model_cfg, rngs=rngs), tx, seed=config.seed, mesh=mesh, rules=rules
    )
    nproc, pid = jax.process_count(), jax.process_index()
    if config.batch_size % nproc:
        raise ValueError(f"batch_size {config.batch_size} does not split over {nproc} processes")
    local_batch = config.batch_size // nproc
    data_iter = pipeline.train_iterator(
        pipeline.train_dataset(
            data.train, batch_size=local_batch, seed=config.seed, process_index=pid, process_count=nproc
        )
    )

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(spec.abstract)
        data_iter.set_state(data_state)
        print(f"resumed from step {int(state.step)}")
    else:
        state = spec.init()
    start = int(state.step)

    example = {"tokens": np.zeros((local_batch, config.data.seq_len + 1), np.int32)}
    eval_example = {**example, "mask": np.zeros((local_batch, config.data.seq_len), np.float32)}
    batch_sh = sharding.batch_shardings(example, mesh, rules)
    eval_sh = sharding.batch_shardings(eval_example, mesh, rules)
    train_step = steps.jit_train_step(
        graphdef=spec.graphdef,
        tx=tx,
        loss_fn=steps.lm_loss,
        state_shardings=spec.shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
        accum_steps=config.accum_steps,
    )
    eval_step = steps.jit_eval_step(
        graphdef=spec.graphdef,
        metrics_fn=steps.lm_eval_metrics,
        params_shardings=spec.shardings.params,
        batch_shardings=eval_sh,
        mesh=mesh,
    )

    def run_eval(step, params):
        batches = pipeline.eval_batches(
            data.validation, batch_size=local_batch, process_index=pid, process_count=nproc
        )
        m = loop.evaluate(eval_step, params, batches, eval_sh, max_batches=config.eval_batches)
        result = {"val/ce": m["ce"], "val/perplexity": float(np.exp(m["ce"]))}
        writer.write(step, result)
        return result

    writer = MetricsWriter(workdir, resume_step=start)
    state, val = loop.train_loop(
        state=state,
        train_step=train_step,
        data_iter=data_iter,
        batch_shardings=batch_sh,
        checkpointer=ckpt,
        writer=writer,
        run_eval=run_eval,
        total_steps=config.steps,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        tokens_per_step=config.batch_size * config.data.seq_len,
        desc="pretrain",
        debug_sleep_per_step=config.debug_sleep_per_step,
    )
    ckpt.close()
    writer.close()
    return val


def main(argv):
    distributed.initialize(flags.FLAGS.config)  # before any JAX computation
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    print(f"final validation loss {result['val/ce']:.4f} (perplexity {result['val/perplexity']:.2f})")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
