"""Host-side I/O shared by every module that writes files or gathers arrays: one implementation each.

    write_atomically(path, data)        bytes (or a writer function) -> temp file, fsync, rename
    write_json_atomically(path, obj)    the same for JSON
    read_json(path)
    fsync_dir(path)                     make a rename / create inside `path` durable
    to_host(x)                          numpy copy of a (possibly multi-host sharded) jax.Array
    hash_directory(path)                sha256 over a directory tree (checkpoint and store checksums)

Why atomic: a process killed mid-write must leave either the old file or the new one, never a torn one
that a later run would read (a tokenizer, a store record, a checkpoint checksum, a run's config).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import numpy as np


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and creations inside it survive a machine crash."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: bytes | Callable[[Any], None], *, make_parents=True) -> None:
    """Writes `path` via a temporary file in the same directory, fsync and `os.replace`.

    A process killed mid-write leaves at most a stray `.<name>.*.tmp` file, never a truncated `path`;
    concurrent writers (several hosts preparing the same cache) each replace it whole.

    Args:
      path: destination; parent directories are created.
      data: the bytes, or a function that writes them to a binary file object.
      make_parents: create missing parent directories; False raises FileNotFoundError instead (a record that
        must not resurrect a directory someone else just removed).
    """
    path = pathlib.Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; a cache or export shared between users/hosts should be readable.
            os.fchmod(f.fileno(), 0o644)
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())  # survive a machine crash too, not just a killed process
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomically(path: str | os.PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = True,
                          make_parents=True) -> None:
    """`obj` as JSON (trailing newline) at `path`, atomically (see `write_atomically`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    write_atomically(path, text.encode("utf-8"), make_parents=make_parents)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def to_host(x) -> np.ndarray:
    """A numpy copy of `x`; a jax.Array spread over several hosts is all-gathered first.

    In a multi-host run every process must call this for the same arrays (the gather is collective).
    """
    if getattr(x, "is_fully_addressable", True):
        import jax  # pylint: disable=g-import-not-at-top

        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hash_directory(path: str | os.PathLike, *, exclude: tuple = ()) -> tuple[str, dict]:
    """sha256 over every file under `path` (relative path, size and bytes, in sorted order) and the sizes.

    Returns ("sha256:<hex>", {relative path: size}).  Files whose relative path is in `exclude` are skipped
    (e.g. the checksum record kept inside the directory it describes).
    """
    import hashlib  # pylint: disable=g-import-not-at-top

    root = os.fspath(path)
    files = sorted(
        os.path.relpath(os.path.join(dirpath, name), root)
        for dirpath, _, names in os.walk(root)
        for name in names
    )
    h, sizes = hashlib.sha256(), {}
    for rel in files:
        if rel in exclude:
            continue
        full = os.path.join(root, rel)
        sizes[rel] = os.path.getsize(full)
        h.update(f"{rel}|{sizes[rel]}\n".encode())
        with open(full, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest(), sizes
