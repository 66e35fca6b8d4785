"""A conditional corpus: every standard-library source file labelled with one of 14 documented categories.

The condition of the CFG-distillation experiments (`experiments/cfg_distill.py`) is a file's category,
given to the LM as a short text prefix left-padded with EOS to a fixed length P:

    condition prefix  = [EOS] * (P - n) + encode("# category: <name>\\n")        (n tokens of text)
    null prefix       = [EOS] * P                                               (a document start, no category)

so one vocabulary (the corpus tokenizer's) serves both, the model is an ordinary `Transformer`, and the
unconditional distribution is the LM's distribution at a document start.

Category of a file = the category of its top-level module or package (`email/mime/text.py` -> `email` ->
"email"), by the table `MODULES` below (Python 3.11's standard library, every module placed by what it is
for).  Two packages are dropped on purpose (`DROPPED`): `encodings` (122 generated codec tables, 1.4 MB of
repetitive numbers) and `pydoc_data` (one 750 kB generated text literal); neither is code anyone writes.
A top-level module the table does not know (another Python version's) is dropped too and named in
`Assignment.dropped` with the reason, never silently put in a class.

Examples (`ConditionalWindows`): prefix + a window of W = seq_len + 1 - P consecutive tokens of ONE file
(windows never cross files, so never categories).  A file's token stream (its tokens then EOS) is cut at
0, W, 2W, ...; the last window is aligned to end at the file's end (it may overlap the one before) so that
only files shorter than W give padded windows.  Example ids enumerate (file in sorted path order, window
start): stable given the files, the tokenizer, P and seq_len.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

from kdjax.data import corpus
from kdjax.data.tokenizer import Tokenizer, get_or_train_tokenizer
from kdjax.hostio import write_atomically

# (name, what it holds).  The order fixes the class ids 0 .. K-1.
CATEGORIES = (
    ("email", "mail, news and MIME: email, mailbox, smtplib, imaplib, poplib, nntplib, base64, quopri"),
    ("web", "HTTP, URLs, HTML, sockets and servers: http, urllib, html, xmlrpc, wsgiref, ssl, ftplib"),
    ("asyncio", "the asyncio event loop and the older asyncore / asynchat, selectors"),
    ("concurrency", "processes and threads: multiprocessing, concurrent.futures, threading, subprocess, queue"),
    ("xml", "XML parsers and trees: xml.dom, xml.sax, xml.etree, xml.parsers, plistlib"),
    ("testing", "testing, debugging and introspection tools: unittest, doctest, pdb, profile, trace, pydoc"),
    ("packaging", "building, installing and importing: distutils, importlib, venv, site, zipimport, runpy"),
    ("gui", "graphical and terminal interfaces: tkinter, turtle, curses"),
    ("files", "files, paths, archives and compression: os, pathlib, shutil, tarfile, zipfile, gzip, io, audio files"),
    ("formats", "data formats and storage: pickle, json, csv, configparser, tomllib, dbm, shelve, sqlite3"),
    ("text", "strings, regular expressions, dates and locales: re, string, textwrap, difflib, datetime, locale"),
    ("cli", "command lines and logging: argparse, optparse, getopt, logging, warnings, pprint"),
    ("runtime", "the language and its runtime: typing, inspect, ast, dis, enum, dataclasses, functools, ctypes"),
    ("math", "numbers, randomness and hashing: decimal, fractions, statistics, random, hashlib, uuid, ipaddress"),
)
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES)

# Category -> the top-level modules / packages in it (Python 3.11's standard library, every one placed).
MODULES = {
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib", "nntplib", "smtpd", "mailcap", "mimetypes",
              "quopri", "base64", "uu"),
    "web": ("http", "urllib", "html", "_markupbase", "xmlrpc", "wsgiref", "cgi", "cgitb", "webbrowser",
            "socketserver", "socket", "ssl", "ftplib", "telnetlib", "nturl2path"),
    "asyncio": ("asyncio", "asyncore", "asynchat", "selectors"),
    "concurrency": ("multiprocessing", "concurrent", "threading", "_threading_local", "queue", "subprocess",
                    "_bootsubprocess", "sched", "signal", "pty", "tty", "pipes"),
    "xml": ("xml", "plistlib"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "profile", "cProfile", "pstats", "timeit",
                "tracemalloc", "traceback", "cmd", "code", "codeop", "rlcompleter", "tabnanny", "pyclbr", "pydoc"),
    "packaging": ("distutils", "importlib", "ensurepip", "venv", "site", "sysconfig", "pkgutil", "modulefinder",
                  "runpy", "zipimport", "compileall", "py_compile", "imp", "zipapp", "_osx_support", "_aix_support",
                  "_sitebuiltins", "platform", "__hello__", "__phello__", "antigravity", "this"),
    "gui": ("tkinter", "turtle", "curses", "colorsys"),
    "files": ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "fileinput", "posixpath",
              "ntpath", "genericpath", "stat", "io", "_pyio", "tarfile", "zipfile", "gzip", "bz2", "lzma",
              "_compression", "chunk", "aifc", "wave", "sunau", "sndhdr", "imghdr", "linecache", "getpass"),
    "formats": ("pickle", "pickletools", "_compat_pickle", "copyreg", "json", "csv", "configparser", "netrc",
                "tomllib", "shelve", "dbm", "sqlite3", "xdrlib", "struct"),
    "text": ("re", "sre_compile", "sre_constants", "sre_parse", "string", "textwrap", "difflib", "locale",
             "gettext", "calendar", "_strptime", "datetime", "zoneinfo", "tokenize", "token", "keyword", "shlex",
             "codecs", "stringprep"),
    "cli": ("argparse", "optparse", "getopt", "logging", "warnings", "pprint", "reprlib"),
    "runtime": ("typing", "inspect", "ast", "dis", "opcode", "symtable", "enum", "dataclasses", "functools",
                "collections", "_collections_abc", "abc", "_py_abc", "types", "weakref", "_weakrefset",
                "contextlib", "contextvars", "copy", "operator", "__future__", "numbers", "ctypes"),
    "math": ("_pydecimal", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "graphlib",
             "hashlib", "hmac", "secrets", "uuid", "crypt", "ipaddress"),
}
# Top-level packages dropped on purpose, with the reason.
DROPPED = {
    "encodings": "generated codec tables (122 files of numbers), not code anyone writes",
    "pydoc_data": "one generated text literal (pydoc's topic index)",
}
_MODULE_CATEGORY = {m: CATEGORY_NAMES.index(c) for c, mods in MODULES.items() for m in mods}
PREFIX_TEMPLATE = "# category: {}\n"


def _check_table():
    names = [m for mods in MODULES.values() for m in mods]
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup or set(MODULES) != set(CATEGORY_NAMES) or set(names) & set(DROPPED):
        raise AssertionError(f"category table inconsistent: duplicates {dup}")


_check_table()


def num_categories() -> int:
    return len(CATEGORIES)


def top_level(path: str) -> str:
    """`email/mime/text.py` -> `email`; `os.py` -> `os` (a relative POSIX path of the corpus)."""
    return path.split("/", 1)[0].removesuffix(".py")


def category_of(path: str) -> Optional[int]:
    """The class id of a corpus file, or None when it is dropped (see `assign` for why)."""
    return _MODULE_CATEGORY.get(top_level(path))


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Which files are kept with which class, and which are dropped with which reason."""

    labels: dict  # path -> class id
    dropped: dict  # path -> reason

    def describe(self) -> str:
        counts = np.bincount(list(self.labels.values()), minlength=num_categories())
        unknown = sorted({top_level(p) for p, r in self.dropped.items() if r.startswith("unmapped")})
        return (f"{len(self.labels)} files in {num_categories()} categories ("
                + ", ".join(f"{n} {c}" for n, c in zip(CATEGORY_NAMES, counts))
                + f"); dropped {len(self.dropped)} files"
                + (f", including unmapped modules {unknown}" if unknown else ""))


def assign(files: Sequence[str]) -> Assignment:
    """Labels every file or names why it is dropped: one of `DROPPED`, or a module the table does not know."""
    labels, dropped = {}, {}
    for f in files:
        c = category_of(f)
        if c is not None:
            labels[f] = c
        elif top_level(f) in DROPPED:
            dropped[f] = DROPPED[top_level(f)]
        else:
            dropped[f] = f"unmapped module {top_level(f)!r} (not in kdjax.data.categories.MODULES)"
    return Assignment(labels, dropped)


# --------------------------------------------------------------------------------------------------------
# Prefixes and examples.


def condition_prefixes(tokenizer: Tokenizer, *, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prefix_kp int32 [K, P], null_p int32 [P]): each category's text prefix left-padded with EOS to P, and
    the null prefix (P EOS).  length = 0 takes the longest encoded prefix; a shorter length is an error."""
    encoded = [tokenizer.encode(PREFIX_TEMPLATE.format(name)) for name in CATEGORY_NAMES]
    longest = max(len(e) for e in encoded)
    p = length or longest
    if p < longest:
        raise ValueError(f"prefix length {p} is shorter than the longest category prefix ({longest} tokens)")
    eos = tokenizer.eos_id
    prefix = np.array([[eos] * (p - len(e)) + e for e in encoded], np.int32)
    return prefix, np.full((p,), eos, np.int32)


def window_starts(n: int, width: int) -> list[int]:
    """Starts of the windows of a stream of n tokens: 0, W, 2W, ... with the last one ending at n."""
    if n <= width:
        return [0]
    starts = list(range(0, n - width, width))
    return starts + [n - width]


class ConditionalWindows:
    """Random-access source of prefix + one-file windows (a grain data source).

    Example i: {"tokens": int32[T + 1] = prefix(P) + window(W) padded with EOS, "loss_mask": float32[T] (1
    where the label tokens[j + 1] is a real window token; the prefix's own tokens are never labels), "label":
    int32 class id, "example_id": int64 i}, T = seq_len.  (Not "mask": `pipeline.eval_batches` sets that one
    to the row's validity and passes other fields through.)  `files_tokens` are the files' token arrays (EOS-terminated)
    in a fixed order, `labels` their classes.
    """

    def __init__(self, files_tokens: Sequence[np.ndarray], labels: Sequence[int], prefix_kp: np.ndarray, *,
                 seq_len: int, eos_id: int):
        p = prefix_kp.shape[1]
        self.width = seq_len + 1 - p
        if self.width < 2:
            raise ValueError(f"seq_len {seq_len} leaves no room for a window after the {p}-token prefix")
        if len(files_tokens) != len(labels) or not len(files_tokens):
            raise ValueError("need one label per file and at least one file")
        self.files_tokens, self.labels, self.prefix_kp, self.seq_len = files_tokens, labels, prefix_kp, seq_len
        self.eos_id = eos_id
        self.index = np.array([(f, s) for f, toks in enumerate(files_tokens)
                               for s in window_starts(len(toks), self.width)], np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        i = int(i)
        f, s = self.index[i]
        label = int(self.labels[f])
        window = np.asarray(self.files_tokens[f][s: s + self.width], np.int32)
        p = self.prefix_kp.shape[1]
        pad = self.width - len(window)
        tokens = np.concatenate([self.prefix_kp[label], window, np.full((pad,), self.eos_id, np.int32)])
        mask = np.zeros((self.seq_len,), np.float32)
        mask[p - 1: p - 1 + len(window)] = 1.0
        return {"tokens": tokens, "loss_mask": mask, "label": np.int32(label), "example_id": np.int64(i)}

    def class_counts(self) -> np.ndarray:
        return np.bincount(np.asarray(self.labels)[self.index[:, 0]], minlength=len(self.prefix_kp))


class PromptSource:
    """Balanced prompts for on-policy training: example i = {"prompt": prefix of class i mod K, "label"},
    `repeats` rounds of the K classes (the pipeline shuffles them)."""

    def __init__(self, prefix_kp: np.ndarray, *, repeats: int = 64):
        self.prefix_kp, self.repeats = prefix_kp, repeats

    def __len__(self) -> int:
        return len(self.prefix_kp) * self.repeats

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = i % len(self.prefix_kp)
        return {"prompt": self.prefix_kp[c].copy(), "label": np.int32(c), "example_id": np.int64(i)}


# --------------------------------------------------------------------------------------------------------
# Loading: tokenizer and per-file token arrays, cached.


@dataclasses.dataclass
class ConditionalData:
    tokenizer: Tokenizer
    prefix_kp: np.ndarray  # [K, P] int32
    null_p: np.ndarray  # [P] int32
    train: ConditionalWindows
    validation: ConditionalWindows
    assignment: Assignment
    fingerprint: str  # the kept files' bytes and paths
    description: str


def _file_tokens(cache: pathlib.Path, key: str, tokenizer: Tokenizer, files: Sequence[str], root) -> list[np.ndarray]:
    """Each file's token ids then EOS, cached as one .npz (stream + offsets) under `key`."""
    path = cache / f"cond-tokens-{key}.npz"
    if not path.exists():
        ids = tokenizer.encode_batch(corpus.read_files(files, root=root))
        stream = np.concatenate([np.asarray(i + [tokenizer.eos_id], np.int32) for i in ids])
        offsets = np.cumsum([0] + [len(i) + 1 for i in ids])
        write_atomically(path, lambda f: np.savez(f, stream=stream, offsets=offsets))
    with np.load(path) as z:
        stream, offsets = z["stream"], z["offsets"]
    if len(offsets) != len(files) + 1:
        raise ValueError(f"{path} holds {len(offsets) - 1} files, expected {len(files)}: a stale cache?")
    return [stream[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def split_by_category(assignment: Assignment, *, val_fraction: float) -> dict[str, list[str]]:
    """`corpus.split_files` within each category (the same stable per-path hash rule), so that every category
    with >= 2 files has validation files; both lists sorted."""
    out = {"train": [], "validation": []}
    for c in range(num_categories()):
        files = sorted(f for f, label in assignment.labels.items() if label == c)
        if files:
            for split, names in corpus.split_files(files, val_fraction=val_fraction).items():
                out[split] += names
    return {k: sorted(v) for k, v in out.items()}


def load_conditional_data(*, vocab_size: int, seq_len: int, cache_dir: str = "~/.cache/kdjax", max_files: int = 0,
                          val_fraction: float = 0.05, prefix_len: int = 0, tokenizer: Optional[Tokenizer] = None,
                          root=None) -> ConditionalData:
    """The labelled stdlib corpus: tokenizer (trained on the kept train files, or given), prefixes, windows.

    Cache files (in cache_dir) are keyed by the kept files' fingerprint, the vocabulary size and the tokenizer,
    so changing any of them never reuses a stale file.  `root` replaces the standard library (tests).
    """
    files = corpus.stdlib_files(max_files=max_files or None, root=root)
    assignment = assign(files)
    splits = split_by_category(assignment, val_fraction=val_fraction)
    fingerprint = corpus.files_fingerprint(splits["train"] + splits["validation"], root=root)
    cache = pathlib.Path(os.path.expanduser(cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = get_or_train_tokenizer(cache / f"cond-tokenizer-{fingerprint[:12]}-v{vocab_size}.json",
                                           lambda: corpus.read_files(splits["train"], root=root), vocab_size=vocab_size)
    elif tokenizer.vocab_size != vocab_size:
        raise ValueError(f"the given tokenizer has {tokenizer.vocab_size} ids, the config says {vocab_size}")
    prefix_kp, null_p = condition_prefixes(tokenizer, length=prefix_len)
    sources = {}
    for split, names in splits.items():
        key = hashlib.sha256(f"{fingerprint}\0{tokenizer.fingerprint}\0{split}".encode()).hexdigest()[:16]
        toks = _file_tokens(cache, key, tokenizer, names, root)
        sources[split] = ConditionalWindows(toks, [assignment.labels[f] for f in names], prefix_kp, seq_len=seq_len,
                                             eos_id=tokenizer.eos_id)
    desc = (f"conditional stdlib corpus: {assignment.describe()}; train {len(sources['train'])} windows of "
            f"{sources['train'].width} tokens, validation {len(sources['validation'])}; prefix {prefix_kp.shape[1]} "
            f"tokens; vocab {tokenizer.vocab_size}")
    return ConditionalData(tokenizer, prefix_kp, null_p, sources["train"], sources["validation"], assignment,
                           fingerprint, desc)
