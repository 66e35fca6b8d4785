"""A user's own text on local disk: text files, JSONL, Parquet and Arrow (a `datasets` save_to_disk).

A corpus is named by a string, as in `config.data.corpus`:

  files:<dir | glob | file>      every file is one document (a directory: all files below it,
                                 hidden ones skipped), e.g. "files:/data/books/**/*.txt"
  jsonl:<dir | glob | file>      one document per non-blank line, the string at `text_field`
                                 ("a/b" reaches into nested objects); a directory: its *.jsonl
  parquet:<dir | glob | file>    one document per row, the string column `text_column`;
                                 a directory: its *.parquet
  arrow:<dir | glob | file>      the same for Arrow IPC files (stream or file format). A directory
                                 written by `datasets.Dataset.save_to_disk` (state.json beside
                                 *.arrow shards) is read in the dataset's own shard order.

Contract (what the token caches, the packed example ids and the teacher store rely on):
  * Document order: files sorted by relative POSIX path (a saved `datasets` dataset: the shard
    order of its state.json), then line / row order inside each file. Each split keeps that order.
  * Split: a document's key is its file's relative path, plus "\\0" and its record index (0-based,
    blank JSONL lines not counted) for JSONL / Parquet / Arrow records. It is in validation when
    `corpus.hash_unit(key, salt="split") < val_fraction`: the stdlib corpus's rule for files,
    extended to records, so a document keeps its split when other files are added or removed. With
    >= 2 documents both splits are non-empty: if the hash leaves one empty, the document with the
    lowest (highest) score moves to validation (train), exactly as `corpus.split_files` does.
    Records are split one by one rather than whole files, because record files are usually a few
    arbitrary shards: with 3 shards, whole-file splitting could give 0% or 33% validation.
  * Fingerprint: sha256 of the recipe (kind, field / column, val_fraction) and of every selected
    file's relative path and bytes (`corpus.files_fingerprint`). Any edited, added or removed file
    changes it, and with it every cache name; moving the whole directory does not.
  * `max_files` (0 = all) keeps that many files, chosen as `corpus.subset_files` chooses.
  * Bad input is a ValueError naming the file and line / row. Names that match nothing and missing
    columns are found when the corpus is opened; every document is read and checked once, before
    the first document is returned, so nothing derived from a bad corpus is ever written.

Only pyarrow (installed with tensorflow-datasets) is needed for Parquet / Arrow; `datasets` is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from kdjax.data import corpus

KINDS = ("files", "jsonl", "parquet", "arrow")
# File names a directory expands to, per kind ("" = every file).
_DIR_SUFFIX = {"files": "", "jsonl": ".jsonl", "parquet": ".parquet", "arrow": ".arrow"}
# Rows per Arrow / Parquet batch while reading: bounds the Python strings alive at once.
_BATCH_ROWS = 4096


def is_local_corpus(name: str) -> bool:
    """Whether `name` ("jsonl:/data/x.jsonl", ...) names a corpus of this module."""
    return name.partition(":")[0] in KINDS and ":" in name


@dataclasses.dataclass(frozen=True)
class LocalCorpus:
    """A resolved local corpus: which files, in which order, read how. Build with `open_corpus`.

    `documents(split)` gives the documents of "train" or "validation" in the contract's order.
    """

    kind: str
    spec: str  # the path or glob as the user gave it
    root: pathlib.Path  # relative paths below are relative to it
    files: tuple[str, ...]  # relative POSIX paths, in document order
    field: str  # JSONL field or Parquet / Arrow column; "" for text files
    val_fraction: float
    # (size, mtime_ns) per file when opened: reading a file that changed since is an error, since the
    # fingerprint (hence every cache name) would describe other bytes than the documents read.
    stats: tuple[tuple[int, int], ...]

    def check_unchanged(self) -> None:
        """ValueError naming the first file whose size or mtime differs from when it was opened."""
        for rel, before in zip(self.files, self.stats):
            if _stat(self.root / rel) != before:
                raise ValueError(f"{self.root / rel} changed after the corpus was opened; run again")

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex over the recipe and the files' paths and bytes (read once per object)."""
        recipe = json.dumps(
            {"kind": self.kind, "field": self.field, "val_fraction": self.val_fraction, "split_rule": 1},
            sort_keys=True,
        )
        contents = corpus.files_fingerprint(self.files, root=self.root)
        self.check_unchanged()
        return hashlib.sha256(f"{recipe}\0{contents}".encode()).hexdigest()

    def describe(self) -> str:
        mb = sum((self.root / f).stat().st_size for f in self.files) / 1e6
        what = f", {'field' if self.kind == 'jsonl' else 'column'} {self.field!r}" if self.field else ""
        n = len(self.files)
        return f"{self.kind} corpus {self.spec}: {n} file{'s' if n != 1 else ''}, {mb:.2f} MB{what}"

    def read_file(self, rel: str) -> Iterator[str]:
        """The documents of one file, in order; ValueError naming the file and line / row if bad."""
        return _READERS[self.kind](self.root / rel, self.field)

    @functools.cached_property
    def validation_masks(self) -> tuple[np.ndarray, ...]:
        """Per file, bool[num_documents]: which documents are in validation (the contract's rule).

        Computing it reads and checks every document of every file: the first `documents` call
        therefore fails on bad input before it returns anything.
        """
        counts = [sum(1 for _ in self.read_file(rel)) for rel in self.files]
        self.check_unchanged()
        keyed = self.kind != "files"
        scores = [
            np.array(
                [corpus.hash_unit(f"{rel}\0{i}" if keyed else rel, salt="split") for i in range(n)],
                np.float64,
            )
            for rel, n in zip(self.files, counts)
        ]
        return split_masks(scores, val_fraction=self.val_fraction, where=f"{self.kind}:{self.spec}")

    def documents(self, split: str) -> Iterator[str]:
        """The documents of `split` in document order (a lazy iterator; checks everything first)."""
        if split not in corpus.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {corpus.SPLITS}")
        masks = self.validation_masks  # eager, so bad input raises here and not mid-iteration
        return self._iter_documents(masks, split == "validation")

    def _iter_documents(self, masks, validation: bool) -> Iterator[str]:
        for rel, mask in zip(self.files, masks):
            keep = mask if validation else ~mask
            if keep.any():
                yield from (doc for doc, k in zip(self.read_file(rel), keep) if k)
        self.check_unchanged()


def split_masks(scores: Sequence[np.ndarray], *, val_fraction: float, where: str) -> tuple[np.ndarray, ...]:
    """Validation masks from per-document scores in [0, 1): score < val_fraction, both splits non-empty.

    Args:
      scores: per file, float64[num_documents] hash scores.
      val_fraction: in [0, 1).
      where: names the corpus in the error for fewer than two documents.

    Returns:
      Per file, bool[num_documents]. When that leaves validation (train) empty, the first document
      with the lowest (highest) score moves there; with >= 2 documents both are non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    flat = np.concatenate([np.asarray(s, np.float64) for s in scores]) if scores else np.zeros(0)
    if flat.size < 2:
        raise ValueError(
            f"corpus {where} has {flat.size} document(s); a train and a validation split need at least 2"
        )
    val = flat < val_fraction
    if not val.any():
        val[np.argmin(flat)] = True
    elif val.all():
        val[np.argmax(flat)] = False
    return tuple(np.split(val, np.cumsum([len(s) for s in scores])[:-1]))


# ------------------------------------------------------------------------------------- opening


def open_corpus(name: str, *, text_field: str = "text", text_column: str = "text", max_files: int = 0,
                val_fraction: float = 0.05) -> LocalCorpus:
    """Resolves `name` ("<kind>:<path or glob>") to its files and checks what is cheap to check.

    Args:
      name: see the module docstring; "~" is expanded, a relative path is relative to the cwd.
      text_field: JSONL field holding the text; "/" separates nested keys.
      text_column: Parquet / Arrow column holding the text (a string column, no nulls).
      max_files: 0 = every file; else that many, chosen by `corpus.subset_files`.
      val_fraction: in [0, 1); see the module docstring for the rule.

    Raises:
      ValueError: unknown kind, nothing matches, a saved DatasetDict instead of one split, a
        Parquet / Arrow file without the column or whose column is not a string.
    """
    kind, sep, spec = name.partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"unknown local corpus {name!r}; expected one of {[k + ':<path>' for k in KINDS]}")
    if not spec:
        raise ValueError(f"corpus {name!r} names no path")
    if max_files < 0:
        raise ValueError(f"max_files must be >= 0 (0 = all), got {max_files}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root, files = resolve_files(kind, spec)
    if max_files and max_files < len(files):
        chosen = set(corpus.subset_files(files, max_files=max_files))
        files = [f for f in files if f in chosen]  # keeps the document order (a saved dataset's shards)
    field = {"files": "", "jsonl": text_field}.get(kind, text_column)
    if not field and kind != "files":
        raise ValueError(f"corpus {name!r} needs a non-empty {'text_field' if kind == 'jsonl' else 'text_column'}")
    if kind in ("parquet", "arrow"):
        for rel in files:
            _check_string_column(_arrow_schema(kind, root / rel), root / rel, field)
    stats = tuple(_stat(root / rel) for rel in files)
    return LocalCorpus(kind, spec, root, tuple(files), field, float(val_fraction), stats)


def _stat(path: pathlib.Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def resolve_files(kind: str, spec: str) -> tuple[pathlib.Path, list[str]]:
    """(root, relative POSIX paths in document order) of a path, directory or glob.

    A glob's root is its longest directory prefix without wildcards ("**" matches across
    directories); a file's root is its directory. Directories and hidden names (".*") below a
    directory are skipped; a glob matches hidden names only when it spells the dot.
    """
    path = os.path.expanduser(spec)
    if glob.has_magic(path):
        parts = pathlib.Path(path).parts
        prefix = next(i for i, p in enumerate(parts) if glob.has_magic(p))
        root = pathlib.Path(*parts[:prefix]) if prefix else pathlib.Path(".")
        found = [pathlib.Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        files = sorted(p.relative_to(root).as_posix() for p in found)
        if not files:
            raise ValueError(f"{kind}:{spec}: no files match {path!r}")
        return root, files
    p = pathlib.Path(path)
    if p.is_file():
        return p.parent, [p.name]
    if not p.is_dir():
        raise ValueError(f"{kind}:{spec}: no such file or directory: {path}")
    if kind == "arrow" and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        return p, _saved_dataset_files(p)
    suffix = _DIR_SUFFIX[kind]
    files = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = pathlib.Path(dirpath).relative_to(p)
        files += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".") and f.endswith(suffix)]
    if not files:
        raise ValueError(f"{kind}:{spec}: no {'' if not suffix else '*' + suffix + ' '}files under {p}")
    return p, sorted(files)


def _saved_dataset_files(directory: pathlib.Path) -> list[str]:
    """The .arrow shards of a `datasets.Dataset.save_to_disk` directory, in the dataset's order."""
    if (directory / "dataset_dict.json").exists() and not (directory / "state.json").exists():
        splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise ValueError(
            f"{directory} is a saved DatasetDict (splits {splits}); name one split's directory, "
            f"e.g. arrow:{directory / (splits[0] if splits else 'train')}"
        )
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if state.get("_indices_data_files"):
        raise ValueError(
            f"{directory}/state.json has an indices mapping; save the dataset after `flatten_indices()`"
        )
    files = [entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise ValueError(f"{directory}/state.json lists no _data_files")
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ValueError(f"{directory}/state.json lists files that do not exist: {missing}")
    return files


# ------------------------------------------------------------------------------------- readers


def _read_text(path: pathlib.Path, field: str) -> Iterator[str]:
    """The file as one document: UTF-8, undecodable bytes replaced (as `corpus.read_files`)."""
    del field
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        # A directory often holds an image or an archive next to the text; NUL bytes never occur in
        # text files, and a binary file decoded as text would silently become training data.
        raise ValueError(
            f"{path}: byte {nul} is NUL, so this is not a text file; select the text "
            "files with a glob, e.g. files:<dir>/**/*.txt"
        )
    yield data.decode("utf-8", errors="replace")


def _read_jsonl(path: pathlib.Path, field: str) -> Iterator[str]:
    """The string at `field` of each non-blank line (a JSON object) of a JSONL file."""
    keys = field.split("/")
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                # From bytes: json detects UTF-8 (with or without BOM) / UTF-16 / UTF-32 itself.
                value = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: line is not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{where}: line is a JSON {type(value).__name__}, not an object")
            for depth, key in enumerate(keys):
                if not isinstance(value, dict) or key not in value:
                    at = "/".join(keys[:depth]) or "the top level"
                    have = sorted(value)[:10] if isinstance(value, dict) else type(value).__name__
                    raise ValueError(f"{where}: no field {field!r} ({at} has {have})")
                value = value[key]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
            yield value


def _arrow_schema(kind: str, path: pathlib.Path):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    try:
        if kind == "parquet":
            return pq.read_schema(path)
        with _open_ipc(path) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from None


def _check_string_column(schema, path: pathlib.Path, column: str) -> None:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top

    if column not in schema.names:
        raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
    t = schema.field(column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise ValueError(f"{path}: column {column!r} has type {t}, not a string")


@contextlib.contextmanager
def _open_ipc(path: pathlib.Path):
    """A memory-mapped Arrow IPC reader: the file format when the file starts with its magic, else
    the stream format (what `datasets` writes)."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top

    with pa.memory_map(str(path)) as source:
        is_file_format = source.read(6) == b"ARROW1"
        source.seek(0)
        yield pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)


def _record_batches(kind: str, path: pathlib.Path, column: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=[column])
        return
    with _open_ipc(path) as reader:
        if hasattr(reader, "num_record_batches"):  # file format: random access
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            yield from reader


def _read_columnar(kind: str) -> Callable[[pathlib.Path, str], Iterator[str]]:
    def read(path: pathlib.Path, column: str) -> Iterator[str]:
        _check_string_column(_arrow_schema(kind, path), path, column)
        row = 0
        for batch in _record_batches(kind, path, column):
            values = batch.column(batch.schema.get_field_index(column))
            if values.null_count:
                first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"{path}: row {row + first}: column {column!r} is null, not a string")
            yield from values.to_pylist()
            row += len(values)

    return read


_READERS = {
    "files": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_columnar("parquet"),
    "arrow": _read_columnar("arrow"),
}
