"""Write a kdjax `Transformer` + `Tokenizer` as a directory that `AutoModelForCausalLM` / `AutoTokenizer` load.

Which HF family: `kdjax.hf.config.hf_model_types` lists the ones that hold the model exactly, preferred
first; the first under which transformers' `AutoTokenizer` reproduces the tokenizer is written (see
`kdjax.data.hf_tokenizer` for why qwen2 may not: a q/k/v-bias student with a kdjax GPT-2-style tokenizer is
then written as llama with attention_bias and an all-zero o_proj bias, and a note says so).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.data.hf_tokenizer import auto_tokenizer_mismatch, save_tokenizer_files
from kdjax.data.tokenizer import Tokenizer
from kdjax.hf import layouts
from kdjax.hf.config import DTYPE_NAMES, hf_model_types, kdjax_to_hf_config
from kdjax.hf.safetensors_io import Entry, write_weights
from kdjax.hostio import fsync_dir, to_host, write_json_atomically
from kdjax.models.transformer import Transformer, TransformerConfig


def check_export_dir(path: str | os.PathLike) -> None:
    """Raises FileExistsError unless `path` is absent, empty or an earlier HF export (which `save_hf` replaces
    whole).  Cheap: call it before training so that a bad export_hf_dir fails before any work."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise FileExistsError(f"{path} is a file, not a directory for a Hugging Face export")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileExistsError(f"{path} exists and is not a Hugging Face export; not overwriting it")


def _write_metadata(directory: str, hf_config: dict, tokenizer: Tokenizer) -> None:
    """config.json, generation_config.json, tokenizer.json and tokenizer_config.json."""
    write_json_atomically(os.path.join(directory, "config.json"), hf_config, indent=2, sort_keys=False)
    eos = tokenizer.eos_id
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    write_json_atomically(os.path.join(directory, "generation_config.json"), generation, indent=2)
    positions = hf_config.get("n_positions", hf_config.get("max_position_embeddings"))
    save_tokenizer_files(directory, tokenizer, model_max_length=positions)


def choose_export_config(
    cfg: TransformerConfig,
    tokenizer: Tokenizer,
    *,
    model_type: Optional[str] = None,
    max_positions: Optional[int] = None,
) -> dict:
    """config.json of the first family of `hf_model_types(cfg, model_type)` under which
    `AutoTokenizer` gives exactly `tokenizer`'s ids; ValueError naming each family's problem when none does.

    Each candidate is tried in a private temporary directory holding only config.json and the tokenizer
    files, so every process of a multi-host run reaches the same answer.
    """
    problems = []
    for candidate in hf_model_types(cfg, model_type):
        hf_config = kdjax_to_hf_config(cfg, tokenizer, model_type=candidate, max_positions=max_positions)
        with tempfile.TemporaryDirectory(prefix="kdjax-hf-tokenizer-") as probe:
            _write_metadata(probe, hf_config, tokenizer)
            problem = auto_tokenizer_mismatch(probe, tokenizer)
        if problem is None:
            if problems:
                print(f"note: exporting as {candidate}, not {'; '.join(problems)}")
            return hf_config
        problems.append(f"as {candidate} because {problem}")
    raise ValueError(
        f"cannot export this tokenizer so that transformers reproduces its ids: {'; '.join(problems)}. "
        "Pass another model_type (e.g. 'llama', which loads tokenizer.json unchanged)."
    )


def _param_value(params: dict, part_path: tuple, scan_layers: bool):
    """The (device) value of a layout part: the parameter, or its layer of a scanned model's stacked one
    (sliced on device, so only that layer is gathered to the host)."""
    path, layer = layouts.model_path(part_path, scan_layers)
    value = params[path].get_value()
    return value if layer is None else value[layer]


def _produce(tensor: layouts.HFTensor, params: dict, dtype: np.dtype, scan_layers: bool = False) -> np.ndarray:
    """The HF tensor from its kdjax parameters, gathered to the host (collective in a multi-host run)."""
    arrays = [to_host(_param_value(params, p, scan_layers)) for p, _ in tensor.parts]
    return tensor.to_hf(*arrays).astype(dtype, copy=False)


def _weight_entries(model: Transformer, model_type: str, dtype: Optional[str]) -> list[Entry]:
    """One `Entry` per HF tensor; each keeps its params' dtype unless `dtype` casts them (a padding tensor
    without parameters takes the embedding's)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    scan = model.cfg.scan_layers
    entries = []
    for tensor in layouts.layout(model.cfg, model_type):
        if dtype is not None:
            np_dtype = np.dtype(jnp.dtype(dtype))
        else:
            source = tensor.parts[0][0] if tensor.parts else ("embed",)
            np_dtype = np.dtype(params[layouts.model_path(source, scan)[0]].get_value().dtype)
        produce = functools.partial(_produce, tensor, params, np_dtype, scan)
        entries.append(Entry(tensor.name, tensor.shape, np_dtype, produce))
    return entries


def hf_state_dict(model: Transformer, *, model_type: Optional[str] = None) -> dict[str, np.ndarray]:
    """{HF tensor name: host array} of `model` written as `model_type` (default: the first of
    `hf_model_types`), in the params' dtypes: what `save_hf` writes, for an in-memory
    `torch_model.load_state_dict` (a tied model has no lm_head.weight; HF ties it itself)."""
    model_type = hf_model_types(model.cfg, model_type)[0]
    return {e.name: e.produce() for e in _weight_entries(model, model_type, None)}


def _replace_dir(tmp: str, path: str) -> None:
    """Moves the finished `tmp` to `path`; an existing export is swapped out whole, never half-overwritten."""
    try:
        check_export_dir(path)  # again: the directory may have changed while the tensors were written
    except FileExistsError:
        shutil.rmtree(tmp)
        raise
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.old.")
        os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def save_hf(
    path: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    max_shard_bytes: Optional[int] = None,
    model_type: Optional[str] = None,
    dtype: Optional[str] = None,
    max_positions: Optional[int] = None,
) -> dict:
    """Writes an HF directory that `AutoModelForCausalLM` and `AutoTokenizer` load; returns its config.json.

    Files: config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json when the tensors exceed `max_shard_bytes`), tokenizer.json,
    tokenizer_config.json.  `AutoTokenizer.from_pretrained(path)` is checked to give exactly the tokenizer's
    ids before any tensor is written.

    Args:
      model_type: the HF family; default: GPT-2 for the GPT-2 switches, else qwen2 for q/k/v biases without an
        output bias (llama when transformers would rebuild the tokenizer under qwen2), else llama.  "mistral"
        and "llama" on request where they hold the model exactly (`kdjax.hf.config.hf_model_types`).
      dtype: "float32" | "bfloat16" | "float16" casts the tensors (e.g. a float32 student shipped in bf16);
        default: each keeps its params' dtype.
      max_positions: the export's max_position_embeddings / model_max_length for a RoPE model (pass the
        source checkpoint's for a model that came from HF); see `kdjax.hf.config.export_positions`.
    Tensors are gathered to the host one at a time.  Everything is written to a temporary sibling directory
    first and renamed into place, so a crash never leaves a half-written export; an existing export at `path`
    is replaced, any other non-empty directory is refused (FileExistsError) before any work.  In a multi-host
    run every process must call this (the gathers are collective); only process 0 writes.
    """
    path = os.path.abspath(os.fspath(path))
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )
    if dtype not in (None, *DTYPE_NAMES):
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPE_NAMES}")
    check_export_dir(path)
    hf_config = choose_export_config(cfg, tokenizer, model_type=model_type, max_positions=max_positions)
    hf_config["dtype"] = dtype or hf_config["dtype"]
    entries = _weight_entries(model, hf_config["model_type"], dtype)
    if jax.process_index() != 0:  # take part in the gathers, write nothing
        for entry in entries:
            entry.produce()
        return hf_config
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp.")
    try:
        write_weights(tmp, entries, max_shard_bytes=max_shard_bytes)
        _write_metadata(tmp, hf_config, tokenizer)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is meant to be shared
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)
    return hf_config
