"""Token streams, packed fixed-length examples, and grain pipelines for training and eval.

Data flow:
  documents --encode_documents--> 1-D token stream (EOS after each document, cached as .npy)
            --PackedSequences---> example i = stream[i*L : i*L + L + 1], id i
            --train_dataset-----> shuffled, per-process, batched, repeated grain.MapDataset
            --eval_batches------> every example once, in order, padded and masked.

Example ids are positions in the packed stream, so they are stable given the corpus (documents
and their order), the tokenizer and seq_len; the offline teacher store is keyed by them.

Shapes: B = per-process batch, L = seq_len. A batch holds tokens int32[B, L + 1]: the model
reads tokens[:, :-1] and predicts tokens[:, 1:].
"""

from __future__ import annotations

import math
import operator
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from kdjax.data.tokenizer import Tokenizer
from kdjax.hostio import write_atomically

# Documents per `encode_batch` call: bounds the Python lists of ids alive at once.
_ENCODE_CHUNK = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids in [0, vocab_size): halves the stream for <= 64k."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: Tokenizer, documents: Iterable[str]) -> np.ndarray:
    """Concatenates the documents' token ids, each document followed by EOS.

    Returns:
      stream: 1-D array of `token_dtype(tokenizer.vocab_size)`, length
        sum(len(encode(d)) + 1 for d in documents). An empty document contributes only EOS, so
        the number of EOS tokens equals the number of documents.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    parts: list[np.ndarray] = []
    chunk: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(chunk):
            parts.append(np.asarray(ids, dtype))
            parts.append(eos)
        chunk.clear()

    for doc in documents:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def cached_token_stream(
    cache_path: str | os.PathLike,
    tokenizer: Tokenizer,
    documents_fn: Callable[[], Iterable[str]],
) -> np.ndarray:
    """`encode_documents(tokenizer, documents_fn())`, cached as a `.npy` file at `cache_path`.

    The cache is keyed only by `cache_path`: the caller must put everything the stream depends
    on in it (tokenizer fingerprint, corpus fingerprint or version, split). The file is written
    atomically, and returned memory-mapped read-only, so several processes share one page
    cache copy.

    Raises:
      ValueError: the cached file is not a 1-D stream of this tokenizer's dtype.
    """
    cache_path = pathlib.Path(cache_path)
    if not cache_path.exists():
        stream = encode_documents(tokenizer, documents_fn())
        write_atomically(cache_path, lambda f: np.save(f, stream, allow_pickle=False))
    stream = np.load(cache_path, mmap_mode="r", allow_pickle=False)
    expected = token_dtype(tokenizer.vocab_size)
    if stream.ndim != 1 or stream.dtype != expected:
        raise ValueError(
            f"{cache_path} holds {stream.dtype}{list(stream.shape)}, expected a 1-D {expected} "
            "token stream: was it written for another tokenizer?"
        )
    return stream


class PackedSequences:
    """Fixed-length examples cut from a token stream; a grain random-access data source.

    Example i is {"tokens": int32[L + 1] = stream[i*L : i*L + L + 1], "example_id": int64 i}.
    Consecutive examples share one token (the last label of i is the first input of i + 1), so
    every stream token but the first is predicted exactly once per epoch. The tail after the
    last full example is dropped: len = (len(stream) - 1) // L.
    """

    def __init__(self, stream: np.ndarray, seq_len: int):
        if stream.ndim != 1:
            raise ValueError(f"stream must be 1-D, got shape {stream.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._num = (len(stream) - 1) // seq_len if len(stream) else 0
        if self._num < 1:
            raise ValueError(
                f"stream of {len(stream)} tokens is too short for one example of seq_len {seq_len}"
            )
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        # operator.index accepts numpy integers (grain passes them) and rejects floats/slices.
        i = operator.index(index)
        if i < 0:
            i += self._num
        if not 0 <= i < self._num:
            raise IndexError(f"example {index} out of range [0, {self._num})")
        start = i * self.seq_len
        return {
            # Copy out of the (possibly memory-mapped, unsigned) stream into a fresh int32.
            "tokens": np.asarray(self.stream[start : start + self.seq_len + 1], np.int32),
            "example_id": np.int64(i),
        }

    def __repr__(self) -> str:
        return f"PackedSequences(num_examples={self._num}, seq_len={self.seq_len})"


def train_dataset(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """Shuffled, per-process, batched training data (lazy; nothing is read until indexed).

    Order of operations and why:
      1. shuffle(seed) over all examples, then repeat: grain folds the epoch into the shuffle
         seed, so each epoch is a different permutation of every example.
      2. finite `num_epochs` only: truncate the stream to a multiple of the global batch
         (batch_size * process_count), so every process yields the same number of batches
         (a process with one extra batch would hang a multi-host step).
      3. slice [process_index::process_count]: each process reads only its own elements.
      4. batch(batch_size, drop_remainder=True): static shapes.

    Because of (1)-(3), global step k consumes exactly elements [k*G, (k+1)*G) of the shuffled
    stream, G = batch_size * process_count, whatever the number of processes: the data of a run
    does not depend on how many hosts it ran on, only which host read which rows. An iterator
    state (the step) saved with P processes therefore also restores with P' processes as long
    as G is unchanged.

    Args:
      source: a random-access source such as PackedSequences.
      batch_size: per-process batch B.
      seed: shuffle seed in [0, 2**32).
      process_index, process_count: this process and the number of data-loading processes
        (`jax.process_index()`, `jax.process_count()`).
      num_epochs: None repeats forever (len is then huge); else the number of passes.

    Returns:
      MapDataset of {"tokens": int32[B, L + 1], "example_id": int64[B]}. Iterate it with
      `train_iterator` to get a checkpointable iterator.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(source) < 1:
        raise ValueError("source is empty")
    global_batch = batch_size * process_count
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        usable = len(ds) // global_batch * global_batch
        if usable == 0:
            raise ValueError(
                f"{num_epochs} epoch(s) of {len(source)} examples do not fill one global batch "
                f"of {global_batch}"
            )
        ds = ds[:usable]
    ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True)


def train_iterator(
    dataset: grain.MapDataset, *, num_threads: int = 1, prefetch_buffer_size: int = 8
) -> grain.DatasetIterator:
    """A checkpointable iterator over `dataset`, prefetching in background threads.

    `it.get_state()` is a small JSON-serialisable dict ({"next_index": n} in grain 0.2) that can
    be saved with `ocp.args.JsonSave`; `it.set_state(state)` on a fresh iterator of the same
    dataset resumes with exactly the batch that would have come next. Threads do not change
    the order. Keep the buffer small: batches are cheap to cut from an in-memory stream, and
    every buffered batch is recomputed after a restore anyway.
    """
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(read_options))


def eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` exactly once, in order, in fixed-shape padded batches.

    Global batch k holds examples [k*G, (k+1)*G), G = batch_size * process_count; this process
    gets the contiguous rows [process_index*B, (process_index+1)*B) of it (the usual layout
    when per-process rows are stacked into a global array). Every process yields the
    same number of batches, ceil(len(source) / G), so a multi-host eval step never hangs.

    Yields:
      {"tokens": int32[B, L + 1], "example_id": int64[B], "mask": float32[B, L]}. Rows past the
      end have tokens 0, example_id -1 and mask 0; other rows have mask 1. Weighting the loss
      by "mask" makes the average exact and token-weighted with one compiled shape.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(source)
    if n < 1:
        raise ValueError("source is empty")
    first_example = source[0]
    token_shape = np.shape(first_example["tokens"])
    seq_len = token_shape[0] - 1
    global_batch = batch_size * process_count
    for k in range(math.ceil(n / global_batch)):
        first = k * global_batch + process_index * batch_size
        ids = np.arange(first, first + batch_size, dtype=np.int64)
        valid = ids < n
        tokens = np.zeros((batch_size, *token_shape), np.int32)
        example_id = np.full((batch_size,), -1, np.int64)
        # Other fields of the source (e.g. a teacher store's targets) ride along, zero on padded rows.
        extra = {
            k: np.zeros((batch_size, *np.shape(v)), np.asarray(v).dtype)
            for k, v in first_example.items()
            if k not in ("tokens", "example_id", "mask")
        }
        for row in np.flatnonzero(valid):
            example = source[int(ids[row])]
            tokens[row] = example["tokens"]
            example_id[row] = example["example_id"]
            for k in extra:
                extra[k][row] = example[k]
        yield {
            "tokens": tokens,
            "example_id": example_id,
            "mask": np.broadcast_to(valid[:, None], (batch_size, seq_len)).astype(np.float32),
            **extra,
        }
