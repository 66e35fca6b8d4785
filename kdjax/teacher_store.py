"""Offline teacher store: run a teacher once, keep its top-k per token, distil from disk many times.

Per token we keep the teacher's top-k ids, their full-vocabulary log-probs, the log-prob of the
actual next token and the log of the probability mass outside the top-k. That is enough for
top-k / tail-bucket KD and for exact teacher perplexity without the teacher.

Shape suffixes: b batch, t time (= seq_len, the model input length), v vocabulary, k top-k,
n examples in a shard.

Format: tensorstore zarr3 with the `sharding_indexed` codec, chosen over array_record because
every record has the same shape ([seq_len, k] per field per example). A fixed-shape array gives
O(1) random access by example id (shard = id // E, row = id % E) with no per-record
serialisation or index lookup, reads one contiguous inner chunk per example and field, and lets
zarr's `crc32c` codec check every inner chunk (and the shard index) on every read, so a flipped
byte can never decode into wrong numbers silently. array_record would buy variable-length
records we do not need, and we would have to write the (de)serialisation ourselves.

On-disk layout (format 2; all paths relative to the store root)::

  config.json                  what is being written (identity); a resume must match it
  tokenizer.json               the tokenizer the examples were tokenized with (when the writer got it)
  manifest.json                written once, when every shard is complete; never rewritten
  shards/00007/                one zarr3 group per shard: examples [7 E, 8 E)
    teacher_ids/               uint8/16/32 [n, t, k]  (narrowest type that fits the vocab)
    teacher_logprobs/          bf16 (configurable) [n, t, k]
    teacher_label_logprob/     f32 [n, t]
    teacher_tail_logprob/      f32 [n, t]
    example_id/                int64 [n], lets `verify_store` prove each id is present once
    token_checksum/            uint64 [n], `tokens_checksum` of the example the targets belong to
  shards/00007.json            completion record: sha256 over the shard's files, sizes

Provenance. A store is only valid for the exact examples and teacher it was written from. The
manifest records the teacher (`teacher_fingerprint`, and `teacher`: where it came from), the
tokenizer (`tokenizer_fingerprint`, its tokenizer.json kept beside the shards), the data
(`dataset`, `split`, `num_examples`, `seq_len`); `check_provenance` compares them with a run's
and names every difference. Per example, `token_checksum` holds a hash of the tokens the targets
were computed from, and `StoreSource` checks it for every example it serves: a store over other
data can never hand out another text's targets, whatever the manifest says.

Each zarr3 array of a shard is one sharded file (`c/0/0/0`, inner chunk = one example) plus
its `zarr.json`. A shard is written under a temporary directory name, fsynced, renamed into
place (atomic on POSIX), and only then is its completion record written (also temp + rename).
A shard without a record is garbage from a killed writer and is rewritten by its owner.
Shards are keyed by example id only, never by step or process, so any number of processes can
write a store and any number can read it. Paths must be on a POSIX filesystem (rename).

Writing is a pipeline (`write_store`): the main thread reads tokens and dispatches the teacher;
one host thread fetches each batch's targets, checksums its tokens and assembles shards
(`ShardAssembler`); one writer thread encodes, fsyncs and records finished shards. Both
threads are `BoundedWorker`s: at most a few batches / shards wait, so memory stays bounded,
and the teacher computes batch i + 1 while batch i is fetched and written.
"""

import collections
import concurrent.futures
import functools
import hashlib
import json
import os
import shutil
import threading
import uuid
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from kdjax import progress
from kdjax.hostio import (
    fsync_dir,
    hash_directory,
    read_json,
    to_host,
    write_atomically,
    write_json_atomically,
)

FORMAT_VERSION = 2
LAYOUT = "zarr3+sharding_indexed+crc32c, one zarr group per shard of examples"
TOKEN_CHECKSUM = "blake2b-64 of the example's tokens as little-endian int32 [seq_len + 1]"
TOKENIZER_FILE = "tokenizer.json"

# The teacher targets of a shard; it also stores `example_id` and `token_checksum`.
_FIELDS = ("teacher_ids", "teacher_logprobs", "teacher_label_logprob", "teacher_tail_logprob")
_CHECKSUM = "token_checksum"
_REQUIRED_MANIFEST_KEYS = ("teacher_fingerprint", "dataset", "split")
# Keys the final manifest adds to the identity written in config.json.
_MANIFEST_ONLY_KEYS = ("complete", "shards", "total_bytes", "num_tokens", "bytes_per_token")
_RERUN = "re-run experiments.precompute_teacher into a new directory (or delete this one first)"


class StoreMismatchError(ValueError):
    """The store was written for something other than what the caller asked for."""


class CorruptShardError(IOError):
    """A shard's bytes disagree with its recorded checksum or cannot be decoded."""


# --------------------------------------------------------------------------------------------
# Pure pieces: top-k targets, dtypes, checksums, fingerprints.


def topk_targets(logits_btv, labels_bt, *, k):
    """Top-k teacher targets per token, computed in float32 from the full distribution.

    With log p = log_softmax(logits):
      teacher_ids[b, t]           the k most likely ids, most likely first
      teacher_logprobs[b, t]      log p of those ids (full-vocabulary normalisation)
      teacher_label_logprob[b, t] log p[label]; exp(-mean) is the exact teacher perplexity
      teacher_tail_logprob[b, t]  log sum_{i not in top-k} p_i, by logsumexp over the non-top-k
                                  logits (not log(1 - sum top-k), which cancels catastrophically
                                  when the top-k holds almost all the mass); -inf when k = V.
    Jittable; run it inside the teacher's jit so only [B, T, k] leaves the device.

    Args:
      logits_btv: [B, T, V] logits, any float dtype.
      labels_bt: [B, T] int next-token ids.
      k: number of entries kept, 1 <= k <= V.
    Returns:
      dict with int32 `teacher_ids` [B, T, k], float32 `teacher_logprobs` [B, T, k], float32
      `teacher_label_logprob` [B, T] and float32 `teacher_tail_logprob` [B, T].
    """
    logits_btv = logits_btv.astype(jnp.float32)
    if not 1 <= k <= logits_btv.shape[-1]:
        raise ValueError(f"k={k} must be in [1, V={logits_btv.shape[-1]}]")
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    top_logits_btk, ids_btk = jax.lax.top_k(logits_btv, k)
    label_logit_bt = jnp.take_along_axis(logits_btv, labels_bt[..., None].astype(jnp.int32), -1)
    # The masked copy costs one more [B, T, V] f32 buffer; it keeps the tail exact and is
    # cheaper than any alternative we measured (threshold-at-kth-value masks were slower on CPU).
    tail_logits_btv = jnp.put_along_axis(logits_btv, ids_btk, -jnp.inf, axis=-1, inplace=False)
    return {
        "teacher_ids": ids_btk.astype(jnp.int32),
        "teacher_logprobs": top_logits_btk - logz_bt[..., None],
        "teacher_label_logprob": label_logit_bt[..., 0] - logz_bt,
        "teacher_tail_logprob": jax.nn.logsumexp(tail_logits_btv, axis=-1) - logz_bt,
    }


def id_dtype_for_vocab(vocab_size):
    """Narrowest unsigned integer dtype holding ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def tokens_checksum(tokens_nl):
    """uint64 [n]: per example, blake2b (8-byte digest) of its tokens as little-endian int32.

    Cheap (about 1 us per example of 129 tokens) and independent of the tokens' dtype in memory
    (uint16 streams and int32 batches of the same ids hash the same). Not a security hash: it
    tells a store's example from another text's, where any accidental collision has
    probability 2^-64.

    Args:
      tokens_nl: int [n, L] (or [L] for one example) token ids, 0 <= id < 2^31.
    """
    tokens_nl = np.asarray(tokens_nl)
    if not np.issubdtype(tokens_nl.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {tokens_nl.dtype}")
    rows = np.ascontiguousarray(np.atleast_2d(tokens_nl), dtype="<i4")
    return np.array(
        [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in rows],
        np.uint64,
    )


def params_fingerprint(params):
    """sha256 over a pytree's leaf paths, shapes, dtypes and bytes: same params, same string.

    Gathers one leaf at a time to the host (`hostio.to_host`: all-gathered first when not fully
    addressable, so in a multi-host run every process must call this).
    """
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        array = np.ascontiguousarray(to_host(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype.str}|{array.nbytes}\n"
        h.update(header.encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def file_fingerprint(path):
    """sha256 of a file's bytes, e.g. tokenizer.json for `tokenizer_fingerprint`."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_json_fingerprint(tokenizer_json):
    """sha256 hex of a tokenizer.json's text (utf-8): equals `kdjax.data.tokenizer.Tokenizer.fingerprint`."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def _tokenizer_json(tokenizer):
    """The tokenizer.json text of a kdjax Tokenizer (anything with `to_str()`), or the text itself."""
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    raise TypeError(f"tokenizer must be a tokenizer.json string or have to_str(), got {type(tokenizer)}")


# --------------------------------------------------------------------------------------------
# Identity and provenance: what a store was written from, and checks against a run.


def teacher_record(*, workdir="", hf_path="", description=""):
    """manifest["teacher"]: where the teacher came from, for messages that say what to pass.

    Exactly one of: a kdjax work directory, a Hugging Face path (both kept absolute when they are
    local directories, so a message is right from any working directory), or a free description
    (e.g. "random init, seed 0").
    """
    given = [(key, value) for key, value in (("workdir", workdir), ("hf_path", hf_path)) if value]
    if len(given) > 1:
        raise ValueError("a teacher is a kdjax work directory or a Hugging Face path, not both")
    if given:
        key, value = given[0]
        return {key: os.path.abspath(value) if os.path.isdir(value) else value}
    if not description:
        raise ValueError("teacher_record needs workdir, hf_path or description")
    return {"description": description}


def describe_teacher(manifest):
    """Where a store's teacher came from, as a phrase with the flag that selects it, e.g.
    "the kdjax work directory /t (--config.teacher.workdir=/t)"."""
    teacher = manifest.get("teacher")
    if isinstance(teacher, dict) and teacher.get("workdir"):
        path = teacher["workdir"]
        return f"the kdjax work directory {path} (--config.teacher.workdir={path})"
    if isinstance(teacher, dict) and teacher.get("hf_path"):
        return f"the Hugging Face model {teacher['hf_path']} (--config.teacher.hf_path={teacher['hf_path']})"
    if isinstance(teacher, dict) and teacher.get("description"):
        return f"a teacher described as {teacher['description']!r}"
    if teacher:
        return f"a teacher described as {teacher!r}"
    return "an unrecorded teacher"


def store_tokenizer_path(path):
    """The tokenizer.json a store's examples were tokenized with; read the data with it.

    Raises FileNotFoundError (naming the store) when the store was written without keeping it.
    """
    tokenizer_path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(
            f"teacher store {path} keeps no {TOKENIZER_FILE} (its writer was not given the tokenizer); "
            f"use the teacher's tokenizer ({describe_teacher(_read_identity(path))})"
        )
    return tokenizer_path


def store_tokenizer(path):
    """(Tokenizer, identity): the tokenizer a store's examples were tokenized with, with the EOS token its
    writer recorded, and the store's identity (config.json; `vocab_size` is the teacher's logit width).

    Raises FileNotFoundError (naming the store and its teacher's flag) when the store keeps no tokenizer.
    """
    from kdjax.data.tokenizer import EOS, Tokenizer  # pylint: disable=g-import-not-at-top

    tokenizer_path = store_tokenizer_path(path)
    identity = _read_identity(path)
    return Tokenizer.from_file(tokenizer_path, eos_token=identity.get("eos_token", EOS)), identity


def store_origin(path, manifest):
    """One sentence for error messages: which teacher, tokenizer and data a store was written from,
    with the flag that selects its teacher."""
    tokenizer = manifest.get("tokenizer_fingerprint")
    tokenizer_text = f"tokenizer {str(tokenizer)[:16]}"
    if manifest.get("tokenizer_file"):
        tokenizer_text += f" (kept at {os.path.join(path, manifest['tokenizer_file'])})"
    return (
        f"This store was written from {describe_teacher(manifest)} with {tokenizer_text} over "
        f"{manifest.get('num_examples')} examples of {manifest.get('seq_len')} tokens of dataset "
        f"{manifest.get('dataset')!r}, split {manifest.get('split')!r}."
    )


def store_identity(
    manifest,
    *,
    vocab_size,
    seq_len,
    k,
    num_examples,
    examples_per_shard,
    logprob_dtype="bfloat16",
    tokenizer_json=None,
):
    """The store's identity (config.json): the caller's manifest plus what the writer derives.

    Pure. A rerun must produce the same identity to resume a partial store.

    Args:
      manifest: JSON-able dict with at least teacher_fingerprint, dataset, split, and
        tokenizer_fingerprint unless `tokenizer_json` is given; optionally `teacher`
        (`teacher_record`), vocab_size and seq_len (checked against the derived values); other keys
        are kept as they are.
      vocab_size, seq_len: from the teacher's logits and the source's tokens.
      k, num_examples, examples_per_shard, logprob_dtype: the writer's settings.
      tokenizer_json: the tokenizer.json text kept in the store; its fingerprint becomes (or must
        equal) the manifest's tokenizer_fingerprint.
    Raises:
      ValueError naming every problem with the arguments.
    """
    problems = [f"manifest is missing {key!r}" for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    reserved = sorted(set(manifest) & {*_MANIFEST_ONLY_KEYS, "format_version", "layout", "tokenizer_file"})
    if reserved:
        problems.append(f"manifest keys {reserved} are written by the store itself")
    fingerprint = manifest.get("tokenizer_fingerprint")
    if tokenizer_json is not None:
        kept = tokenizer_json_fingerprint(tokenizer_json)
        if fingerprint is not None and fingerprint != kept:
            problems.append(
                f"manifest tokenizer_fingerprint {fingerprint} is not the given tokenizer's {kept}"
            )
        fingerprint = kept
    elif fingerprint is None:
        problems.append("give the tokenizer (kept in the store) or a manifest tokenizer_fingerprint")
    for key, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
        if manifest.get(key, value) != value:
            problems.append(f"manifest says {key}={manifest[key]} but the teacher/data give {value}")
    if not 1 <= k <= vocab_size:
        problems.append(f"k={k} must be in [1, vocab_size={vocab_size}]")
    if examples_per_shard < 1:
        problems.append(f"examples_per_shard={examples_per_shard} must be >= 1")
    if num_examples < 1:
        problems.append("source is empty")
    try:
        logprob_name = _np_dtype(logprob_dtype).name
    except (TypeError, AttributeError):
        problems.append(f"logprob_dtype {logprob_dtype!r} is not a dtype")
    if problems:
        raise ValueError("cannot write the teacher store: " + "; ".join(problems))
    return dict(
        manifest,
        format_version=FORMAT_VERSION,
        layout=LAYOUT,
        token_checksum=TOKEN_CHECKSUM,
        tokenizer_fingerprint=fingerprint,
        tokenizer_file=TOKENIZER_FILE if tokenizer_json is not None else None,
        vocab_size=vocab_size,
        seq_len=seq_len,
        k=k,
        logprob_dtype=logprob_name,
        id_dtype=id_dtype_for_vocab(vocab_size).name,
        num_examples=num_examples,
        examples_per_shard=examples_per_shard,
        num_shards=-(-num_examples // examples_per_shard),
    )


def check_provenance(
    store,
    *,
    teacher_fingerprint=None,
    dataset=None,
    split=None,
    num_examples=None,
    seq_len=None,
    tokenizer_fingerprint=None,
    vocab_size=None,
    token_source=None,
    sample=8,
):
    """Raises StoreMismatchError, naming every difference, unless the store fits this run.

    Call it before the first step. Only the arguments given are compared: pass
    `teacher_fingerprint` only when a teacher model is configured (distilling from a store
    without its teacher is allowed).

    Args:
      store: a TeacherStore, a store path, or a manifest dict.
      teacher_fingerprint: `params_fingerprint` of the configured teacher.
      dataset, split, num_examples, seq_len, tokenizer_fingerprint, vocab_size: this run's.
      token_source: the examples this run will read (`source[i]["tokens"]`); its length and
        seq_len are compared, and the token checksums of `sample` evenly spaced examples are
        checked against the store's (this opens those shards; `StoreSource` then checks
        every example it serves).
    """
    if isinstance(store, TeacherStore):
        path, manifest = store.path, store.manifest
    elif isinstance(store, dict):
        path, manifest = "(manifest)", store
    else:
        store = open_store(store)
        path, manifest = store.path, store.manifest
    want = dict(
        teacher_fingerprint=teacher_fingerprint,
        dataset=dataset,
        split=split,
        num_examples=num_examples,
        seq_len=seq_len,
        tokenizer_fingerprint=tokenizer_fingerprint,
        vocab_size=vocab_size,
    )
    if token_source is not None:
        want["num_examples"] = want["num_examples"] or len(token_source)
        if len(token_source) != want["num_examples"]:
            raise ValueError(f"num_examples={num_examples} but token_source holds {len(token_source)}")
        if len(token_source):
            want["seq_len"] = want["seq_len"] or int(np.shape(token_source[0]["tokens"])[0]) - 1
    want = {key: value for key, value in want.items() if value is not None}
    problems = _diff({key: manifest.get(key) for key in want}, want, have_name="store", want_name="this run")
    if not problems and token_source is not None and isinstance(store, TeacherStore):
        problems = _sample_checksum_problems(store, token_source, sample)
    if problems:
        raise StoreMismatchError(
            f"teacher store {path} does not fit this run: {'; '.join(problems)}. "
            + store_origin(path, manifest)
        )


def _sample_checksum_problems(store, token_source, sample):
    num = max(1, min(sample, len(token_source)))
    ids = np.unique(np.linspace(0, len(token_source) - 1, num=num).astype(int))
    have = store.get(ids, fields=(_CHECKSUM,))[_CHECKSUM]
    want = tokens_checksum(np.stack([token_source[int(i)]["tokens"] for i in ids]))
    bad = ids[have != want]
    if not bad.size:
        return []
    return [
        f"the tokens of {bad.size} of {ids.size} sampled examples (ids {bad[:8].tolist()}) are not the "
        "ones the store's targets were computed from (other data)"
    ]


# --------------------------------------------------------------------------------------------
# On-disk format helpers.


def _shard_name(shard):
    return f"{shard:05d}"


def _shard_files(shard_dir):
    """Relative paths of every file in a shard directory, sorted."""
    files = []
    for dirpath, _, filenames in os.walk(shard_dir):
        for name in filenames:
            files.append(os.path.relpath(os.path.join(dirpath, name), shard_dir))
    return sorted(files)


def _hash_shard(shard_dir):
    """(sha256 over every file's relative path, size and bytes, {relative path: size})."""
    return hash_directory(shard_dir)


def _zarr_spec(path, shape, dtype):
    """zarr3 array = one sharded file; inner chunk = one example; crc32c on chunks and index.

    uint32 ids (vocab > 65,536) get a bit-shuffled lz4 codec: ids below 2^17 or 2^18 leave the
    top 14-15 bit planes empty, so they cost ~2.1 bytes instead of 4 (4.1 k + 8 bytes/token for
    k ids and bf16 log-probs, under the 4.5 k + 16 target). Everything else is stored raw: it is
    dense, and raw reads are the cheapest.
    """
    dtype = np.dtype(dtype)
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    checked = [bytes_codec, {"name": "crc32c"}]
    chunk_codecs = list(checked)
    if dtype == np.uint32:
        blosc = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle", "typesize": 4, "blocksize": 0}
        chunk_codecs.insert(1, {"name": "blosc", "configuration": blosc})
    sharding = {
        "chunk_shape": [1, *shape[1:]],
        "codecs": chunk_codecs,
        "index_codecs": checked,
        "index_location": "end",
    }
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "sharding_indexed", "configuration": sharding}],
            "fill_value": 0,
            "dimension_names": ["example", "token", "k"][: len(shape)],
        },
    }


def _np_dtype(name):
    """np.dtype from a name, including ml_dtypes' (bfloat16, float8_*), which numpy can't parse."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def _field_layout(identity):
    """{field: (per-example shape, dtype)} for a store identity (config or manifest)."""
    t, k = identity["seq_len"], identity["k"]
    return {
        "teacher_ids": ((t, k), np.dtype(identity["id_dtype"])),
        "teacher_logprobs": ((t, k), _np_dtype(identity["logprob_dtype"])),
        "teacher_label_logprob": ((t,), np.dtype(np.float32)),
        "teacher_tail_logprob": ((t,), np.dtype(np.float32)),
        "example_id": ((), np.dtype(np.int64)),
        _CHECKSUM: ((), np.dtype(np.uint64)),
    }


def _shard_range(identity, shard):
    e = identity["examples_per_shard"]
    return shard * e, min((shard + 1) * e, identity["num_examples"])


def _diff(have, want, *, have_name, want_name):
    """Human-readable list of the keys where two dicts differ."""
    out = []
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            out.append(f"{key} differs ({have_name}: {have.get(key)!r}, {want_name}: {want.get(key)!r})")
    return out


def _read_identity(path):
    """manifest.json if the store is complete, else config.json, else {}."""
    for name in ("manifest.json", "config.json"):
        if os.path.exists(os.path.join(path, name)):
            return read_json(os.path.join(path, name))
    return {}


def _check_format(path, identity):
    version = identity.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise StoreMismatchError(
            f"teacher store {path} has format_version {version}; this kdjax reads and writes format "
            f"{FORMAT_VERSION}"
            + (
                " (which adds per-example token checksums and keeps the tokenizer, so that a store "
                f"can never serve another text's targets): {_RERUN}"
                if older
                else ": use the kdjax that wrote it"
            )
        )


# --------------------------------------------------------------------------------------------
# Writer: the directory guard, the shard assembler, the bounded asynchronous workers.


class WritePlan(NamedTuple):
    """What is left to write: `shards` this process owns and must write, or the finished manifest."""

    shards: list
    manifest: dict | None


def _is_own_root_entry(name):
    """Entries a writer of this store creates in its root (with hostio's temporary file names)."""
    own = ("shards", "config.json", TOKENIZER_FILE, "manifest.json")
    return name in own or any(name.startswith(f".{base}.") and name.endswith(".tmp") for base in own)


def plan_store_writes(path, identity, *, tokenizer_json=None, process_index=0, process_count=1):
    """Guards the store directory and returns what this process has left to write.

    Creates the store (shards/, tokenizer.json, then config.json) when the directory is new or
    empty; refuses a directory that is not a teacher store, a store of another format, and a
    store started with another identity, naming every difference. Deletes the leftovers of a
    killed writer in the shards this process owns (shard s belongs to process s % count).

    Returns:
      WritePlan(shards, manifest): the shards to write, or ([], manifest) when the store is
      already complete (nothing is touched then).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    config_path = os.path.join(path, "config.json")
    manifest_path = os.path.join(path, "manifest.json")
    # A peer writer may be between creating shards/ (or tokenizer.json) and config.json: not foreign.
    foreign = [e for e in (os.listdir(path) if os.path.isdir(path) else []) if not _is_own_root_entry(e)]
    if foreign and not os.path.exists(config_path):
        raise FileExistsError(
            f"{path} is a non-empty directory but not a teacher store (it holds {sorted(foreign)[:5]})"
        )
    for existing in (manifest_path, config_path):
        if os.path.exists(existing):
            _check_format(path, read_json(existing))
            _check_identity(existing, identity)
            break
    if os.path.exists(manifest_path):
        return WritePlan([], read_json(manifest_path))
    os.makedirs(os.path.join(path, "shards"), exist_ok=True)
    if tokenizer_json is not None:
        tokenizer_path = os.path.join(path, TOKENIZER_FILE)
        kept = None
        if os.path.exists(tokenizer_path):
            with open(tokenizer_path, encoding="utf-8") as f:
                kept = f.read()
        if kept != tokenizer_json:  # the identity's fingerprint matched: only a missing or damaged file
            write_atomically(tokenizer_path, tokenizer_json.encode("utf-8"))
    if not os.path.exists(config_path):
        write_json_atomically(config_path, identity)
        _check_identity(config_path, identity)  # a peer may have won the race with other settings
    records = _load_records(path, identity["num_shards"])
    todo = [s for s in range(process_index, identity["num_shards"], process_count) if s not in records]
    _clean_shards(path, todo)
    return WritePlan(todo, None)


def _check_identity(path, identity):
    want = json.loads(json.dumps(identity))  # as the file has it: tuples become lists
    have = {key: value for key, value in read_json(path).items() if key not in _MANIFEST_ONLY_KEYS}
    problems = _diff(have, want, have_name="store", want_name="requested")
    if problems:
        raise StoreMismatchError(
            f"refusing to write into teacher store {os.path.dirname(path)} "
            "which was started with different settings: " + "; ".join(problems)
        )


class ShardAssembler:
    """Collects per-example targets, in any order, into whole shards of host arrays.

    `add` copies the valid rows of one teacher batch into their shards' buffers and returns the
    shards it completed, as (shard, {field: array}) with every field of the layout, `example_id`
    and `token_checksum` included. A shard is buffered from its first row to its last: with
    batches in id order, at most two are partly filled at a time.
    """

    def __init__(self, identity):
        self._identity = identity
        self._layout = _field_layout(identity)
        self._buffers = {}  # shard -> (arrays, rows still missing)

    def add(self, example_ids, outputs, checksums):
        """example_ids: n ids; outputs: {field: [>= n, ...]} (rows past n: padding); checksums: uint64 [n]."""
        done = []
        e = self._identity["examples_per_shard"]
        for row, example_id in enumerate(example_ids):
            shard = example_id // e
            arrays, left = self._buffers.get(shard) or self._new_shard(shard)
            for name in _FIELDS:
                arrays[name][example_id - shard * e] = outputs[name][row]
            arrays[_CHECKSUM][example_id - shard * e] = checksums[row]
            self._buffers[shard] = (arrays, left - 1)
            if left == 1:
                done.append((shard, self._buffers.pop(shard)[0]))
        return done

    def _new_shard(self, shard):
        start, stop = _shard_range(self._identity, shard)
        arrays = {
            name: np.zeros((stop - start, *shape), dtype) for name, (shape, dtype) in self._layout.items()
        }
        arrays["example_id"][:] = np.arange(start, stop)
        return arrays, stop - start

    @property
    def partial_shards(self):
        return sorted(self._buffers)


class BoundedWorker:
    """One background thread running submitted calls in order, at most `max_pending` unfinished.

    `submit` blocks while `max_pending` calls are unfinished (bounding the memory they hold) and
    re-raises the first failure of an earlier call. Leaving the `with` block waits for every call
    and re-raises a failure. Leaving it with an exception cancels the calls not started (or, with
    `finish_on_error`, lets them finish, ignoring their failures: the exception that is leaving
    is the one to report), waits for the running one and shuts the thread down, so no thread
    outlives the block.
    """

    def __init__(self, max_pending, name, *, finish_on_error=False):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self._max_pending = max_pending
        self._finish_on_error = finish_on_error
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending = collections.deque()

    def submit(self, fn, *args):
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._executor.submit(fn, *args))

    def drain(self):
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.drain()
            elif self._finish_on_error:
                concurrent.futures.wait(self._pending)
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
        return False


def _write_shard(root, shard, arrays):
    """Writes one shard under a temporary name, fsyncs and renames it into place, then records it."""
    shards_dir = os.path.join(root, "shards")
    final = os.path.join(shards_dir, _shard_name(shard))
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    futures = []
    for name, array in arrays.items():
        store = ts.open(_zarr_spec(os.path.join(tmp, name), array.shape, array.dtype), create=True).result()
        futures.append(store.write(array))
    for f in futures:
        f.result()
    for rel in _shard_files(tmp):
        with open(os.path.join(tmp, rel), "rb+") as f:
            os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(tmp):
        fsync_dir(dirpath)
    os.rename(tmp, final)
    fsync_dir(shards_dir)
    sha256, sizes = _hash_shard(final)
    start = int(arrays["example_id"][0])
    record = {
        "shard": shard,
        "start": start,
        "stop": start + len(arrays["example_id"]),
        "sha256": sha256,
        "bytes": sum(sizes.values()),
        "files": sizes,
    }
    write_json_atomically(f"{final}.json", record)
    return record


def _clean_shards(root, shards):
    """Removes a killed writer's leftovers of unrecorded shards (only their owner calls this)."""
    shards = set(shards)
    shards_dir = os.path.join(root, "shards")
    for entry in os.listdir(shards_dir):
        name = entry.lstrip(".").split(".")[0]  # 00007, 00007.tmp-<id>, .00007.json.<id>.tmp
        if not (name.isdigit() and int(name) in shards):
            continue
        path = os.path.join(shards_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)  # a shard renamed into place just before the kill, or a tmp dir
        else:
            os.remove(path)  # a half-written record


def _load_records(root, num_shards):
    records = {}
    for shard in range(num_shards):
        path = os.path.join(root, "shards", _shard_name(shard) + ".json")
        if os.path.exists(path):
            records[shard] = read_json(path)
    return records


def finalize_store(path):
    """Writes manifest.json once every shard is recorded; returns the manifest.

    Idempotent: every process computes the same bytes, and an existing manifest is returned
    as is. Raises if shards are missing (e.g. call it on process 0 after a barrier).
    """
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):
        return read_json(manifest_path)
    identity = read_json(os.path.join(path, "config.json"))
    records = _load_records(path, identity["num_shards"])
    missing = sorted(set(range(identity["num_shards"])) - set(records))
    if missing:
        raise RuntimeError(
            f"teacher store {path} is incomplete: shards {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''} of {identity['num_shards']} missing"
        )
    shards = [records[s] for s in range(identity["num_shards"])]
    total_bytes = sum(r["bytes"] for r in shards)
    num_tokens = identity["num_examples"] * identity["seq_len"]
    manifest = dict(
        identity,
        complete=True,
        shards=shards,
        total_bytes=total_bytes,
        num_tokens=num_tokens,
        bytes_per_token=total_bytes / num_tokens,
    )
    write_json_atomically(manifest_path, manifest)
    return manifest


@functools.partial(jax.jit, static_argnames=("teacher", "k", "dtypes"))
def _teacher_targets(params, tokens_bl, *, teacher, k, dtypes):
    """The stored fields of one batch, computed on device; only [B, T, k] leaves it.

    Module-level with the teacher function static: repeated `write_store` calls with the same
    `logits_fn` (both splits, benchmarks) reuse one compiled program.
    """
    out = topk_targets(teacher(params, tokens_bl[:, :-1]), tokens_bl[:, 1:], k=k)
    return {name: out[name].astype(_np_dtype(dtype)) for name, dtype in dtypes}


def _source_seq_len(source):
    tokens = np.shape(source[0]["tokens"])
    if len(tokens) != 1 or tokens[0] < 2:
        raise ValueError(f"source[0]['tokens'] has shape {tokens}, want [seq_len + 1] with seq_len >= 1")
    return tokens[0] - 1


def _read_batch(source, batch_ids, *, batch_size, seq_len):
    """int32 [batch_size, seq_len + 1] tokens of `batch_ids` (rows past them are zero padding)."""
    tokens = np.zeros((batch_size, seq_len + 1), np.int32)
    for row, example_id in enumerate(batch_ids):
        example = source[example_id]
        if int(example["example_id"]) != example_id:
            raise ValueError(
                f"source[{example_id}] has example_id {example['example_id']}; the "
                "writer needs a random-access source with source[i].example_id == i"
            )
        tokens[row] = example["tokens"]
    return tokens


# Longer than 80 lines only by its docstring and keyword-per-line calls: the body is four steps (identity and
# manifest, the directory guard's plan, the teacher run with its asynchronous writer, finalize).
def write_store(
    path,
    *,
    source,
    logits_fn,
    k,
    batch_size,
    examples_per_shard,
    manifest,
    params=None,
    tokenizer=None,
    logprob_dtype="bfloat16",
    process_index=0,
    process_count=1,
    progress=True,
    max_pending_batches=2,
):
    """Runs `logits_fn` over `source` and writes the top-k teacher store at `path`.

    Shard s holds example ids [s E, (s + 1) E) with E = examples_per_shard and is written by
    process s % process_count. Rerunning the same call after a crash (any process count) writes
    only the missing shards; once the store is complete a rerun changes nothing.

    Args:
      path: store directory (POSIX filesystem).
      source: random access; `source[i]` = {"tokens": int[seq_len + 1], "example_id": i, ...}.
      logits_fn: jittable tokens int32[B, T] -> logits[B, T, V], or (params, tokens) -> logits
        when `params` is given. Called inside our jit with a fixed B = batch_size (the last
        batch is padded), so it compiles once. Each process calls it on its own batches: a
        teacher must live on that process's devices.
      k: top-k entries kept per token.
      batch_size: examples per teacher call.
      examples_per_shard: E; a shard is buffered in host memory before it is written.
      manifest: JSON-able dict, see `store_identity`: teacher_fingerprint, dataset, split, and
        `teacher` (`teacher_record(...)`, where the teacher came from: messages then name the
        flag that selects it).
      params: the teacher's params pytree, passed to the jit as an argument. Use it for real
        teachers: arrays a function closes over are baked into the compiled program as
        constants (slow to compile, copied, sharding lost).
      tokenizer: the tokenizer the source was tokenized with (a kdjax Tokenizer or its
        tokenizer.json text), kept as `tokenizer.json` in the store so that a student without
        the teacher reads the data with it; its fingerprint is the store's tokenizer_fingerprint.
      logprob_dtype: dtype name of the stored top-k log-probs.
      process_index, process_count: this writer's index among the writers.
      progress: show a tqdm bar (tokens/s, ETA).
      max_pending_batches: teacher batches whose targets may wait for the host thread (each
        holds [batch_size, seq_len, k] on the device).
    Returns:
      The final manifest if the store is complete after this call, else None (other processes
      still writing; call `finalize_store` after they finish).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(source) == 0:
        raise ValueError("source is empty")
    tokenizer_json = _tokenizer_json(tokenizer)
    seq_len = _source_seq_len(source)
    # One calling convention below: teacher(params, tokens); params=None is an empty pytree.
    teacher = logits_fn if params is not None else (lambda _, tokens_bt: logits_fn(tokens_bt))
    logits_shape = jax.eval_shape(teacher, params, jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32))
    if logits_shape.shape != (batch_size, seq_len, logits_shape.shape[-1]):
        raise ValueError(
            f"logits_fn returned {logits_shape.shape}, want [B, T, V] = [{batch_size}, {seq_len}, V]"
        )
    identity = store_identity(
        manifest,
        vocab_size=logits_shape.shape[-1],
        seq_len=seq_len,
        k=k,
        num_examples=len(source),
        examples_per_shard=examples_per_shard,
        logprob_dtype=logprob_dtype,
        tokenizer_json=tokenizer_json,
    )
    plan = plan_store_writes(
        path,
        identity,
        tokenizer_json=tokenizer_json,
        process_index=process_index,
        process_count=process_count,
    )
    if plan.manifest is not None:
        return plan.manifest
    _run_teacher(
        path,
        identity,
        plan.shards,
        source=source,
        teacher=teacher,
        params=params,
        batch_size=batch_size,
        max_pending_batches=max_pending_batches,
        progress_desc=f"teacher store {process_index}/{process_count}" if progress else None,
    )
    if len(_load_records(path, identity["num_shards"])) == identity["num_shards"]:
        return finalize_store(path)
    return None


def _run_teacher(
    path, identity, shards, *, source, teacher, params, batch_size, max_pending_batches, progress_desc
):
    """Teacher over every example of `shards`, pipelined: main thread reads tokens and dispatches the
    teacher; the host worker fetches targets, checksums tokens, assembles shards; the writer writes them."""
    layout = _field_layout(identity)
    dtypes = tuple((name, layout[name][1].name) for name in _FIELDS)
    seq_len = identity["seq_len"]
    example_ids = [i for s in shards for i in range(*_shard_range(identity, s))]
    assembler = ShardAssembler(identity)
    bar = progress.progress_bar(total=len(example_ids) * seq_len, unit="tok", unit_scale=True,
                                desc=progress_desc or "", enabled=progress_desc is not None)

    def host_step(outputs, batch_ids, tokens, writer):
        outputs = jax.device_get(outputs)
        checksums = tokens_checksum(tokens[: len(batch_ids)])
        for shard, arrays in assembler.add(batch_ids, outputs, checksums):
            writer.submit(_write_shard, path, shard, arrays)
        bar.update(len(batch_ids) * seq_len)

    # The writer holds at most 2 finished shards; the host worker at most max_pending_batches batches. On an
    # error the finished shards still get written (a rerun then has less to do); pending batches are dropped.
    with (
        BoundedWorker(2, "store-writer", finish_on_error=True) as writer,
        BoundedWorker(max_pending_batches, "store-host") as host,
    ):
        for begin in range(0, len(example_ids), batch_size):
            batch_ids = example_ids[begin : begin + batch_size]
            tokens = _read_batch(source, batch_ids, batch_size=batch_size, seq_len=seq_len)
            outputs = _teacher_targets(params, tokens, teacher=teacher, k=identity["k"], dtypes=dtypes)
            # Returns at once (unless max_pending_batches wait): the host work overlaps the next batch.
            host.submit(host_step, outputs, batch_ids, tokens, writer)
        # Leaving the block drains the host worker first (every shard is then submitted), then the writer.
    bar.close()
    if assembler.partial_shards:
        raise AssertionError(f"shards {assembler.partial_shards} were not completed")  # a bug, not bad input


# --------------------------------------------------------------------------------------------
# Reader.


class TeacherStore:
    """Read-only random access to a complete teacher store by example id. Thread-safe.

    Shards are opened (and, with verify="lazy", hashed) on first use, once, by one thread; a
    shard found corrupt stays refused with the same CorruptShardError. `close()` (or `with`)
    drops every open tensorstore handle; reads after it raise ValueError.
    """

    def __init__(self, path, manifest, *, verify):
        self.path = path
        self.manifest = manifest
        self._verify = verify
        self._layout = _field_layout(manifest)
        self._init_handles()

    def _init_handles(self):
        self._lock = threading.Lock()
        self._shard_locks = {}  # shard -> Lock held while that shard is opened
        self._arrays = {}  # shard -> {field: ts.TensorStore}
        self._bad = {}  # shard -> CorruptShardError message
        self._closed = False

    def __len__(self):
        return self.manifest["num_examples"]

    def __repr__(self):
        return f"TeacherStore({self.path!r}, examples={len(self)}, k={self.manifest['k']})"

    def __getstate__(self):  # picklable for grain worker processes; handles are reopened there
        return {key: self.__dict__[key] for key in ("path", "manifest", "_verify", "_layout")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_handles()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Drops the open tensorstore handles; later reads raise ValueError."""
        with self._lock:
            self._closed = True
            self._arrays.clear()

    @property
    def seq_len(self):
        return self.manifest["seq_len"]

    @property
    def bytes_per_token(self):
        return self.manifest["bytes_per_token"]

    def _shard_dir(self, shard):
        return os.path.join(self.path, "shards", _shard_name(shard))

    def _corrupt(self, shard, message):
        """Remembers and returns the CorruptShardError of a shard (raised `from None` by callers:
        its message carries the cause; a second traceback would only repeat it)."""
        full = f"teacher store shard {_shard_name(shard)} is corrupt ({self._shard_dir(shard)}): {message}"
        self._bad.setdefault(shard, full)
        return CorruptShardError(self._bad[shard])

    def verify_shard(self, shard):
        """Raises CorruptShardError unless the shard's files hash to the manifest's checksum."""
        record = self.manifest["shards"][shard]
        shard_dir = self._shard_dir(shard)
        if not os.path.isdir(shard_dir):
            raise CorruptShardError(f"teacher store shard {_shard_name(shard)} is missing: {shard_dir}")
        sha256, sizes = _hash_shard(shard_dir)
        if sha256 != record["sha256"]:
            bad = _diff(sizes, record["files"], have_name="on disk", want_name="recorded")
            raise CorruptShardError(
                f"teacher store shard {_shard_name(shard)} is corrupt: checksum {sha256} != recorded "
                f"{record['sha256']} ({shard_dir}){'; ' + '; '.join(bad) if bad else ''}"
            )

    def _open_shard(self, shard):
        with self._lock:
            if self._closed:
                raise ValueError(f"teacher store {self.path} is closed")
            if shard in self._bad:
                raise CorruptShardError(self._bad[shard])
            if shard in self._arrays:
                return self._arrays[shard]
            shard_lock = self._shard_locks.setdefault(shard, threading.Lock())
        with shard_lock:  # one thread opens (and hashes) a shard; other shards stay readable meanwhile
            with self._lock:
                if shard in self._bad:
                    raise CorruptShardError(self._bad[shard])
                if shard in self._arrays:
                    return self._arrays[shard]
            if self._verify == "lazy":
                try:
                    self.verify_shard(shard)
                except CorruptShardError as e:
                    self._bad.setdefault(shard, str(e))
                    raise
            try:
                arrays = self._open_arrays(shard)
            except ValueError as e:
                raise self._corrupt(shard, f"cannot be opened: {e}") from None
            with self._lock:
                if self._closed:
                    raise ValueError(f"teacher store {self.path} is closed")
                return self._arrays.setdefault(shard, arrays)

    def _open_arrays(self, shard):
        start, stop = _shard_range(self.manifest, shard)
        arrays = {}
        for name, (shape, dtype) in self._layout.items():
            kvstore = {"driver": "file", "path": os.path.join(self._shard_dir(shard), name)}
            store = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True).result()
            if store.shape != (stop - start, *shape) or store.dtype.numpy_dtype != dtype:
                want = (stop - start, *shape)
                raise ValueError(f"{name} is {store.dtype} {store.shape}, want {dtype} {want}")
            arrays[name] = store
        return arrays

    def _read(self, shard, futures):
        try:
            return {name: future.result() for name, future in futures.items()}
        except ValueError as e:  # tensorstore's DATA_LOSS: a chunk's crc32c does not match
            raise self._corrupt(shard, str(e)) from None

    def read_shard(self, shard):
        """Every field of one shard, as stored (including `example_id` and `token_checksum`)."""
        arrays = self._open_shard(shard)
        return self._read(shard, {name: array.read() for name, array in arrays.items()})

    def get(self, example_ids, *, fields=_FIELDS):
        """Teacher targets for `example_ids` (any order, repeats allowed), stacked in that order.

        Returns numpy arrays: `teacher_ids` int32 [n, t, k] (widened from the stored uint type,
        since narrow unsigned ids are a trap in index arithmetic), `teacher_logprobs` [n, t, k] in
        the stored dtype (bf16 by default: half the bytes to the device; losses upcast to f32),
        `teacher_label_logprob` and `teacher_tail_logprob` float32 [n, t]; with `fields`
        including "token_checksum", also uint64 [n] (`tokens_checksum` of each example's tokens).
        """
        unknown = set(fields) - set(self._layout)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; the store has {sorted(self._layout)}")
        ids_n = np.asarray(example_ids, np.int64).reshape(-1)
        bad = ids_n[(ids_n < 0) | (ids_n >= len(self))]
        if bad.size:
            raise KeyError(
                f"example ids {bad[:10].tolist()} not in teacher store {self.path} "
                f"(holds ids [0, {len(self)}))"
            )
        out = {name: np.empty((len(ids_n), *self._layout[name][0]), self._layout[name][1]) for name in fields}
        shard_n, row_n = np.divmod(ids_n, self.manifest["examples_per_shard"])
        for shard in np.unique(shard_n).tolist():
            (sel,) = np.nonzero(shard_n == shard)
            rows = row_n[sel]
            arrays = self._open_shard(shard)
            if rows.size and np.all(np.diff(rows) == 1):  # contiguous: one slice read per field
                index = slice(int(rows[0]), int(rows[-1]) + 1)
            else:
                index = rows
            values = self._read(shard, {name: arrays[name][index].read() for name in fields})
            for name, value in values.items():
                out[name][sel] = value
        if "teacher_ids" in out:
            out["teacher_ids"] = out["teacher_ids"].astype(np.int32)
        return out


def open_store(path, *, expect_vocab_size=None, expect_tokenizer_fingerprint=None, verify="lazy"):
    """Opens a complete teacher store for reading.

    Args:
      path: store directory.
      expect_vocab_size, expect_tokenizer_fingerprint: the student's; a store written for
        another vocabulary or tokenizer is refused with a message naming what differs and which
        teacher and tokenizer the store was written from (see also `check_provenance`).
      verify: "lazy" checks each shard's sha256 on its first read (a process reading a slice
        only hashes its shards); "open" checks every shard now; "none" trusts the files (zarr's
        per-chunk crc32c still guards every read).
    Raises:
      FileNotFoundError: not a store, or incomplete. StoreMismatchError: another format (an
      older one says to re-run precompute), vocabulary or tokenizer.
    """
    if verify not in ("lazy", "open", "none"):
        raise ValueError(f"verify={verify!r}, want 'lazy', 'open' or 'none'")
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        state = (
            "incomplete (no manifest.json)"
            if os.path.exists(os.path.join(path, "config.json"))
            else "not a teacher store"
        )
        raise FileNotFoundError(f"{path} is {state}; run the writer to completion first")
    manifest = read_json(manifest_path)
    _check_format(path, manifest)
    want = {}
    if expect_vocab_size is not None:
        want["vocab_size"] = expect_vocab_size
    if expect_tokenizer_fingerprint is not None:
        want["tokenizer_fingerprint"] = expect_tokenizer_fingerprint
    problems = _diff({key: manifest.get(key) for key in want}, want, have_name="store", want_name="student")
    if problems:
        raise StoreMismatchError(
            f"teacher store {path} does not match the student: {'; '.join(problems)}. "
            + store_origin(path, manifest)
        )
    store = TeacherStore(path, manifest, verify=verify)
    if verify == "open":
        for shard in range(manifest["num_shards"]):
            store.verify_shard(shard)
    return store


def verify_store(path, *, token_source=None):
    """Checks a whole store end to end (for `--verify`); returns a report, never raises on data.

    Checks: manifest complete and of this format; every shard's sha256; every field's shape and
    dtype and decodes (zarr crc32c per chunk); the stored example ids tile [0, num_examples)
    exactly once; ids < vocab_size; log-probs <= 0; the kept tokenizer.json hashes to the
    manifest's tokenizer_fingerprint; with `token_source`, every example's token checksum.

    Returns:
      {"ok": bool, "problems": [str], "num_examples", "num_shards", "bytes_per_token"}.
    """
    problems = []
    try:
        store = open_store(path, verify="none")
    except (OSError, ValueError) as e:
        return {"ok": False, "problems": [str(e)]}
    manifest = store.manifest
    problems += _tokenizer_file_problems(path, manifest)
    if token_source is not None and len(token_source) != manifest["num_examples"]:
        problems.append(
            f"token source holds {len(token_source)} examples, the store {manifest['num_examples']}"
        )
        token_source = None
    seen = np.zeros(manifest["num_examples"], np.int64)
    with store:
        for shard in range(manifest["num_shards"]):
            try:
                store.verify_shard(shard)
                data = store.read_shard(shard)  # decoding checks every chunk's crc32c
            except (OSError, ValueError) as e:
                problems.append(str(e))
                continue
            problems += _shard_data_problems(manifest, shard, data, token_source)
            example_ids = data["example_id"]
            np.add.at(seen, example_ids[(example_ids >= 0) & (example_ids < len(seen))], 1)
    if not problems and not np.all(seen == 1):
        problems.append(f"example ids not present exactly once: {np.nonzero(seen != 1)[0][:10]}")
    return {
        "ok": not problems,
        "problems": problems,
        "num_examples": manifest["num_examples"],
        "num_shards": manifest["num_shards"],
        "bytes_per_token": manifest["bytes_per_token"],
    }


def _tokenizer_file_problems(path, manifest):
    if not manifest.get("tokenizer_file"):
        return []
    tokenizer_path = os.path.join(path, manifest["tokenizer_file"])
    if not os.path.exists(tokenizer_path):
        return [f"{tokenizer_path} is missing"]
    with open(tokenizer_path, "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()
    if fingerprint != manifest["tokenizer_fingerprint"]:
        return [
            f"{tokenizer_path} hashes to {fingerprint}, the manifest says {manifest['tokenizer_fingerprint']}"
        ]
    return []


def _shard_data_problems(manifest, shard, data, token_source):
    problems = []
    name = _shard_name(shard)
    start, stop = _shard_range(manifest, shard)
    if not np.array_equal(data["example_id"], np.arange(start, stop)):
        problems.append(f"shard {name} holds example ids other than [{start}, {stop})")
    if data["teacher_ids"].size and data["teacher_ids"].max() >= manifest["vocab_size"]:
        problems.append(f"shard {name} has ids >= vocab_size")
    for field in ("teacher_logprobs", "teacher_label_logprob", "teacher_tail_logprob"):
        if np.any(~(data[field].astype(np.float32) <= 1e-3)):  # bf16 rounding of ~0 stays <= 0; NaN fails
            problems.append(f"shard {name} has positive or NaN {field}")
    if token_source is not None:
        want = tokens_checksum(np.stack([token_source[i]["tokens"] for i in range(start, stop)]))
        bad = np.nonzero(data[_CHECKSUM] != want)[0] + start
        if bad.size:
            problems.append(f"shard {name}: examples {bad[:10].tolist()} hold targets of other tokens")
    return problems


def find_stores(root):
    """Every teacher store under `root` (root itself, or e.g. root/store-train and root/store-validation).

    A store is a directory with config.json or manifest.json beside a shards/ directory; the
    search does not descend into stores.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "shards" in dirnames and {"config.json", "manifest.json"} & set(filenames):
            found.append(dirpath)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def verify_stores(root, *, split=None):
    """`verify_store` for every store under `root` (or only the one of `split`): {path: report}.

    Raises FileNotFoundError naming `root` (and the splits present) when no store matches: a
    `--verify` that checked nothing must not look like success.
    """
    stores = find_stores(root) if os.path.isdir(root) else []
    splits = {path: _read_identity(path).get("split") for path in stores}
    chosen = [path for path in stores if split is None or splits[path] == split]
    if not chosen:
        present = sorted({str(s) for s in splits.values()})
        raise FileNotFoundError(
            f"no teacher store{f' of split {split!r}' if split else ''} under {root}"
            + (f" (splits present: {present})" if present else "")
        )
    return {path: verify_store(path) for path in chosen}


# --------------------------------------------------------------------------------------------
# grain source.


def process_slice(num_examples, process_index, process_count):
    """Contiguous positions [lo, hi) of process `process_index` (np.array_split sizes)."""
    base, extra = divmod(num_examples, process_count)
    lo = process_index * base + min(process_index, extra)
    return lo, lo + base + (process_index < extra)


class StoreSource:
    """grain RandomAccessDataSource joining a token source and a teacher store by example id.

    Item i is token_source[lo + i] (lo from this process's contiguous slice) plus its teacher
    targets from the store, looked up by the example's `example_id`:
      tokens int32 [seq_len + 1], example_id int64, teacher_ids int32 [t, k],
      teacher_logprobs [t, k] (stored dtype, bf16 by default: the loss upcasts),
      teacher_label_logprob f32 [t], teacher_tail_logprob f32 [t], mask f32 [t] (the example's
      own `mask` if it has one, else ones: packed data). Other keys of the example pass through.
    Every item's tokens are checked against the store's `token_checksum` for its id: targets
    computed from other tokens raise StoreMismatchError naming the example, never reach a batch.
    The token source must hold exactly the store's examples (same count and seq_len; the first
    example is checked here, before any thread starts).
    With process_count > 1 each process reads only its slice (and only those store shards are
    opened and hashed); with grain's own sharding pass process_count=1.
    Implements grain's batched `_getitems`, which reads each store shard once per batch.
    """

    def __init__(self, token_source, store, *, process_index=0, process_count=1):
        self._tokens = token_source
        self._store = store
        if len(token_source) != len(store):
            raise StoreMismatchError(
                f"the token source holds {len(token_source)} examples but teacher store {store.path} "
                f"holds {len(store)}: other data. {store_origin(store.path, store.manifest)}"
            )
        self._lo, self._hi = process_slice(len(token_source), process_index, process_count)
        self._slice = (process_index, process_count)
        if self._hi > self._lo:
            seq_len = int(np.shape(token_source[self._lo]["tokens"])[0]) - 1
            if seq_len != store.seq_len:
                raise StoreMismatchError(
                    f"token source has seq_len {seq_len} but teacher store "
                    f"{store.path} has seq_len {store.seq_len}"
                )
            self._getitems([0])  # fail now, in the caller's thread, if the data is not the store's

    def __len__(self):
        return self._hi - self._lo

    def __repr__(self):
        index, count = self._slice
        return f"StoreSource(tokens={self._tokens!r}, store={self._store!r}, slice={index}/{count})"

    def close(self):
        self._store.close()

    def __getitem__(self, index):
        return self._getitems([index])[0]

    def _getitems(self, indices):
        examples = []
        for index in indices:
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range [0, {len(self)})")
            examples.append(self._tokens[self._lo + int(index)])
        for example in examples:
            if np.shape(example["tokens"]) != (self._store.seq_len + 1,):
                raise StoreMismatchError(
                    f"example {example['example_id']} has tokens of shape {np.shape(example['tokens'])}, "
                    f"store wants ({self._store.seq_len + 1},)"
                )
        ids = [int(example["example_id"]) for example in examples]
        teacher = self._store.get(ids, fields=(*_FIELDS, _CHECKSUM))
        self._check_tokens(ids, examples, teacher.pop(_CHECKSUM))
        out = []
        for row, example in enumerate(examples):
            item = dict(example)
            item["tokens"] = np.asarray(example["tokens"], np.int32)
            item["example_id"] = np.int64(example["example_id"])
            item["mask"] = np.asarray(example.get("mask", np.ones(self._store.seq_len)), np.float32)
            item.update({name: value[row] for name, value in teacher.items()})
            out.append(item)
        return out

    def _check_tokens(self, ids, examples, stored_n):
        have_n = tokens_checksum(np.stack([example["tokens"] for example in examples]))
        (bad,) = np.nonzero(have_n != stored_n)
        if bad.size:
            row = int(bad[0])
            raise StoreMismatchError(
                f"example {ids[row]}: its tokens hash to {int(have_n[row]):#018x} but teacher store "
                f"{self._store.path} holds the targets of tokens hashing to {int(stored_n[row]):#018x} "
                f"for that id ({bad.size} of {len(ids)} examples of this batch differ): the store was "
                f"written over other data. {store_origin(self._store.path, self._store.manifest)}"
            )
