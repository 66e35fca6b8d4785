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

On-disk layout (all paths relative to the store root)::

  config.json                  what is being written (identity); a resume must match it
  manifest.json                written once, when every shard is complete; never rewritten
  shards/00007/                one zarr3 group per shard: examples [7 E, 8 E)
    teacher_ids/               uint8/16/32 [n, t, k]  (narrowest type that fits the vocab)
    teacher_logprobs/          bf16 (configurable) [n, t, k]
    teacher_label_logprob/     f32 [n, t]
    teacher_tail_logprob/      f32 [n, t]
    example_id/                int64 [n], lets `verify_store` prove each id is present once
  shards/00007.json            completion record: sha256 over the shard's files, sizes

Each zarr3 array of a shard is one sharded file (`c/0/0/0`, inner chunk = one example) plus
its `zarr.json`. A shard is written under a temporary directory name, fsynced, renamed into
place (atomic on POSIX), and only then is its completion record written (also temp + rename).
A shard without a record is garbage from a killed writer and is rewritten by its owner.
Shards are keyed by example id only, never by step or process, so any number of processes can
write a store and any number can read it. Paths must be on a POSIX filesystem (rename).
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import threading
import uuid

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts
import tqdm

FORMAT_VERSION = 1
LAYOUT = "zarr3+sharding_indexed+crc32c, one zarr group per shard of examples"

# The teacher targets of a shard (it also stores `example_id`, which `verify_store` checks).
_FIELDS = ("teacher_ids", "teacher_logprobs", "teacher_label_logprob", "teacher_tail_logprob")
_REQUIRED_MANIFEST_KEYS = ("teacher_fingerprint", "tokenizer_fingerprint", "dataset", "split")
# Keys the final manifest adds to the identity written in config.json.
_MANIFEST_ONLY_KEYS = ("complete", "shards", "total_bytes", "num_tokens", "bytes_per_token")


class StoreMismatchError(ValueError):
    """The store was written for something other than what the caller asked for."""


class CorruptShardError(IOError):
    """A shard's bytes disagree with its recorded checksum or cannot be decoded."""


# --------------------------------------------------------------------------------------------
# Pure pieces: top-k targets, dtypes, fingerprints.


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


def params_fingerprint(params):
    """sha256 over a pytree's leaf paths, shapes, dtypes and bytes: same params, same string.

    Gathers one leaf at a time to the host (all-gathered first when not fully addressable).
    """
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(np.asarray(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype.str}|{array.nbytes}\n"
        h.update(header.encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def file_fingerprint(path):
    """sha256 of a file's bytes, e.g. tokenizer.json for `tokenizer_fingerprint`."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# Small filesystem helpers.


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path, obj):
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


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
    h = hashlib.sha256()
    sizes = {}
    for rel in _shard_files(shard_dir):
        full = os.path.join(shard_dir, rel)
        sizes[rel] = os.path.getsize(full)
        h.update(f"{rel}|{sizes[rel]}\n".encode())
        with open(full, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest(), sizes


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
        chunk_codecs.insert(
            1,
            {
                "name": "blosc",
                "configuration": {
                    "cname": "lz4",
                    "clevel": 5,
                    "shuffle": "bitshuffle",
                    "typesize": 4,
                    "blocksize": 0,
                },
            },
        )
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1, *shape[1:]],
                        "codecs": chunk_codecs,
                        "index_codecs": checked,
                        "index_location": "end",
                    },
                }
            ],
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


# --------------------------------------------------------------------------------------------
# Writer.


def _write_shard(root, shard, arrays):
    """Writes one shard under a temporary name, renames it into place, then records it."""
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
        _fsync_dir(dirpath)
    os.rename(tmp, final)
    _fsync_dir(shards_dir)
    sha256, sizes = _hash_shard(final)
    n = len(arrays["example_id"])
    start = int(arrays["example_id"][0])
    record = {
        "shard": shard,
        "start": start,
        "stop": start + n,
        "sha256": sha256,
        "bytes": sum(sizes.values()),
        "files": sizes,
    }
    _atomic_write_json(f"{final}.json", record)
    return record


def _clean_shards(root, shards):
    """Removes a killed writer's leftovers of unrecorded shards (only their owner calls this)."""
    shards = set(shards)
    shards_dir = os.path.join(root, "shards")
    for entry in os.listdir(shards_dir):
        name = entry.split(".")[0]
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
            records[shard] = _read_json(path)
    return records


def finalize_store(path):
    """Writes manifest.json once every shard is recorded; returns the manifest.

    Idempotent: every process computes the same bytes, and an existing manifest is returned
    as is. Raises if shards are missing (e.g. call it on process 0 after a barrier).
    """
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):
        return _read_json(manifest_path)
    identity = _read_json(os.path.join(path, "config.json"))
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
    _atomic_write_json(manifest_path, manifest)
    return manifest


def _check_identity(path, identity):
    want = json.loads(json.dumps(identity))  # normalise tuples etc. as the file has them
    have = _read_json(path)
    have = {key: value for key, value in have.items() if key not in _MANIFEST_ONLY_KEYS}
    problems = _diff(have, want, have_name="store", want_name="requested")
    if problems:
        raise StoreMismatchError(
            f"refusing to write into teacher store {os.path.dirname(path)} "
            "which was started with different settings: " + "; ".join(problems)
        )


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
    logprob_dtype="bfloat16",
    process_index=0,
    process_count=1,
    progress=True,
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
      manifest: JSON-able dict with at least teacher_fingerprint, tokenizer_fingerprint,
        dataset, split; optionally vocab_size (checked against the logits) and seq_len
        (checked against the tokens); any other keys are kept as they are.
      params: the teacher's params pytree, passed to the jit as an argument. Use it for real
        teachers: arrays a function closes over are baked into the compiled program as
        constants (slow to compile, copied, sharding lost).
      logprob_dtype: dtype name of the stored top-k log-probs.
      process_index, process_count: this writer's index among the writers.
      progress: show a tqdm bar (tokens/s, ETA).
    Returns:
      The final manifest if the store is complete after this call, else None (other processes
      still writing; call `finalize_store` after they finish).
    """
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}")
    reserved = set(manifest) & set(_MANIFEST_ONLY_KEYS)
    if reserved:
        raise ValueError(f"manifest keys {sorted(reserved)} are written by the store itself")
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("source is empty")
    seq_len = int(np.shape(source[0]["tokens"])[0]) - 1
    # One calling convention below: teacher(params, tokens); params=None is an empty pytree.
    teacher = logits_fn if params is not None else (lambda _, tokens_bt: logits_fn(tokens_bt))
    logits_shape = jax.eval_shape(teacher, params, jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32))
    if logits_shape.shape != (batch_size, seq_len, logits_shape.shape[-1]):
        raise ValueError(
            f"logits_fn returned {logits_shape.shape}, want [B, T, V] = " f"[{batch_size}, {seq_len}, V]"
        )
    vocab_size = logits_shape.shape[-1]
    for key, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
        if manifest.get(key, value) != value:
            raise ValueError(f"manifest says {key}={manifest[key]} but the teacher/data give {value}")
    logprob_np_dtype = _np_dtype(logprob_dtype)
    identity = dict(
        manifest,
        format_version=FORMAT_VERSION,
        layout=LAYOUT,
        vocab_size=vocab_size,
        seq_len=seq_len,
        k=k,
        logprob_dtype=logprob_np_dtype.name,
        id_dtype=id_dtype_for_vocab(vocab_size).name,
        num_examples=num_examples,
        examples_per_shard=examples_per_shard,
        num_shards=-(-num_examples // examples_per_shard),
    )

    manifest_path = os.path.join(path, "manifest.json")
    config_path = os.path.join(path, "config.json")
    # What a writer of this store creates before config.json is in place (shards/, config.json's temporary
    # file) is not foreign: with several processes a peer may be exactly there while we look.
    foreign = [
        e
        for e in (os.listdir(path) if os.path.isdir(path) else [])
        if e != "shards" and not e.startswith("config.json")
    ]
    if foreign and not os.path.exists(config_path):
        raise FileExistsError(
            f"{path} is a non-empty directory but not a teacher store (it holds {sorted(foreign)[:5]})"
        )
    os.makedirs(os.path.join(path, "shards"), exist_ok=True)
    if os.path.exists(manifest_path):
        _check_identity(manifest_path, identity)
        return _read_json(manifest_path)
    if not os.path.exists(config_path):
        _atomic_write_json(config_path, identity)
    _check_identity(config_path, identity)

    records = _load_records(path, identity["num_shards"])
    todo = [s for s in range(process_index, identity["num_shards"], process_count) if s not in records]
    _clean_shards(path, todo)
    example_ids = [i for s in todo for i in range(*_shard_range(identity, s))]

    layout = _field_layout(identity)
    targets_fn = _make_targets_fn(teacher, k=k, layout=layout)
    buffers = {}  # shard -> (arrays, rows still to fill)
    writes = []
    bar = tqdm.tqdm(
        total=len(example_ids) * seq_len,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"teacher store {process_index}/{process_count}",
    )

    def consume(outputs, batch_ids, executor):
        outputs = jax.device_get(outputs)
        for row, example_id in enumerate(batch_ids):
            shard = example_id // examples_per_shard
            if shard not in buffers:
                start, stop = _shard_range(identity, shard)
                arrays = {
                    name: np.zeros((stop - start, *shape), dtype) for name, (shape, dtype) in layout.items()
                }
                arrays["example_id"][:] = np.arange(start, stop)
                buffers[shard] = (arrays, stop - start)
            arrays, left = buffers[shard]
            for name in _FIELDS:
                arrays[name][example_id - shard * examples_per_shard] = outputs[name][row]
            buffers[shard] = (arrays, left - 1)
            if left == 1:
                # The write overlaps the next teacher forward; at most 2 shards wait in memory.
                busy = [w for w in writes if not w.done()]
                if len(busy) >= 2:
                    concurrent.futures.wait(busy, return_when=concurrent.futures.FIRST_COMPLETED)
                writes.append(executor.submit(_write_shard, path, shard, buffers.pop(shard)[0]))
        for w in [w for w in writes if w.done()]:
            w.result()  # re-raise a failed write now, not at the end
            writes.remove(w)
        bar.update(len(batch_ids) * seq_len)

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = None
        for begin in range(0, len(example_ids), batch_size):
            batch_ids = example_ids[begin : begin + batch_size]
            tokens = np.zeros((batch_size, seq_len + 1), np.int32)
            for row, example_id in enumerate(batch_ids):
                example = source[example_id]
                if int(example["example_id"]) != example_id:
                    raise ValueError(
                        f"source[{example_id}] has example_id {example['example_id']}; the "
                        "writer needs a random-access source with source[i].example_id == i"
                    )
                tokens[row] = example["tokens"]
            outputs = targets_fn(params, tokens)  # dispatched asynchronously; consume the previous batch
            if pending is not None:
                consume(*pending, executor)
            pending = (outputs, batch_ids)
        if pending is not None:
            consume(*pending, executor)
        for w in writes:
            w.result()
    bar.close()
    if len(_load_records(path, identity["num_shards"])) == identity["num_shards"]:
        return finalize_store(path)
    return None


def _make_targets_fn(teacher, *, k, layout):
    def targets(params, tokens_bt1):
        out = topk_targets(teacher(params, tokens_bt1[:, :-1]), tokens_bt1[:, 1:], k=k)
        return {name: out[name].astype(layout[name][1]) for name in _FIELDS}

    return jax.jit(targets)


# --------------------------------------------------------------------------------------------
# Reader.


class TeacherStore:
    """Read-only random access to a complete teacher store by example id. Thread-safe."""

    def __init__(self, path, manifest, *, verify):
        self.path = path
        self.manifest = manifest
        self._verify = verify
        self._layout = _field_layout(manifest)
        self._lock = threading.Lock()
        self._arrays = {}  # shard -> {field: ts.TensorStore}, opened (and verified) on first read

    def __len__(self):
        return self.manifest["num_examples"]

    def __repr__(self):
        return f"TeacherStore({self.path!r}, examples={len(self)}, k={self.manifest['k']})"

    def __getstate__(self):  # picklable for grain worker processes; handles are reopened there
        state = dict(self.__dict__, _lock=None, _arrays={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def seq_len(self):
        return self.manifest["seq_len"]

    @property
    def bytes_per_token(self):
        return self.manifest["bytes_per_token"]

    def _shard_dir(self, shard):
        return os.path.join(self.path, "shards", _shard_name(shard))

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
        arrays = self._arrays.get(shard)
        if arrays is not None:
            return arrays
        if self._verify == "lazy":
            self.verify_shard(shard)  # outside the lock: other shards stay readable meanwhile
        start, stop = _shard_range(self.manifest, shard)
        arrays = {}
        try:
            for name, (shape, dtype) in self._layout.items():
                store = ts.open(
                    {
                        "driver": "zarr3",
                        "kvstore": {"driver": "file", "path": os.path.join(self._shard_dir(shard), name)},
                    },
                    open=True,
                ).result()
                if store.shape != (stop - start, *shape) or store.dtype.numpy_dtype != dtype:
                    raise ValueError(
                        f"{name} is {store.dtype} {store.shape}, want {dtype} " f"{(stop - start, *shape)}"
                    )
                arrays[name] = store
        except ValueError as e:
            raise CorruptShardError(
                f"teacher store shard {_shard_name(shard)} cannot be opened "
                f"({self._shard_dir(shard)}): {e}"
            ) from e
        with self._lock:
            return self._arrays.setdefault(shard, arrays)

    def read_shard(self, shard):
        """Every field of one shard, as stored (including `example_id`)."""
        arrays = self._open_shard(shard)
        futures = {name: array.read() for name, array in arrays.items()}
        try:
            return {name: future.result() for name, future in futures.items()}
        except ValueError as e:
            raise CorruptShardError(
                f"teacher store shard {_shard_name(shard)} is corrupt " f"({self._shard_dir(shard)}): {e}"
            ) from e

    def get(self, example_ids):
        """Teacher targets for `example_ids` (any order, repeats allowed), stacked in that order.

        Returns numpy arrays: `teacher_ids` int32 [n, t, k] (widened from the stored uint type,
        since narrow unsigned ids are a trap in index arithmetic), `teacher_logprobs` [n, t, k] in
        the stored dtype (bf16 by default: half the bytes to the device; losses upcast to f32),
        `teacher_label_logprob` and `teacher_tail_logprob` float32 [n, t].
        """
        ids_n = np.asarray(example_ids, np.int64).reshape(-1)
        bad = ids_n[(ids_n < 0) | (ids_n >= len(self))]
        if bad.size:
            raise KeyError(
                f"example ids {bad[:10].tolist()} not in teacher store {self.path} "
                f"(holds ids [0, {len(self)}))"
            )
        e = self.manifest["examples_per_shard"]
        out = {
            name: np.empty((len(ids_n), *shape), dtype)
            for name, (shape, dtype) in self._layout.items()
            if name in _FIELDS
        }
        shard_n, row_n = np.divmod(ids_n, e)
        for shard in np.unique(shard_n).tolist():
            (sel,) = np.nonzero(shard_n == shard)
            rows = row_n[sel]
            arrays = self._open_shard(shard)
            if rows.size and np.all(np.diff(rows) == 1):  # contiguous: one slice read per field
                index = slice(int(rows[0]), int(rows[-1]) + 1)
            else:
                index = rows
            futures = {name: arrays[name][index].read() for name in _FIELDS}
            try:
                for name, future in futures.items():
                    out[name][sel] = future.result()
            except ValueError as e:
                raise CorruptShardError(
                    f"teacher store shard {_shard_name(shard)} is corrupt " f"({self._shard_dir(shard)}): {e}"
                ) from e
        out["teacher_ids"] = out["teacher_ids"].astype(np.int32)
        return out


def open_store(path, *, expect_vocab_size=None, expect_tokenizer_fingerprint=None, verify="lazy"):
    """Opens a complete teacher store for reading.

    Args:
      path: store directory.
      expect_vocab_size, expect_tokenizer_fingerprint: the student's; a store written for
        another vocabulary or tokenizer is refused with a message naming what differs.
      verify: "lazy" checks each shard's sha256 on its first read (a process reading a slice
        only hashes its shards); "open" checks every shard now; "none" trusts the files (zarr's
        per-chunk crc32c still guards every read).
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
    manifest = _read_json(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreMismatchError(
            f"{path} has format_version {manifest.get('format_version')}, "
            f"this reader reads {FORMAT_VERSION}"
        )
    want = {}
    if expect_vocab_size is not None:
        want["vocab_size"] = expect_vocab_size
    if expect_tokenizer_fingerprint is not None:
        want["tokenizer_fingerprint"] = expect_tokenizer_fingerprint
    problems = _diff({key: manifest.get(key) for key in want}, want, have_name="store", want_name="student")
    if problems:
        raise StoreMismatchError(f"teacher store {path} does not match the student: " + "; ".join(problems))
    store = TeacherStore(path, manifest, verify=verify)
    if verify == "open":
        for shard in range(manifest["num_shards"]):
            store.verify_shard(shard)
    return store


def verify_store(path):
    """Checks a whole store end to end (for `--verify`); returns a report, never raises on data.

    Checks: manifest complete; every shard's sha256; every field's shape and dtype and decodes
    (zarr crc32c per chunk); the stored example ids tile [0, num_examples) exactly once; ids <
    vocab_size; log-probs <= 0.

    Returns:
      {"ok": bool, "problems": [str], "num_examples", "num_shards", "bytes_per_token"}.
    """
    problems = []
    try:
        store = open_store(path, verify="none")
    except (OSError, ValueError) as e:
        return {"ok": False, "problems": [str(e)]}
    manifest = store.manifest
    seen = np.zeros(manifest["num_examples"], np.int64)
    for shard in range(manifest["num_shards"]):
        try:
            store.verify_shard(shard)
            data = store.read_shard(shard)  # decoding checks every chunk's crc32c
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        example_ids = data["example_id"]
        start, stop = _shard_range(manifest, shard)
        if not np.array_equal(example_ids, np.arange(start, stop)):
            problems.append(f"shard {_shard_name(shard)} holds example ids other than [{start}, {stop})")
        np.add.at(seen, example_ids[(example_ids >= 0) & (example_ids < len(seen))], 1)
        if data["teacher_ids"].size and data["teacher_ids"].max() >= manifest["vocab_size"]:
            problems.append(f"shard {_shard_name(shard)} has ids >= vocab_size")
        for name in ("teacher_logprobs", "teacher_label_logprob", "teacher_tail_logprob"):
            if np.any(data[name].astype(np.float32) > 1e-3):  # bf16 rounding of ~0 stays <= 0
                problems.append(f"shard {_shard_name(shard)} has positive {name}")
    if not problems and not np.all(seen == 1):
        problems.append(f"example ids not present exactly once: {np.nonzero(seen != 1)[0][:10]}")
    return {
        "ok": not problems,
        "problems": problems,
        "num_examples": manifest["num_examples"],
        "num_shards": manifest["num_shards"],
        "bytes_per_token": manifest["bytes_per_token"],
    }


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
    With process_count > 1 each process reads only its slice (and only those store shards are
    opened and hashed); with grain's own sharding pass process_count=1.
    Implements grain's batched `_getitems`, which reads each store shard once per batch.
    """

    def __init__(self, token_source, store, *, process_index=0, process_count=1):
        self._tokens = token_source
        self._store = store
        self._lo, self._hi = process_slice(len(token_source), process_index, process_count)
        self._slice = (process_index, process_count)
        if self._hi > self._lo:
            seq_len = int(np.shape(token_source[self._lo]["tokens"])[0]) - 1
            if seq_len != store.seq_len:
                raise StoreMismatchError(
                    f"token source has seq_len {seq_len} but teacher store "
                    f"{store.path} has seq_len {store.seq_len}"
                )

    def __len__(self):
        return self._hi - self._lo

    def __repr__(self):
        return (
            f"StoreSource(tokens={self._tokens!r}, store={self._store!r}, "
            f"slice={self._slice[0]}/{self._slice[1]})"
        )

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
                    f"example {example['example_id']} has tokens of shape "
                    f"{np.shape(example['tokens'])}, store wants "
                    f"({self._store.seq_len + 1},)"
                )
        teacher = self._store.get([int(example["example_id"]) for example in examples])
        out = []
        for row, example in enumerate(examples):
            item = dict(example)
            item["tokens"] = np.asarray(example["tokens"], np.int32)
            item["example_id"] = np.int64(example["example_id"])
            item["mask"] = np.asarray(example.get("mask", np.ones(self._store.seq_len)), np.float32)
            item.update({name: value[row] for name, value in teacher.items()})
            out.append(item)
        return out
