"""What every config file shares: how `get_config(arg)` reads its argument.

`configs/x.py:tiny` passes "tiny"; no argument passes None.  Only ml_collections and the standard library
are imported here (configs never import kdjax).
"""


def variant(arg, allowed=("tiny",), *, name="this config"):
    """The variant `arg` names ("" for the default), or ValueError listing the ones `name` knows.

    Every `get_config(arg)` calls this first, so an unknown argument fails the same way everywhere instead
    of silently meaning the default.
    """
    arg = (arg or "").strip()
    if arg and arg not in allowed:
        known = ", ".join(repr(a) for a in ("", *allowed))
        raise ValueError(f"unknown config argument {arg!r} for {name}; expected one of {known}")
    return arg


def variants(arg, allowed, *, name="this config", exclusive=()):
    """The set of comma-separated variants `arg` names ("2d,tiny"), or ValueError listing the allowed ones.

    `exclusive`: groups of which at most one may be named (e.g. ("2d", "digits")).
    """
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    clash = [group for group in exclusive if sum(t in group for t in tokens) > 1]
    if [t for t in tokens if t not in allowed] or clash or len(set(tokens)) != len(tokens):
        rule = "".join(f"; at most one of {', '.join(map(repr, g))}" for g in exclusive)
        raise ValueError(f"unknown config argument {arg!r} for {name}; expected a comma-separated subset of "
                         f"{tuple(allowed)}{rule}")
    return set(tokens)
