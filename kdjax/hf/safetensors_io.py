"""safetensors: a memory-mapped reader of an HF directory's weights and a streaming writer.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(offsets relative to the end of the header) and the raw row-major tensor bytes.  Reading it directly gives
lazily paged numpy views of every dtype, bfloat16 included (safetensors' numpy backend has no bfloat16, and
its flax backend would put each whole tensor on one device).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, NamedTuple, Optional, Sequence

import ml_dtypes
import numpy as np

from kdjax.hostio import write_atomically, write_json_atomically

# safetensors dtype codes for the floating types a checkpoint's parameters may have.
ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),  # numpy itself has no bfloat16
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE]
    found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path}: expected {SINGLE_FILE} or {INDEX_FILE}, found {found or 'no *.safetensors'} (PyTorch .bin "
            "checkpoints must be converted to safetensors)"
        )
    return found


class SafetensorsCheckpoint:
    """The tensors of an HF directory's `model.safetensors` or sharded `*.safetensors` + index.

    Only the headers are read on construction; `view(name)` maps the file and returns a read-only array
    whose pages are read when sliced.
    """

    def __init__(self, path: str):
        self.path, self._entries, self._maps = path, {}, {}
        for name in _weight_files(path):
            base, header = _read_header(os.path.join(path, name))
            for key, info in header.items():
                self._entries[key] = (name, base, info)

    def names(self) -> set:
        return set(self._entries)

    def shape(self, name) -> tuple:
        return tuple(self._entries[name][2]["shape"])

    def dtype_code(self, name) -> str:
        return self._entries[name][2]["dtype"]

    def view(self, name) -> np.ndarray:
        """A read-only memory-mapped array of a float tensor: nothing is read until it is sliced."""
        file, base, info = self._entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(os.path.join(self.path, file), dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[file][base + start : base + end]
        return raw.view(ST_TO_NP[info["dtype"]]).reshape(info["shape"])


class Entry(NamedTuple):
    """One tensor to write: `produce()` returns it (shape and dtype as declared) when its turn comes."""

    name: str
    shape: tuple
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str, entries: Sequence[Entry]) -> None:
    """Streams `entries` into one safetensors file, one tensor in host memory at a time (atomic, fsynced)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without "format"
    for e in entries:
        offsets = [offset, offset + e.nbytes]
        header[e.name] = dict(dtype=NP_TO_ST[e.dtype], shape=list(e.shape), data_offsets=offsets)
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned, as safetensors itself does

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            arr = np.ascontiguousarray(e.produce())
            if arr.shape != tuple(e.shape) or arr.dtype != e.dtype:
                raise AssertionError(f"{e.name}: produced {arr.shape} {arr.dtype}, declared {e.shape} {e.dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)

    write_atomically(path, write)


def shard_groups(entries: Sequence[Entry], max_shard_bytes: Optional[int]) -> list[list[Entry]]:
    """Consecutive entries packed greedily into files of at most max_shard_bytes (a bigger tensor alone)."""
    groups, size = [[]], 0
    for entry in entries:
        if groups[-1] and max_shard_bytes is not None and size + entry.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def write_weights(directory: str, entries: Sequence[Entry], *, max_shard_bytes: Optional[int] = None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the tensors
    exceed `max_shard_bytes` (the names and index transformers' `save_pretrained` writes)."""
    groups = shard_groups(entries, max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), groups[0])
        return
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(directory, file), group)
        weight_map.update({e.name: file for e in group})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    write_json_atomically(os.path.join(directory, INDEX_FILE), index, indent=2, sort_keys=False)
