"""Pretrain a decoder LM with next-token cross-entropy (e.g. a teacher for the distillation experiments).

  python -m experiments.lm_pretrain --config configs/lm_pretrain.py --workdir /tmp/pretrain [--config.k=v]

Outputs in the work directory: config.json (the resolved config; a rerun must match it), checkpoints/
(orbax; a rerun of the same command resumes from the latest good one), metrics.jsonl and tensorboard/
(train and validation curves), model_config.json and the tokenizer.json the model was trained with.
"""

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kdjax import cli, loop, pretrained, run, sharding, steps
from kdjax.data import text as text_data
from kdjax.models.transformer import Transformer


def validate(config):
    """Every check that needs no data or model, before anything is read or written."""
    with run.Problems("lm_pretrain config") as p:
        run.check_common(p, config)
        p.check(config.data.seq_len >= 1, f"data.seq_len must be >= 1, got {config.data.seq_len}")
        p.run(sharding.make_mesh, config.mesh)
        p.run(run.new_model_config, config.model, vocab_size=config.data.vocab_size, max_len=config.data.seq_len)


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the pretraining job; returns the final validation metrics."""
    validate(config)
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    data = text_data.load_from_config(config.data)
    print(data.description)
    model_cfg = run.new_model_config(config.model, vocab_size=data.tokenizer.vocab_size, max_len=config.data.seq_len)
    run.prepare_workdir(workdir, config, model_config=model_cfg)
    pretrained.save_model_files(workdir, model_cfg, data.tokenizer)
    print(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}")

    tx = run.make_optimizer(config)
    spec = steps.train_state_spec(
        lambda rngs: Transformer(model_cfg, rngs=rngs), tx, seed=config.seed, mesh=mesh, rules=rules
    )
    local_batch, seq_len = run.local_batch_size(config), config.data.seq_len
    example = {"tokens": np.zeros((local_batch, seq_len + 1), np.int32)}
    eval_example = {**example, "mask": np.zeros((local_batch, seq_len), np.float32)}
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
        rules=rules,
    )
    eval_step = steps.jit_eval_step(
        graphdef=spec.graphdef,
        metrics_fn=steps.lm_eval_metrics,
        params_shardings=spec.shardings.params,
        batch_shardings=eval_sh,
        mesh=mesh,
        rules=rules,
    )

    def run_eval(params):
        batches = run.eval_batches(data.validation, config)
        m = loop.evaluate(eval_step, params, batches, eval_sh, max_batches=config.eval_batches)
        return {"val/ce": m["ce"], "val/perplexity": float(np.exp(m["ce"]))}

    _, val = run.fit(
        workdir,
        config,
        spec=spec,
        data_iter=run.train_iterator(data.train, config),
        train_step=train_step,
        batch_shardings=batch_sh,
        run_eval=run_eval,
        tokens_per_step=config.batch_size * seq_len,
        desc="pretrain",
    )
    return val


def main(argv):
    del argv
    config = flags.FLAGS.config
    result = cli.run_main(lambda: train(config, flags.FLAGS.workdir), config)
    print(f"final validation loss {result['val/ce']:.4f} (perplexity {result['val/perplexity']:.2f})")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/lm_pretrain.py"))
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
