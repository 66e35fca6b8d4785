"""Load a Hugging Face directory into kdjax params, each device reading only its own slice.

Loading never materialises the checkpoint: safetensors files are memory-mapped, and each parameter is built
with `jax.make_array_from_callback`, so every device reads only its own slice of each tensor and a model
larger than one device's memory loads straight into its mesh shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from kdjax import sharding as sharding_lib
from kdjax.data.hf_tokenizer import load_tokenizer_files
from kdjax.data.tokenizer import Tokenizer
from kdjax.hf import layouts
from kdjax.hf.config import hf_config_to_kdjax
from kdjax.hf.safetensors_io import ST_TO_NP, SafetensorsCheckpoint
from kdjax.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass
class HFCheckpoint:
    """What `load_hf_params` returns; `.model()` merges it into a `Transformer`."""

    graphdef: nnx.GraphDef
    params: nnx.State  # nnx.Param state placed in the requested shardings
    config: TransformerConfig
    tokenizer: Tokenizer
    hf_config: dict  # config.json as read (e.g. its max_position_embeddings, for `save_hf(max_positions=)`)
    skipped: tuple  # checkpoint tensors deliberately not loaded (buffers; lm_head of a tied model)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def _resolve_names(tensors, available: set, prefix: str) -> dict:
    """{layout name: name in the checkpoint}: a base-model checkpoint stores the decoder's tensors without the
    *ForCausalLM prefix."""
    stored = {}
    for t in tensors:
        bare = t.name[len(prefix) :] if t.name.startswith(prefix) else None
        stored[t.name] = bare if t.name not in available and bare in available else t.name
    return stored


def _check_tensors(path, ckpt, tensors, stored, cfg, model_type) -> tuple:
    """Every layout tensor is present with its shape and a float dtype; returns the tensors deliberately
    skipped (buffers, a tied model's lm_head); anything else left over is an error naming it."""
    available = ckpt.names()
    missing = [stored[t.name] for t in tensors if stored[t.name] not in available]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor(s) {missing} (expected for model_type {model_type})")
    for t in tensors:
        found = ckpt.shape(stored[t.name])
        if found != t.shape:
            raise ValueError(
                f"{path}: tensor {stored[t.name]!r} has shape {found} in the checkpoint but config.json "
                f"implies {t.shape}"
            )
        code = ckpt.dtype_code(stored[t.name])
        if code not in ST_TO_NP:
            raise ValueError(f"{path}: tensor {stored[t.name]!r} has non-float dtype {code}")
    leftover = available - set(stored.values())
    tied_head = {n for n in leftover if cfg.tie_embeddings and n == "lm_head.weight"}  # HF ties it on load
    skipped = {n for n in leftover if layouts.BUFFERS.search(n)} | tied_head
    if leftover - skipped:
        raise ValueError(
            f"{path}: checkpoint tensor(s) {sorted(leftover - skipped)} have no place in the kdjax "
            f"{model_type} model (an unsupported variant?)"
        )
    return tuple(sorted(skipped))


def _param_sharding(var, mesh, rules):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    axes, shape = var.get_metadata()["logical_axes"], var.get_value().shape
    return NamedSharding(mesh, sharding_lib.logical_to_spec(axes, shape, rules, mesh))


def _read_slice(host: np.ndarray, index, *, dtype) -> np.ndarray:
    # Always a copy: a device buffer must never alias the read-only memory map (on CPU jax may adopt host
    # memory, and donating it to a train step would then write into the file mapping).
    return np.array(host[index], dtype)


def _read_layers_slice(hosts: tuple, index, *, dtype) -> np.ndarray:
    """A scanned parameter's slice: `index[0]` picks layers (one HF tensor each), the rest slices each."""
    layers = range(len(hosts))[index[0]]
    return np.stack([np.array(hosts[i][tuple(index[1:])], dtype) for i in layers])


def _host_views(ckpt, tensors, stored, cfg) -> dict:
    """{kdjax parameter path: lazy host view}, or for a scanned model's block parameters a tuple of views,
    one per layer (the HF checkpoint stores layers separately)."""
    views = {}
    for tensor in tensors:
        for part_path, from_hf in tensor.parts:
            path, layer = layouts.model_path(part_path, cfg.scan_layers)
            host = from_hf(ckpt.view(stored[tensor.name]))  # a lazy view; nothing read yet
            if layer is None:
                views[path] = host
            else:
                views.setdefault(path, [None] * cfg.num_layers)[layer] = host
    return {p: tuple(v) if isinstance(v, list) else v for p, v in views.items()}


def _place_params(ckpt, tensors, stored, cfg, mesh, rules) -> tuple:
    """(graphdef, nnx.Param state) with every parameter built on its devices from the memory-mapped views."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    views = _host_views(ckpt, tensors, stored, cfg)
    pdt = np.dtype(jnp.dtype(cfg.param_dtype))
    flat = []
    for param_path, var in nnx.to_flat_state(abstract):
        if param_path not in views:
            raise AssertionError(f"kdjax parameter {param_path} has no Hugging Face tensor in the layout")
        host, shape = views[param_path], var.get_value().shape
        if isinstance(host, tuple):  # scanned: one view per layer, stacked slice by slice on read
            found = (len(host), *host[0].shape)
            read = functools.partial(_read_layers_slice, host, dtype=pdt)
        else:
            found = host.shape
            read = functools.partial(_read_slice, host, dtype=pdt)  # called with each device's index
        if found != shape:
            raise AssertionError(f"{param_path}: layout gives {found}, model has {shape}")
        array = jax.make_array_from_callback(shape, _param_sharding(var, mesh, rules), read)
        flat.append((param_path, var.replace(array)))
    return graphdef, nnx.from_flat_state(flat)


def load_hf_params(
    path: str | os.PathLike,
    *,
    mesh=None,
    rules=None,
    max_len: Optional[int] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
    scan_layers: bool = False,
    remat_policy: str = "none",
) -> HFCheckpoint:
    """Reads an HF directory (config.json, safetensors, tokenizer.json) into sharded kdjax params.

    With `mesh`, every parameter lands in the sharding its logical axes get from `rules` (default
    `sharding.DEFAULT_RULES`), each device reading only its slice from the memory-mapped files; without,
    everything goes to the first device.  Raises ValueError for an unsupported config, a missing tensor
    (naming all missing ones), a tensor of the wrong shape (naming it and both shapes), a non-float tensor,
    or checkpoint tensors the model has no place for (naming them).  See `hf_config_to_kdjax` for the
    keyword arguments; `scan_layers` and `remat_policy` are the `TransformerConfig` fields of that name (a
    scanned model reads each layer's HF tensor into its slice of the stacked parameter).
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    cfg = hf_config_to_kdjax(hf_config, max_len=max_len, param_dtype=param_dtype, dtype=dtype)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers, remat_policy=remat_policy)
    model_type = hf_config["model_type"]
    tokenizer = load_tokenizer_files(path, eos_token_id=hf_config.get("eos_token_id"))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )
    ckpt = SafetensorsCheckpoint(path)
    tensors = layouts.layout(cfg, model_type, hf_config.get("n_positions"))
    stored = _resolve_names(tensors, ckpt.names(), layouts.PREFIX[model_type])
    skipped = _check_tensors(path, ckpt, tensors, stored, cfg, model_type)
    rules = rules if rules is not None else sharding_lib.DEFAULT_RULES
    graphdef, params = _place_params(ckpt, tensors, stored, cfg, mesh, rules)
    return HFCheckpoint(graphdef, params, cfg, tokenizer, hf_config, skipped)


def load_hf(
    path: str | os.PathLike,
    *,
    mesh=None,
    rules=None,
    max_len: Optional[int] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
    scan_layers: bool = False,
    remat_policy: str = "none",
) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from an HF directory: `model(tokens_bt) -> logits_btv`.  See `load_hf_params`."""
    ckpt = load_hf_params(path, mesh=mesh, rules=rules, max_len=max_len, param_dtype=param_dtype, dtype=dtype,
                          scan_layers=scan_layers, remat_policy=remat_policy)
    return ckpt.model(), ckpt.tokenizer
