"""Command-line helpers shared by the experiments."""

import difflib
import importlib.util
import sys


def _config_keys(config, prefix=""):
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys.extend(_config_keys(v, prefix + k + "."))
    return keys


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
