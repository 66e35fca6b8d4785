"""Distil a teacher LM into a student: offline from the teacher store, online, on-policy, seqkd; any loss, TAID.

  python -m experiments.lm_distill --config configs/lm_distill.py --workdir W --config.teacher.workdir=T \
      [--config.mode=offline --config.store_dir=S] [--config.loss=jsd] [--config.key=value ...]

The recipe, top to bottom: validate the whole config (nothing read or written yet); load the teacher and a
pretrained student if any, and check their tokenizers agree; read the data with the tokenizer that defines
the vocabulary (the teacher's, else the store's); open the store and check it was written by this teacher
over exactly this data; record the config in W (a rerun must match it); build the objective of the mode and
the loss (`kdjax.distill`); train (`kdjax.run.fit`); plot; export to Hugging Face format if asked.
Outputs as lm_pretrain's (config.json, checkpoints/, metrics.jsonl, tensorboard/, model_config.json,
tokenizer.json), plus `W/curves.png`.  Rerunning the same command resumes, TAID's schedule state included.

Hugging Face models: `--config.teacher.hf_path=DIR` (a teacher in HF format: config.json, *.safetensors,
tokenizer.json), `--config.student.hf_path=DIR` (start the student from an HF checkpoint: its own
architecture, so no --config.model.* with it), `--config.export_hf_dir=DIR` (write the trained student in HF
format; the directory is checked before training).  The vocabulary comes from the teacher (or the store):
leave --config.data.vocab_size at 0.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kdjax import cli, distill, loop, losses, pretrained, run, sharding, steps, teacher_store
from kdjax.data import text as text_data
from experiments import precompute_teacher
from kdjax.metrics import read_metrics
from kdjax import hf
from kdjax.data import hf_tokenizer
from kdjax.models.transformer import Transformer

def validate(config, overridden=()):
    """Every check that needs no data or model, before anything is read or written.

    `overridden`: the config keys given on the command line; `model.*` ones conflict with a student loaded
    from a checkpoint (it brings its own architecture).
    """
    with run.Problems("lm_distill config") as p:
        run.check_common(p, config)
        p.run(distill.check_loss, config.mode, config.loss, on_policy_fraction=config.on_policy_fraction)
        p.check(config.temperature > 0, f"temperature must be > 0, got {config.temperature}")
        p.check(config.sample_temperature >= 0,
                f"sample_temperature must be >= 0 (0 = greedy), got {config.sample_temperature}")
        p.check(0 <= config.ce_alpha <= 1, f"ce_alpha must be in [0, 1], got {config.ce_alpha}")
        p.check(0 <= config.on_policy_fraction <= 1,
                f"on_policy_fraction must be in [0, 1], got {config.on_policy_fraction}")
        p.check(config.loss_chunk_size >= 0, f"loss_chunk_size must be >= 0, got {config.loss_chunk_size}")
        p.check(not (config.loss == "tvdpp" and config.loss_chunk_size),
                "tvdpp has no fused chunked path: set loss_chunk_size=0")
        p.check(config.topk_tail in losses.TAILS, f"topk_tail must be one of {losses.TAILS}, got {config.topk_tail!r}")
        if config.mode in ("on_policy", "seqkd", "teacher_generated"):
            p.check(1 <= config.prompt_len < config.data.seq_len,
                    f"prompt_len must be in [1, data.seq_len={config.data.seq_len}), got {config.prompt_len}")
        if config.loss in losses.LOSSES:  # the loss's own hyperparameter checks, on a 1-token example
            hp = distill.divergence_hparams(config.loss, jsd_beta=config.jsd_beta, skew_alpha=config.skew_alpha)
            p.run(losses.check_hparams, config.loss, **hp)  # (temperature is checked above, once)
        if config.loss == "taid":
            p.run(losses.check_taid_schedule, **config.taid.to_dict())
        p.run(sharding.make_mesh, config.mesh)
        teacher_given = bool(config.teacher.workdir or config.teacher.hf_path)
        p.check(not (config.teacher.workdir and config.teacher.hf_path),
                "give teacher.workdir or teacher.hf_path, not both")
        p.check(not (config.student.init_workdir and config.student.hf_path),
                "give student.init_workdir or student.hf_path, not both")
        if config.mode in distill.MODES and config.loss in distill.KD_LOSSES:
            needs_model = distill.needs_teacher_model(config.mode, config.loss)
            p.check(teacher_given or not needs_model,
                    f"mode {config.mode!r} with loss {config.loss!r} runs the teacher: set --config.teacher.workdir "
                    "or --config.teacher.hf_path")
            p.check(not (config.mode == "offline" and config.loss != "ce" and not config.store_dir),
                    "offline mode reads the teacher store: set --config.store_dir (run experiments.precompute_teacher)")
        run.check_path(p, config.teacher.workdir, "teacher.workdir", must_contain=run.MODEL_CONFIG_FILE)
        run.check_path(p, config.teacher.hf_path, "teacher.hf_path", must_contain="config.json")
        run.check_path(p, config.student.init_workdir, "student.init_workdir", must_contain=run.MODEL_CONFIG_FILE)
        run.check_path(p, config.student.hf_path, "student.hf_path", must_contain="config.json")
        if config.mode == "offline" and config.loss != "ce":
            run.check_path(p, config.store_dir, "store_dir", must_contain="manifest.json")
        run.check_path(p, config.store_validation_dir, "store_validation_dir", must_contain="manifest.json")
        if config.student.init_workdir or config.student.hf_path:
            model_keys = sorted(k for k in overridden if k.startswith("model."))
            p.check(not model_keys,
                    f"{', '.join(model_keys)} would be ignored: a student loaded from student.init_workdir / "
                    "student.hf_path keeps its own architecture; drop these overrides (or start from scratch)")
        if config.export_hf_dir:
            p.run(hf.check_export_dir, config.export_hf_dir)


def _vocabulary(config, model_vocab: int, tokenizer, source: str) -> int:
    """The vocabulary (logit width) the run uses: the one `source` (a teacher, a pretrained student or a store)
    defines.  A Hugging Face model may have more embedding rows than its tokenizer has ids (Qwen2: 151,936
    rows, 151,665 ids): the student's logits must be as wide as the teacher's, so the model's count is the
    vocabulary.  data.vocab_size may be 0 (take it) or equal; any other value is a conflict naming both."""
    want = config.data.vocab_size
    if want and want != model_vocab:
        raise run.ConfigError(
            f"vocabulary conflict: {source} defines vocab size {model_vocab} (its tokenizer has "
            f"{tokenizer.vocab_size} ids) but --config.data.vocab_size={want}; drop the setting (0 takes the "
            f"{source.split()[0]}'s) or use a teacher with that vocabulary"
        )
    ids = "" if tokenizer.vocab_size == model_vocab else f" (its tokenizer has {tokenizer.vocab_size} ids)"
    print(f"vocabulary: {model_vocab} ids{ids} and the tokenizer from {source}")
    return model_vocab


def load_models(config, mesh, rules):
    """(teacher, pretrained student); either may be None.  Their tokenizers must agree."""
    teacher = pretrained.load_model(
        workdir=config.teacher.workdir, hf_path=config.teacher.hf_path, mesh=mesh, rules=rules, what="teacher"
    )
    init = pretrained.load_model(
        workdir=config.student.init_workdir, hf_path=config.student.hf_path, mesh=mesh, rules=rules,
        what="student",
    )
    if init is not None and teacher is not None:
        problem = hf.compare_tokenizers(teacher.tokenizer, init.tokenizer, hf_tokenizer.PROBE_TEXTS, names=("teacher", "student"))
        if problem:
            raise run.ConfigError(f"tokenizer mismatch between teacher {teacher.source} and student {init.source}: {problem}")
    return teacher, init


def load_data(config, teacher, init):
    """(the corpus, the vocabulary size): read with the tokenizer of the teacher (else the pretrained
    student's, else the store's, else a tokenizer trained for data.vocab_size)."""
    source = teacher or init
    if source is not None:
        vocab = _vocabulary(config, source.config.vocab_size, source.tokenizer,
                            f"{'teacher' if teacher else 'student'} {source.source}")
        data = text_data.load_from_config(config.data, tokenizer=source.tokenizer,
                                          vocab_size=source.tokenizer.vocab_size)
        return data, vocab
    if config.mode == "offline" and config.loss != "ce":
        try:
            tokenizer, manifest = teacher_store.store_tokenizer(config.store_dir)
        except FileNotFoundError as e:
            raise run.ConfigError(str(e)) from None
        vocab = _vocabulary(config, manifest["vocab_size"], tokenizer, f"store {config.store_dir}")
        data = text_data.load_from_config(config.data, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
        return data, vocab
    if not config.data.vocab_size:
        raise run.ConfigError("no teacher or store defines the vocabulary: set --config.data.vocab_size")
    data = text_data.load_from_config(config.data)
    return data, data.tokenizer.vocab_size


def open_stores(config, data, vocab, teacher):
    """(train source, eval source): the stores joined to the data by example id, each checked first to be
    written by this teacher (when one is configured), with this tokenizer, over exactly these examples."""

    def checked(path, split, examples):
        store = teacher_store.open_store(path)
        teacher_store.check_provenance(
            store,
            teacher_fingerprint=teacher_store.params_fingerprint(teacher.params) if teacher else None,
            dataset=precompute_teacher.dataset_id(config.data, data),
            split=split,
            tokenizer_fingerprint=data.tokenizer.fingerprint,
            vocab_size=vocab,
            token_source=examples,
        )
        return teacher_store.StoreSource(examples, store)

    train_source, eval_source = data.train, data.validation
    if config.mode == "offline" and config.loss != "ce":
        train_source = checked(config.store_dir, "train", data.train)
    if teacher is None and config.store_validation_dir:
        eval_source = checked(config.store_validation_dir, "validation", data.validation)
    return train_source, eval_source


def batch_examples(config, local_batch, train_source, eval_source):
    """Zero batches with the exact shapes and dtypes of a train and an eval batch (for the shardings)."""
    seq_len = config.data.seq_len
    base = {"tokens": np.zeros((local_batch, seq_len + 1), np.int32)}

    def with_store(source):
        if not isinstance(source, teacher_store.StoreSource):
            return dict(base)
        m = source._store.manifest  # TODO(lead): public accessor from teacher_store
        return {
            **base,
            "teacher_ids": np.zeros((local_batch, seq_len, m["k"]), np.int32),
            "teacher_logprobs": np.zeros((local_batch, seq_len, m["k"]), teacher_store._np_dtype(m["logprob_dtype"])),
            "teacher_label_logprob": np.zeros((local_batch, seq_len), np.float32),
            "teacher_tail_logprob": np.zeros((local_batch, seq_len), np.float32),
        }

    # A store source adds a mask to each example (packed text has none: every position counts); eval batches
    # are padded, so they always have one.
    mask = {"mask": np.zeros((local_batch, seq_len), np.float32)}
    train = with_store(train_source)
    return ({**train, **mask} if len(train) > 1 else train), {**with_store(eval_source), **mask}


def make_objective(config, teacher, eos_id) -> steps.Objective:
    """The step's objective for config.mode and config.loss (`kdjax.distill`), with the config's
    hyper-parameters."""
    return distill.make_loss_fn(
        mode=config.mode,
        loss=config.loss,
        temperature=config.temperature,
        ce_alpha=config.ce_alpha,
        hparams=distill.divergence_hparams(config.loss, jsd_beta=config.jsd_beta, skew_alpha=config.skew_alpha),
        tail=config.topk_tail,
        teacher_graphdef=teacher.graphdef if teacher else None,
        on_policy_fraction=config.on_policy_fraction,
        prompt_len=config.prompt_len,
        sample_temperature=config.sample_temperature,
        eos_id=eos_id,
        chunk_size=config.loss_chunk_size,
    )


def make_evaluator(config, spec, teacher, eval_source, eval_sh, teacher_sh, mesh):
    """`run_eval(params) -> {"val/...": float}` over config.eval_batches held-out batches: the student's CE and
    perplexity, and the teacher's side (KL, agreement, acceptance) from the teacher model or the store."""
    eval_step = steps.jit_eval_step(
        graphdef=spec.graphdef,
        metrics_fn=distill.make_eval_fn(teacher_graphdef=teacher.graphdef if teacher else None,
                                        chunk_size=config.loss_chunk_size),
        params_shardings=spec.shardings.params,
        batch_shardings=eval_sh,
        mesh=mesh,
        frozen_shardings=teacher_sh,
        rules=tuple(config.sharding_rules),
    )

    def run_eval(params):
        m = loop.evaluate(eval_step, params, run.eval_batches(eval_source, config), eval_sh,
                          frozen=teacher.params if teacher else None, max_batches=config.eval_batches)
        result = {f"val/{k}": v for k, v in m.items()}
        result["val/perplexity"] = float(np.exp(m["ce"]))
        if "teacher_ce" in m:
            result["val/teacher_perplexity"] = float(np.exp(m["teacher_ce"]))
        return result

    return run_eval


def train(config, workdir: str, *, overridden=()) -> dict:
    """Runs (or resumes) one distillation job; returns the final validation metrics."""
    validate(config, overridden)
    mesh, rules = sharding.make_mesh(config.mesh), tuple(config.sharding_rules)
    teacher, init = load_models(config, mesh, rules)
    data, vocab = load_data(config, teacher, init)
    print(data.description)
    train_source, eval_source = open_stores(config, data, vocab, teacher)
    if init is not None:
        model_cfg = init.config  # the loaded student's own architecture (validate() refused model.* overrides)
    else:
        model_cfg = run.new_model_config(config.model, vocab_size=vocab, max_len=config.data.seq_len)
    run.prepare_workdir(workdir, config, model_config=model_cfg)
    pretrained.save_model_files(workdir, model_cfg, data.tokenizer)
    print(
        f"student: {model_cfg.num_params() / 1e6:.2f}M parameters"
        + (f"; teacher: {teacher.config.num_params() / 1e6:.2f}M" if teacher else "")
        + f"; mode {config.mode}, loss {config.loss}; mesh {dict(mesh.shape)}"
    )

    tx = run.make_optimizer(config)
    taid = config.loss == "taid"
    spec = steps.train_state_spec(
        lambda rngs: Transformer(model_cfg, rngs=rngs), tx, seed=config.seed, mesh=mesh, rules=rules,
        extra={"taid": losses.taid_init(losses.TaidSchedule(**config.taid.to_dict()))} if taid else None,
    )
    train_example, eval_example = batch_examples(config, run.local_batch_size(config), train_source, eval_source)
    batch_sh = sharding.batch_shardings(train_example, mesh, rules)
    eval_sh = sharding.batch_shardings(eval_example, mesh, rules)
    teacher_sh = sharding.tree_shardings(teacher.params, rules, mesh) if teacher else None
    train_uses_teacher = distill.needs_teacher_model(config.mode, config.loss)
    train_step = steps.jit_train_step(
        graphdef=spec.graphdef,
        tx=tx,
        loss_fn=make_objective(config, teacher, data.tokenizer.eos_id),
        state_shardings=spec.shardings,
        batch_shardings=batch_sh,
        mesh=mesh,
        frozen_shardings=teacher_sh if train_uses_teacher else None,
        accum_steps=config.accum_steps,
        extra_update=distill.make_taid_update(total_steps=config.steps, **config.taid.to_dict()) if taid else None,
        rules=tuple(config.sharding_rules),
    )
    run_eval = make_evaluator(config, spec, teacher, eval_source, eval_sh, teacher_sh, mesh)
    state, val = run.fit(
        workdir,
        config,
        spec=spec,
        data_iter=run.train_iterator(train_source, config),
        train_step=train_step,
        batch_shardings=batch_sh,
        run_eval=run_eval,
        tokens_per_step=config.batch_size * config.data.seq_len,
        frozen=teacher.params if train_uses_teacher else None,
        init_params=init.params if init is not None else None,
        desc=f"{config.mode}/{config.loss}",
    )
    if jax.process_index() == 0:
        plot_curves(workdir)
    if config.export_hf_dir:
        hf.save_hf(config.export_hf_dir, nnx.merge(spec.graphdef, state.params), data.tokenizer,
                   max_positions=init.max_positions if init is not None else None)
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
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    overridden = cli.overridden_keys(sys.argv)
    result = cli.run_main(lambda: train(config, workdir, overridden=overridden), config)
    print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/lm_distill.py"))
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
