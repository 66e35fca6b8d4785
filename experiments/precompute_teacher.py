"""Precompute a teacher's top-k log-probs over a dataset split into a sharded, checksummed store.

  python -m experiments.precompute_teacher --config configs/precompute_teacher.py --workdir W [--verify]

The store goes to W/store-<split>/.  Rerunning the same command after a crash (or a SIGKILL) writes only
the shards that are missing; a finished store is never rewritten.  `--verify` checks a whole store end to
end (checksums, every example exactly once, shapes, ranges) and exits non-zero if anything is wrong.
Several processes (jax.distributed) each write the shards they own, with the teacher on their own devices.
"""

import os
import sys

import jax
from jax.experimental import multihost_utils
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from kdjax import cli, pretrained, sharding, teacher_store
from kdjax import distributed
from kdjax.data import text as text_data
from kdjax.models.transformer import Transformer, TransformerConfig


def store_path(workdir, config):
    return os.path.join(workdir, f"store-{config.split}")


def load_teacher(config, mesh, rules):
    """(graphdef, params, tokenizer, source) of config.teacher (kdjax work dir or HF directory); Nones when
    neither is given (the :tiny config's random teacher)."""
    teacher = pretrained.load_model(
        workdir=config.teacher.workdir, hf_path=config.teacher.hf_path, mesh=mesh, rules=rules, what="teacher"
    )
    if teacher is None:
        return None, None, None, None
    return teacher.graphdef, teacher.params, teacher.tokenizer, teacher.source


def precompute(config, workdir: str) -> dict:
    """Writes (or completes) the store; returns its manifest (None on a process that is not last)."""
    rules = tuple(config.sharding_rules)
    # Each process runs the teacher on its own devices over the shards it owns.
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())
    graphdef, params, tokenizer, source_dir = load_teacher(config, mesh, rules)
    data = text_data.load_from_config(
        config.data,
        tokenizer_path=os.path.join(source_dir, "tokenizer.json") if tokenizer else None,
        **({"vocab_size": tokenizer.vocab_size} if tokenizer else {}),
    )
    print(data.description)
    if graphdef is None:
        model_cfg = TransformerConfig.from_dict(
            {
                **config.teacher.model.to_dict(),
                "vocab_size": data.tokenizer.vocab_size,
                "max_len": config.data.seq_len,
            }
        )
        abstract_graphdef, _, shardings = pretrained.abstract_model(model_cfg, mesh, rules)
        graphdef = abstract_graphdef
        params = jax.jit(
            lambda: nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)[1],
            out_shardings=shardings,
        )()
    source = data.train if config.split == "train" else data.validation
    tokens_sharding = sharding.batch_sharding(mesh, rules, 2)

    def logits_fn(teacher_params, tokens_bt):
        # Params are an argument, not a closure: closed-over arrays would be baked into the program.
        tokens_bt = jax.lax.with_sharding_constraint(tokens_bt, tokens_sharding)
        return nnx.merge(graphdef, teacher_params)(tokens_bt)

    manifest = {
        "teacher_fingerprint": teacher_store.params_fingerprint(params),
        "teacher": source_dir or f"random init, seed {config.seed}",
        "tokenizer_fingerprint": data.tokenizer.fingerprint,
        "vocab_size": data.tokenizer.vocab_size,
        "dataset": f"{config.data.corpus}:{data.corpus_fingerprint[:16]}",
        "split": config.split,
        "seq_len": config.data.seq_len,
    }
    manifest = teacher_store.write_store(
        store_path(workdir, config),
        source=source,
        logits_fn=logits_fn,
        params=params,
        k=config.k,
        batch_size=config.batch_size,
        examples_per_shard=config.examples_per_shard,
        manifest=manifest,
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


def main(argv):
    distributed.initialize(flags.FLAGS.config)  # before any JAX computation
    del argv
    logging.set_verbosity(logging.WARNING)
    path = store_path(flags.FLAGS.workdir, flags.FLAGS.config)
    if flags.FLAGS.verify:
        report = teacher_store.verify_store(path)
        print(
            f"{path}: {'OK' if report['ok'] else 'FAILED'}; {report.get('num_examples')} examples in "
            f"{report.get('num_shards')} shards, {report.get('bytes_per_token')} bytes/token"
        )
        for problem in report["problems"]:
            print(f"  problem: {problem}")
        sys.exit(0 if report["ok"] else 1)
    manifest = precompute(flags.FLAGS.config, flags.FLAGS.workdir)
    if manifest:
        print(
            f"store complete: {path}: {manifest['num_examples']} examples, k={manifest['k']}, "
            f"{manifest['bytes_per_token']:.1f} bytes/token"
        )


if __name__ == "__main__":
    # Flags are defined only when run as a program, so tests and benchmarks can import several experiments.
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (with :arg).")
    flags.DEFINE_string("workdir", None, "The store goes to WORKDIR/store-<split>.")
    flags.DEFINE_bool("verify", False, "Check the store end to end instead of writing it.")
    cli.check_config_overrides(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
