"""Precompute a teacher's top-k log-probs over a dataset split into a sharded, checksummed store.

  python -m experiments.precompute_teacher --config configs/precompute_teacher.py --workdir W [--verify]

The store goes to W/store-<split>/.  Rerunning the same command after a crash (or a SIGKILL) writes only
the shards that are missing; a finished store is never rewritten.  `--verify` checks every store under W (or the
split named with --config.split) end to end (checksums, every example exactly once, shapes, ranges, the kept
tokenizer) and exits non-zero if anything is wrong.
Several processes (jax.distributed) each write the shards they own, with the teacher on their own devices.
"""

import os
import sys

import jax
from jax.experimental import multihost_utils
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from kdjax import cli, pretrained, run, sharding, teacher_store
from kdjax.data import text as text_data
from kdjax.models.transformer import Transformer


def store_path(workdir, config):
    return os.path.join(workdir, f"store-{config.split}")


def dataset_id(data_config, data) -> str:
    """What a store records as its data set, and what a student compares: the corpus name and the
    fingerprint of its documents (files and bytes)."""
    return f"{data_config.corpus}:{data.corpus_fingerprint[:16]}"


def validate(config):
    """Every check that needs no data or model, before anything is read or written."""
    with run.Problems("precompute_teacher config") as p:
        p.check(config.split in ("train", "validation"), f"split must be 'train' or 'validation', got {config.split!r}")
        p.check(config.k >= 1, f"k must be >= 1 (the number of top-k entries kept per token), got {config.k}")
        p.check(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
        p.check(config.examples_per_shard >= 1, f"examples_per_shard must be >= 1, got {config.examples_per_shard}")
        p.check(config.logprob_dtype in ("bfloat16", "float16", "float32"),
                f"logprob_dtype must be bfloat16, float16 or float32, got {config.logprob_dtype!r}")
        p.check(not (config.teacher.workdir and config.teacher.hf_path),
                "give teacher.workdir or teacher.hf_path, not both")
        run.check_path(p, config.teacher.workdir, "teacher.workdir", must_contain=run.MODEL_CONFIG_FILE)
        run.check_path(p, config.teacher.hf_path, "teacher.hf_path", must_contain="config.json")
        p.run(sharding.make_mesh, config.mesh, devices=jax.local_devices())


def load_teacher(config, mesh, rules):
    """(teacher, vocabulary size): config.teacher loaded into shardings (None for the :tiny config's random
    teacher), and the logit width the store is written for (the teacher model's: an HF model may have more
    embedding rows than its tokenizer has ids).  data.vocab_size may be 0 (take it) or equal."""
    teacher = pretrained.load_model(
        workdir=config.teacher.workdir, hf_path=config.teacher.hf_path, mesh=mesh, rules=rules, what="teacher"
    )
    want = config.data.vocab_size
    if teacher is None:
        if not want:
            raise run.ConfigError("a random teacher (no teacher.workdir / hf_path) needs --config.data.vocab_size")
        return None, want
    vocab = teacher.config.vocab_size
    if want and want != vocab:
        raise run.ConfigError(
            f"vocabulary conflict: teacher {teacher.source} defines vocab size {vocab} but "
            f"--config.data.vocab_size={want}; drop the setting (0 takes the teacher's)"
        )
    print(f"vocabulary: {vocab} ids and the tokenizer from teacher {teacher.source}")
    return teacher, vocab


def _random_teacher(config, vocab_size, mesh, rules):
    model_cfg = run.new_model_config(config.teacher.model, vocab_size=vocab_size, max_len=config.data.seq_len)
    graphdef, _, shardings = pretrained.abstract_model(model_cfg, mesh, rules)
    params = jax.jit(
        lambda: nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)[1],
        out_shardings=shardings,
    )()
    return graphdef, params


def store_manifest(config, data, params, vocab, teacher) -> dict:
    """What the store records about where it came from (see `teacher_store.store_identity`)."""
    return {
        "teacher_fingerprint": teacher_store.params_fingerprint(params),
        "teacher": teacher_store.teacher_record(
            workdir=config.teacher.workdir,
            hf_path=config.teacher.hf_path,
            description="" if teacher else f"random init, seed {config.seed}",
        ),
        "vocab_size": vocab,
        "eos_token": data.tokenizer.eos_token,  # a student without the teacher reads the data with it
        "dataset": dataset_id(config.data, data),
        "split": config.split,
        "seq_len": config.data.seq_len,
    }


def precompute(config, workdir: str) -> dict:
    """Writes (or completes) the store; returns its manifest (None on a process that is not last)."""
    validate(config)
    rules = tuple(config.sharding_rules)
    # Each process runs the teacher on its own devices over the shards it owns.
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())
    teacher, vocab = load_teacher(config, mesh, rules)
    if config.k > vocab:
        raise run.ConfigError(f"k={config.k} exceeds the vocabulary ({vocab} ids)")
    if os.path.isfile(workdir):
        raise run.ConfigError(f"work directory {workdir!r} exists and is a file, not a directory")
    data = text_data.load_from_config(
        config.data,
        tokenizer=teacher.tokenizer if teacher else None,
        vocab_size=teacher.tokenizer.vocab_size if teacher else vocab,
    )
    print(data.description)
    graphdef, params = (teacher.graphdef, teacher.params) if teacher else _random_teacher(config, vocab, mesh, rules)
    tokens_sharding = sharding.batch_sharding(mesh, rules, 2)

    def logits_fn(teacher_params, tokens_bt):
        # Params are an argument, not a closure: closed-over arrays would be baked into the program.
        tokens_bt = jax.lax.with_sharding_constraint(tokens_bt, tokens_sharding)
        return nnx.merge(graphdef, teacher_params)(tokens_bt)

    manifest = teacher_store.write_store(
        store_path(workdir, config),
        source=data.train if config.split == "train" else data.validation,
        logits_fn=logits_fn,
        params=params,
        tokenizer=data.tokenizer,
        k=config.k,
        batch_size=config.batch_size,
        examples_per_shard=config.examples_per_shard,
        manifest=store_manifest(config, data, params, vocab, teacher),
        logprob_dtype=config.logprob_dtype,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress=jax.process_index() == 0,
    )
    if jax.process_count() > 1:
        # Every process wrote its own shards; once all are done, one process writes the manifest.
        multihost_utils.sync_global_devices("teacher store shards written")
        if jax.process_index() == 0:
            manifest = teacher_store.finalize_store(store_path(workdir, config))
    return manifest


def verify(workdir, split=None) -> bool:
    """Checks every store under `workdir` (or only `split`'s) end to end; prints a report per store; returns
    whether all are sound."""
    reports = teacher_store.verify_stores(workdir, split=split)
    for path, report in reports.items():
        print(
            f"{path}: {'OK' if report['ok'] else 'FAILED'}; {report.get('num_examples')} examples in "
            f"{report.get('num_shards')} shards, {report.get('bytes_per_token')} bytes/token"
        )
        for problem in report["problems"]:
            print(f"  problem: {problem}")
    return all(report["ok"] for report in reports.values())


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if flags.FLAGS.verify:
        # Every split under the work directory, unless --config.split names one.
        split = config.split if "split" in cli.overridden_keys(sys.argv) else None
        sys.exit(0 if cli.run_main(lambda: verify(workdir, split), config) else 1)
    manifest = cli.run_main(lambda: precompute(config, workdir), config)
    if manifest:
        print(
            f"store complete: {store_path(workdir, config)}: {manifest['num_examples']} examples, "
            f"k={manifest['k']}, {manifest['bytes_per_token']:.1f} bytes/token"
        )


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, cli.config_help("configs/precompute_teacher.py"))
    flags.DEFINE_string("workdir", None, "The store goes to WORKDIR/store-<split>.")
    flags.DEFINE_bool("verify", False, "Check the store end to end instead of writing it.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
