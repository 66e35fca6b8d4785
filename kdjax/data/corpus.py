"""The default corpus: the Python standard library's own source files.

Every machine that runs kdjax has it, so experiments need no download. The file list is
deterministic for a given Python installation (sorted relative POSIX paths, machine-specific
files excluded), and the train/validation split is a stable hash of each path, so a file keeps
its split when the file set changes (another Python patch release, or `max_files`).

Different Python versions ship different sources: anything cached from this corpus (tokenizer,
token streams, teacher logits) should be keyed by `files_fingerprint` as well as by the
tokenizer, or at least by the Python version that `describe` prints.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import sysconfig
from collections.abc import Sequence

SPLITS = ("train", "validation")
# Bytes read at a time by `files_fingerprint`.
_HASH_CHUNK = 1 << 20

# Directory names dropped wherever they appear. Third-party code and test suites are not
# "the standard library"; idlelib / lib2to3 / turtledemo are applications or deprecated tools
# with their own very repetitive style. `config-*` holds the build's machine-specific files.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
     "__pycache__"}
)
# File-name prefixes dropped: `_sysconfigdata_*.py` records this machine's build paths and
# flags, which would make the corpus differ between two installs of the same Python.
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata_",)


def stdlib_root() -> pathlib.Path:
    """Directory of the pure-Python standard library of the running interpreter.

    Inside a virtual environment sysconfig's "stdlib" path already points at the base
    interpreter's library (the venv only holds site-packages), which is what we want.
    """
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("config-")


def hash_unit(text: str, *, salt: str) -> float:
    """Maps `text` to [0, 1) with sha1: stable across processes and machines (unlike hash()).

    Shared by every corpus that splits or subsamples by name (kdjax.data.local_sources too), so
    one documented rule decides which file or record is in which split.
    """
    digest = hashlib.sha1(f"{salt}\0{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stdlib_files(
    *, max_files: int | None = None, root: str | os.PathLike | None = None
) -> list[str]:
    """Sorted relative POSIX paths of the corpus's `*.py` files under `root`.

    Args:
      max_files: if set, keep this many files, chosen by a salted sha1 of the path (so a tiny
        subset samples the whole library instead of the alphabetically first modules, and the
        subset for n is contained in the subset for n + 1). Returned sorted like the full list.
      root: library directory; defaults to `stdlib_root()` (tests pass a fake tree).

    Returns:
      Paths relative to `root`, "/"-separated, sorted by string comparison; identical on every
      machine with the same Python sources. Symlinked directories are not followed.
    """
    root = pathlib.Path(stdlib_root() if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Pruning in place stops os.walk from descending into excluded trees (site-packages
        # alone holds ~10k files here).
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith(EXCLUDED_FILE_PREFIXES):
                files.append((rel_dir / name).as_posix())
    files.sort()
    return files if max_files is None else subset_files(files, max_files=max_files)


def subset_files(files: Sequence[str], *, max_files: int) -> list[str]:
    """`max_files` of `files` chosen by a salted sha1 of each name, returned sorted.

    A tiny subset samples the whole collection instead of the alphabetically first names, and the
    subset for n is contained in the subset for n + 1. The salt keeps this choice independent of
    the split hash: without it a small subset would be exactly the files with the lowest split
    scores, i.e. all validation.
    """
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    return sorted(sorted(files, key=lambda f: hash_unit(f, salt="subset"))[:max_files])


def split_files(files: Sequence[str], *, val_fraction: float = 0.05) -> dict[str, list[str]]:
    """Splits files into {"train": [...], "validation": [...]} by a stable hash of each path.

    A file is in validation when sha1(path) mapped to [0, 1) is below `val_fraction`, so its
    split does not depend on which other files are present. When that leaves a split empty and
    there are >= 2 files, the single file whose hash is closest to the boundary is moved, so
    both splits are non-empty. Both lists are sorted; together they partition `files`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(set(files)) != len(files):
        raise ValueError("files contains duplicates")
    scores = {f: hash_unit(f, salt="split") for f in files}
    validation = {f for f in files if scores[f] < val_fraction}
    if len(files) >= 2 and not validation:
        validation = {min(files, key=scores.__getitem__)}
    elif len(files) >= 2 and len(validation) == len(files):
        validation.discard(max(files, key=scores.__getitem__))
    return {
        "train": sorted(f for f in files if f not in validation),
        "validation": sorted(validation),
    }


def read_files(files: Sequence[str], *, root: str | os.PathLike | None = None) -> list[str]:
    """Reads each file as text: UTF-8 with errors="replace", newlines kept byte-exact.

    Decoding from bytes (not text mode) keeps "\\r\\n" as is. Replacement (rather than
    surrogateescape) guarantees the result is valid Unicode that the tokenizer can encode;
    every stdlib source is UTF-8 (PEP 3120), so nothing is actually replaced in practice.
    """
    root = pathlib.Path(stdlib_root() if root is None else root)
    return [(root / f).read_bytes().decode("utf-8", errors="replace") for f in files]


def split_file_list(
    split: str,
    *,
    max_files: int | None = None,
    val_fraction: float = 0.05,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Relative paths of the files in `split` ("train" or "validation"), sorted."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    files = stdlib_files(max_files=max_files, root=root)
    return split_files(files, val_fraction=val_fraction)[split]


def read_documents(
    split: str,
    *,
    max_files: int | None = None,
    val_fraction: float = 0.05,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """The documents (one per source file, in sorted path order) of `split`.

    The order is part of the contract: token streams, packed example ids and the teacher store
    built from them depend on it.
    """
    files = split_file_list(split, max_files=max_files, val_fraction=val_fraction, root=root)
    return read_files(files, root=root)


def files_fingerprint(files: Sequence[str], *, root: str | os.PathLike | None = None) -> str:
    """sha256 hex over (path, contents) of `files` in order: names the corpus in cache keys."""
    root = pathlib.Path(stdlib_root() if root is None else root)
    h = hashlib.sha256()
    for f in files:
        # Length-prefixing makes the encoding unambiguous (no two file lists hash alike by
        # shifting bytes between a name and a body).
        name = f.encode("utf-8")
        h.update(len(name).to_bytes(8, "little"))
        h.update(name)
        with open(root / f, "rb") as stream:
            # Read in chunks: a user's corpus file can be larger than memory. The length prefix
            # must be the size actually hashed, so it is taken from the open file, and a file
            # that changes size while being read is an error rather than a wrong fingerprint.
            size = os.fstat(stream.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            hashed = 0
            while chunk := stream.read(_HASH_CHUNK):
                h.update(chunk)
                hashed += len(chunk)
        if hashed != size:
            raise ValueError(f"{root / f} changed size while it was being fingerprinted")
    return h.hexdigest()


def describe(
    *,
    max_files: int | None = None,
    val_fraction: float = 0.05,
    root: str | os.PathLike | None = None,
) -> str:
    """One-line size summary of the corpus, printed by experiments.

    Sizes are file sizes on disk in MB (10^6 bytes); the text read is the same number of UTF-8
    bytes. Ends with the Python version and library path, which determine the corpus.
    """
    root_path = pathlib.Path(stdlib_root() if root is None else root)
    files = stdlib_files(max_files=max_files, root=root_path)
    splits = split_files(files, val_fraction=val_fraction)
    mb = {k: sum((root_path / f).stat().st_size for f in v) / 1e6 for k, v in splits.items()}
    return (
        f"stdlib corpus: {len(files)} files, {sum(mb.values()):.2f} MB: "
        f"train {len(splits['train'])} files {mb['train']:.2f} MB, "
        f"validation {len(splits['validation'])} files {mb['validation']:.2f} MB "
        f"(Python {platform.python_version()}, {root_path})"
    )
