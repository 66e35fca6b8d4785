"""Distil a teacher LM into a student: offline from the teacher store, online, on-policy, seqkd; any loss, TAID.

  python -m experiments.lm_distill --config configs/lm_distill.py --workdir W --config.teacher.workdir=T \
      [--config.mode=offline --config.store_dir=S] [--config.loss=jsd] [--config.key=value ...]

Everything is checked before the first step: the teacher's tokenizer is the student's (the student reads the
data with the teacher's tokenizer.json), and an offline store was written for that tokenizer and vocabulary.
Outputs as lm_pretrain's (checkpoints/, metrics.jsonl, tensorboard/, model_config.json, tokenizer.json), plus
`W/curves.png`.  Rerunning the same command resumes, TAID's schedule state included.
"""

import os
import sys

import jax
import numpy as np
from flax import nnx
from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import checkpoint, cli, distill, loop, losses, pretrained, sharding, steps, teacher_store
from kdjax import distributed
from kdjax.data import pipeline
from kdjax.data import text as text_data
from kdjax.metrics import MetricsWriter, read_metrics
from kdjax.models import hf
from kdjax.models.transformer import Transformer, TransformerConfig

# Texts on which teacher and student tokenizers must give the same ids (after vocab, EOS and token-map checks).
_SAMPLE_TEXTS = (
    "def main(argv):\n    return 0\n",
    "import os, sys  # comment\n\tx = {'a': [1, 2.5e-3]}\n",
    "Hello, world! Ünïcödé, 日本語, emoji 🙂.",
)


def _check_student_vocab(config, tokenizer, what):
    if config.data.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the {what} has vocab size {tokenizer.vocab_size} but the student's "
            f"config.data.vocab_size is {config.data.vocab_size}; set --config.data.vocab_size="
            f"{tokenizer.vocab_size} (the student must use the teacher's tokenizer)"
        )


def train(config, workdir: str) -> dict:
    """Runs (or resumes) one distillation job; returns the final validation metrics."""
    os.makedirs(workdir, exist_ok=True)
    distill.check_loss(config.mode, config.loss)
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules)
    nproc, pid = jax.process_count(), jax.process_index()

    # The teacher (for training online / on-policy / seqkd, and for evaluation whenever it is given).
    teacher = pretrained.load_model(
        workdir=config.teacher.workdir, hf_path=config.teacher.hf_path, mesh=mesh, rules=rules, what="teacher"
    )
    if teacher is not None:
        _check_student_vocab(config, teacher.tokenizer, f"teacher {teacher.source}")
    elif distill.needs_teacher_model(config.mode, config.loss):
        raise ValueError(
            f"mode {config.mode!r} with loss {config.loss!r} needs --config.teacher.workdir or --config.teacher.hf_path"
        )
    # A student loaded from a checkpoint brings its own tokenizer: it must be the teacher's, else the two
    # models' logits index different tokens.  Checked now, before any data or step.
    init = pretrained.load_model(
        workdir=config.student.init_workdir,
        hf_path=config.student.hf_path,
        mesh=mesh,
        rules=rules,
        what="student",
    )
    if init is not None and teacher is not None:
        problem = hf.compare_tokenizers(
            teacher.tokenizer, init.tokenizer, _SAMPLE_TEXTS, names=("teacher", "student")
        )
        if problem:
            raise ValueError(
                f"tokenizer mismatch between teacher {teacher.source} and student {init.source}: {problem}"
            )
    tokenizer_source = teacher or init
    tokenizer_path = os.path.join(tokenizer_source.source, "tokenizer.json") if tokenizer_source else None
    data = text_data.load_from_config(config.data, tokenizer_path=tokenizer_path)
    print(data.description)

    train_source, eval_source, store_eval = data.train, data.validation, False
    if config.mode == "offline" and config.loss != "ce":
        if not config.store_dir:
            raise ValueError(
                "offline mode needs --config.store_dir (run experiments.precompute_teacher first)"
            )
        expect = dict(
            expect_vocab_size=data.tokenizer.vocab_size,
            expect_tokenizer_fingerprint=data.tokenizer.fingerprint,
        )
        store = teacher_store.open_store(config.store_dir, **expect)
        train_source = teacher_store.StoreSource(data.train, store)
        val_store = os.path.join(os.path.dirname(os.path.abspath(config.store_dir)), "store-validation")
        if teacher is None and os.path.exists(os.path.join(val_store, "manifest.json")):
            eval_source = teacher_store.StoreSource(
                data.validation, teacher_store.open_store(val_store, **expect)
            )
            store_eval = True

    if init is not None:
        model_cfg = init.config  # the loaded student's own architecture; config.model does not apply
    else:
        model_cfg = TransformerConfig.from_dict(
            {
                **config.model.to_dict(),
                "vocab_size": data.tokenizer.vocab_size,
                "max_len": config.data.seq_len,
            }
        )
    pretrained.save_model_files(workdir, model_cfg, data.tokenizer)
    print(
        f"student: {model_cfg.num_params() / 1e6:.2f}M parameters"
        + (f"; teacher: {teacher.config.num_params() / 1e6:.2f}M" if teacher else "")
        + f"; mode {config.mode}, loss {config.loss}; mesh {dict(mesh.shape)}"
    )

    tx = steps.make_optimizer(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
    )
    extra = {"taid": losses.taid_init(t_start=config.taid.t_start)} if config.loss == "taid" else {}
    spec = steps.train_state_spec(
        lambda rngs: Transformer(model_cfg, rngs=rngs),
        tx,
        seed=config.seed,
        mesh=mesh,
        rules=rules,
        extra=extra,
    )
    if config.batch_size % nproc:
        raise ValueError(f"batch_size {config.batch_size} does not split over {nproc} processes")
    local_batch = config.batch_size // nproc
    data_iter = pipeline.train_iterator(
        pipeline.train_dataset(
            train_source, batch_size=local_batch, seed=config.seed, process_index=pid, process_count=nproc
        )
    )

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(spec.abstract)
        data_iter.set_state(data_state)
        print(f"resumed from step {int(state.step)}")
    else:
        state = spec.init()
        if init is not None:
            state = state.replace(params=init.params)
    writer = MetricsWriter(workdir, resume_step=int(state.step))

    def batch_example(source, batch):
        item = source[0]
        return {
            k: np.zeros((batch, *np.shape(v)), np.asarray(v).dtype)
            for k, v in item.items()
            if k != "example_id"
        }

    train_example = batch_example(train_source, local_batch)
    eval_example = {
        **batch_example(eval_source, local_batch),
        "mask": np.zeros((local_batch, config.data.seq_len), np.float32),
    }
    batch_sh = sharding.batch_shardings(train_example, mesh, rules)
    eval_sh = sharding.batch_shardings(eval_example, mesh, rules)
    teacher_graphdef = teacher.graphdef if teacher else None
    teacher_sh = sharding.tree_shardings(teacher.params, rules, mesh) if teacher else None
    loss_fn = distill.make_loss_fn(
        mode=config.mode,
        loss=config.loss,
        temperature=config.temperature,
        ce_alpha=config.ce_alpha,
        hparams=distill.divergence_hparams(
            config.loss, jsd_beta=config.jsd_beta, skew_alpha=config.skew_alpha
        ),
        tail=config.topk_tail,
        teacher_graphdef=teacher_graphdef,
        on_policy_fraction=config.on_policy_fraction,
        prompt_len=config.prompt_len,
        sample_temperature=config.sample_temperature,
        eos_id=data.tokenizer.eos_id,
    )
    extra_update = (
        distill.make_taid_update(total_steps=config.steps, **config.taid.to_dict())
        if config.loss == "taid"
        else None
    )
    train_uses_teacher = distill.needs_teacher_model(config.mode, config.loss)
    train_step = steps.jit_train_step(
        graphdef=spec.graphdef,
        tx=tx,
        loss_fn=loss_fn,
        state_shardings=spec.shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
        frozen_shardings=teacher_sh if train_uses_teacher else None,
        accum_steps=config.accum_steps,
        extra_update=extra_update,
    )
    eval_step = steps.jit_eval_step(
        graphdef=spec.graphdef,
        metrics_fn=distill.make_eval_fn(teacher_graphdef=teacher_graphdef),
        params_shardings=spec.shardings.params,
        batch_shardings=eval_sh,
        mesh=mesh,
        frozen_shardings=teacher_sh,
    )

    def run_eval(step, params):
        batches = pipeline.eval_batches(
            eval_source, batch_size=local_batch, process_index=pid, process_count=nproc
        )
        m = loop.evaluate(
            eval_step,
            params,
            batches,
            eval_sh,
            frozen=teacher.params if teacher else None,
            max_batches=config.eval_batches,
        )
        result = {f"val/{k}": v for k, v in m.items()}
        result["val/perplexity"] = float(np.exp(m["ce"]))
        if "teacher_ce" in m:
            result["val/teacher_perplexity"] = float(np.exp(m["teacher_ce"]))
        writer.write(step, result)
        return result

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
        frozen=teacher.params if train_uses_teacher else None,
        desc=f"{config.mode}/{config.loss}",
        debug_sleep_per_step=config.debug_sleep_per_step,
    )
    ckpt.close()
    writer.close()
    if pid == 0:
        plot_curves(workdir)
    if config.export_hf_dir:
        hf.save_hf(config.export_hf_dir, nnx.merge(spec.graphdef, state.params), data.tokenizer)
        print(f"student exported in Hugging Face format to {config.export_hf_dir}")
    return val


def plot_curves(workdir):
    """W/curves.png: train loss and validation perplexity / KL against step."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    records = read_metrics(workdir)
    panels = [
        ("train/loss", "train loss"),
        ("val/perplexity", "validation perplexity"),
        ("val/kl", "KL(teacher || student)"),
    ]
    panels = [(k, t) for k, t in panels if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)
    plt.close(fig)


def main(argv):
    distributed.initialize(flags.FLAGS.config)  # before any JAX computation
    del argv
    logging.set_verbosity(logging.WARNING)
    result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
