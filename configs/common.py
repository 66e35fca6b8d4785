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
