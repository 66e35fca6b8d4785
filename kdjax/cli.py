"""Command-line helpers shared by the experiments."""

import difflib
import importlib.util
import os
import sys


def _config_keys(config, prefix=""):
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys.extend(_config_keys(v, prefix + k + "."))
    return keys


def overridden_keys(argv, flag="config") -> tuple:
    """The config keys set on the command line (`--config.model.num_layers=3` -> "model.num_layers")."""
    prefix = f"--{flag}."
    return tuple(arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix))


def check_config_overrides(argv, flag="config"):
    """Exits with a clear message if a `--config.key=value` names a key the config file does not have.

    ml_collections itself fails on such a key with a bare AttributeError deep in flag parsing; a user
    deserves the key, the config it is missing from, and the nearest real keys.
    """
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            path = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return
    file, _, config_arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_kdjax_config_check", file)
    if spec is None:
        sys.exit(f"error: config file {file!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(config_arg or None)
    known = _config_keys(config)
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            key = arg[len(f"--{flag}.") :].split("=", 1)[0]
            if key not in known:
                near = difflib.get_close_matches(key, known, n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                sys.exit(f"error: unknown config key {key!r} in {arg!r}: {path} has no such key{hint}")


def user_error_types() -> tuple:
    """Exceptions a user causes and can fix from the message alone: printed as one line, exit status 1.

    Anything else is a bug in kdjax (or in a library) and keeps its traceback.
    """
    from kdjax import checkpoint, pretrained, run, teacher_store  # pylint: disable=g-import-not-at-top

    return (
        run.ConfigError,
        pretrained.ArchitectureMismatchError,
        checkpoint.CheckpointError,
        teacher_store.StoreMismatchError,
        teacher_store.CorruptShardError,
        FloatingPointError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
    )


def run_main(job, config=None):
    """What every experiment's `main` does: join the multi-process runtime (before any JAX computation),
    quiet orbax's per-file INFO logs, run `job()`, and turn an expected user error into one line on stderr
    and exit status 1 (a bug keeps its traceback).  Returns job()'s result."""
    from absl import logging  # pylint: disable=g-import-not-at-top

    from kdjax import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(config)
    logging.set_verbosity(logging.WARNING)
    try:
        return job()
    except user_error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def config_help(path: str, arg=None) -> str:
    """Help text for an experiment's --config flag: every key of `path`'s config with its default, so that
    `--help` shows what `--config.KEY=VALUE` can set."""
    spec = importlib.util.spec_from_file_location("_kdjax_config_help", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    lines = [f"Path to a configs/*.py file (with :arg), default {path}. Keys (override with --config.KEY=VALUE):"]
    for key in _config_keys(config):
        node = config
        for part in key.split("."):
            node = node[part]
        if not hasattr(node, "items"):
            lines.append(f"  {key} = {node!r}")
    return "\n".join(lines)


def enable_compilation_cache(path: str):
    """JAX's persistent compilation cache in `path`: a program compiled once (e.g. by the first of several
    seeds, or by an earlier run) is loaded instead of compiled again.  A cache directory already chosen in
    the environment (JAX_COMPILATION_CACHE_DIR, e.g. the test suite's shared one) wins over `path`."""
    import jax  # pylint: disable=g-import-not-at-top

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
