"""Hugging Face checkpoints <-> the kdjax transformer: config, safetensors weights and tokenizer files.

transformers 5 has no Flax models, so kdjax reads and writes the HF directory format itself:

    load_hf(path, mesh=...)         -> (Transformer, Tokenizer)   config.json, *.safetensors, tokenizer.json
    load_hf_params(path, mesh=...)  -> HFCheckpoint               the same as graphdef + sharded params
    save_hf(path, model, tokenizer)                               writes what AutoModelForCausalLM loads

Supported `model_type`s: gpt2, llama, qwen2, mistral (`SUPPORTED_MODEL_TYPES`).  Anything the kdjax
transformer cannot compute exactly (RoPE scaling, an active sliding window, other activations, ...) is
refused with a message, never approximated: a teacher that silently computes something else than its
checkpoint would poison every distillation run that uses it.

Loading never materialises the checkpoint: safetensors files are memory-mapped, and each parameter is
built with `jax.make_array_from_callback`, so every device reads only its own slice of each tensor and
a model larger than one device's memory loads straight into its mesh shardings.

Layouts.  torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` stores [in, out]; kdjax stores
[in, heads, head_dim] / [heads, head_dim, out] / [in, out].  RoPE uses HF's rotate-half layout in both,
so Llama q/k weights need no permutation.  Shape suffixes as in `transformer.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from kdjax import sharding as sharding_lib
from kdjax.data.tokenizer import EOS, Tokenizer
from kdjax.models.transformer import Transformer, TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Module prefix of the decoder's tensors in a *ForCausalLM checkpoint; a bare base-model checkpoint
# (GPT2Model, LlamaModel, and the original openai-community/gpt2 upload) has none.
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model."}
# Non-parameter tensors some checkpoints carry: GPT-2's causal-mask buffers, old Llama's RoPE inverse
# frequencies.  Both are recomputed, so they are skipped; anything else left over is an error.
_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")

_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# safetensors dtype codes for the floating types a checkpoint's parameters may have.
_ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),  # ml_dtypes' bfloat16: numpy itself has none
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


# ----------------------------------------------------------------------------------------------------------
# Configs


def _rope_theta(hf: dict) -> float:
    """RoPE base from either config layout, refusing any RoPE variant other than the plain one.

    transformers 5 writes `rope_parameters={'rope_type', 'rope_theta', ...}`; older files have top-level
    `rope_theta` and `rope_scaling` (None or {'type'|'rope_type': ...}).
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    for source in (params, scaling or {}):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"RoPE scaling {kind!r} is not supported (only plain RoPE, rope_type 'default'): "
                f"rope_parameters={hf.get('rope_parameters')}, rope_scaling={scaling}"
            )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial rotary embeddings are not supported: {params}")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _dtype_name(hf: dict) -> str:
    name = hf.get("dtype", hf.get("torch_dtype"))
    return name if name in _DTYPE_NAMES else "float32"


def _check_sliding_window(hf: dict, model_type: str, max_len: int):
    """A sliding window only changes attention for sequences longer than the window (HF masks key j
    for query i unless i - j < window), so a window >= max_len is plain causal attention."""
    # MistralConfig's default window is 4096 (a file without the key gets it); Qwen2's applies only with
    # use_sliding_window.
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None)
    if model_type == "qwen2":
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            sliding = "sliding_attention" in layer_types
        else:  # Qwen2Config's rule when the file predates `layer_types`.
            first_sliding = hf.get("max_window_layers", 28)
            sliding = bool(hf.get("use_sliding_window")) and first_sliding < hf.get("num_hidden_layers", 32)
        if not sliding:
            return
    if window is not None and window < max_len:
        raise ValueError(
            f"{model_type} sliding_window={window} is smaller than max_len={max_len}; the kdjax transformer "
            f"has no sliding-window attention.  Load with max_len <= {window} to use sequences that fit "
            "the window (where it equals full causal attention)."
        )


def _unsupported(model_type) -> str:
    return f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"


def hf_config_to_kdjax(
    hf_config: dict,
    *,
    max_len: Optional[int] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
) -> TransformerConfig:
    """`TransformerConfig` equivalent to an HF config.json dict, or ValueError saying what is unsupported.

    Args:
      hf_config: the parsed config.json.
      max_len: longest sequence the model will see (default: the checkpoint's position limit).  Only
        matters for learned positions (must be <= n_positions) and sliding windows (must fit the window).
      param_dtype, dtype: "float32" | "bfloat16" | "float16"; default: the checkpoint's `dtype`
        (`torch_dtype` in older files), else float32; `dtype` defaults to `param_dtype`.
    """
    hf = hf_config
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(_unsupported(model_type))
    param_dtype = param_dtype or _dtype_name(hf)
    dtype = dtype or param_dtype
    if model_type == "gpt2":
        return _gpt2_config(hf, max_len, param_dtype, dtype)
    return _llama_config(hf, model_type, max_len, param_dtype, dtype)


def _gpt2_config(hf, max_len, param_dtype, dtype):
    act = hf.get("activation_function", "gelu_new")
    # Both are the tanh approximation that kdjax's GELU computes; "gelu" (erf) differs at ~1e-3.
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"gpt2 activation_function={act!r} is not supported; kdjax computes tanh-GELU (gelu_new)"
        )
    if not hf.get("scale_attn_weights", True):
        raise ValueError("gpt2 scale_attn_weights=False (unscaled attention) is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 scale_attn_by_inverse_layer_idx=True is not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError("gpt2 add_cross_attention=True (an encoder-decoder block) is not supported")
    # `reorder_and_upcast_attn` is accepted: it only computes the same scores in float32 with the scale
    # folded into the matmul, which kdjax's float32 softmax already matches.
    d, heads, n_pos = hf.get("n_embd", 768), hf.get("n_head", 12), hf.get("n_positions", 1024)
    if d % heads:
        raise ValueError(f"gpt2 n_embd={d} is not a multiple of n_head={heads}")
    if max_len is not None and max_len > n_pos:
        raise ValueError(f"max_len={max_len} exceeds the checkpoint's learned positions n_positions={n_pos}")
    return TransformerConfig.gpt2(
        vocab_size=hf.get("vocab_size", 50257),
        num_layers=hf.get("n_layer", 12),
        embed_dim=d,
        num_heads=heads,
        head_dim=d // heads,
        mlp_dim=hf.get("n_inner") or 4 * d,
        max_len=max_len or n_pos,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        param_dtype=param_dtype,
        dtype=dtype,
    )


_LLAMA_MAX_LEN = {"llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}  # the config classes' defaults


def _llama_config(hf, model_type, max_len, param_dtype, dtype):
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type} hidden_act={act!r} is not supported; kdjax's SwiGLU uses silu")
    theta = _rope_theta(hf)
    d = hf.get("hidden_size", 4096)
    heads = hf.get("num_attention_heads", 32)
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d // heads
    max_len = max_len or hf.get("max_position_embeddings", _LLAMA_MAX_LEN[model_type])
    _check_sliding_window(hf, model_type, max_len)
    if model_type == "llama":
        if hf.get("mlp_bias", False):
            raise ValueError("llama mlp_bias=True is not supported (kdjax's SwiGLU has no biases)")
        # attention_bias puts biases on q, k, v and o: exactly qkv_bias + out_bias.
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    elif model_type == "qwen2":
        qkv_bias, out_bias = True, False  # Qwen2 always has q/k/v biases and no o bias.
    else:
        qkv_bias = out_bias = False
    return TransformerConfig.llama(
        vocab_size=hf.get("vocab_size", 32000),
        num_layers=hf.get("num_hidden_layers", 32),
        embed_dim=d,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=hf.get("intermediate_size", 11008),
        max_len=max_len,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        param_dtype=param_dtype,
        dtype=dtype,
    )


def _hf_model_type(cfg: TransformerConfig, model_type: Optional[str] = None) -> str:
    """The HF family `save_hf` writes `cfg` as, or ValueError naming the switches that do not fit.

    Default: gpt2 for the GPT-2 switches, llama for the Llama ones.  A model with q/k/v biases but no
    output bias is written as llama with attention_bias (its o_proj bias all zeros) rather than qwen2,
    because transformers 5's AutoTokenizer loads any qwen2 directory as `Qwen2Tokenizer`, which rebuilds
    the tokenizer from vocab + merges with Qwen's own pre-tokenizer and ignores tokenizer.json's, so a
    kdjax tokenizer would not give the same ids.  Pass model_type="qwen2" for a student that keeps a
    Qwen2 tokenizer: then the export is exactly Qwen2's layout (and round-trips bit for bit).
    """
    gpt2 = dict(
        positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True
    )
    llama = dict(positions="rope", norm="rmsnorm", mlp="swiglu", mlp_bias=False)
    for family, switches in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(cfg, k) == v for k, v in switches.items()):
            break
    else:
        raise ValueError(
            f"no Hugging Face architecture matches this TransformerConfig: GPT-2 needs {gpt2}, the Llama "
            f"family needs {llama}; got {dataclasses.asdict(cfg)}"
        )
    if model_type not in (None, *SUPPORTED_MODEL_TYPES):
        raise ValueError(_unsupported(model_type))
    if family == "gpt2":
        if model_type not in (None, "gpt2"):
            raise ValueError(f"a GPT-2-style TransformerConfig cannot be written as {model_type}")
        if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.embed_dim:
            raise ValueError(
                "GPT-2 needs num_kv_heads == num_heads and head_dim * num_heads == embed_dim; got "
                f"{cfg.num_kv_heads}, {cfg.num_heads}, {cfg.head_dim}, {cfg.embed_dim}"
            )
        return "gpt2"
    if cfg.out_bias and not cfg.qkv_bias:
        raise ValueError("an output-projection bias without q/k/v biases has no Hugging Face equivalent")
    model_type = model_type or "llama"
    needs = {"gpt2": None, "llama": None, "qwen2": (True, False), "mistral": (False, False)}[model_type]
    if model_type == "gpt2" or (needs is not None and (cfg.qkv_bias, cfg.out_bias) != needs):
        raise ValueError(
            f"this TransformerConfig (qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}) cannot be written as "
            f"{model_type}"
        )
    return model_type


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizers.Tokenizer.from_str(tokenizer.to_str()).id_to_token(token_id)


def kdjax_to_hf_config(
    cfg: TransformerConfig, tokenizer: Optional[Tokenizer] = None, *, model_type: Optional[str] = None
) -> dict:
    """config.json contents for `cfg` (see `_hf_model_type` for which model_type is written).

    Llama gets attention_bias=True when `cfg` has any attention bias.  bos/eos ids are the tokenizer's EOS
    (kdjax documents are separated by EOS alone).  Dropout is 0: the student was trained without it.
    """
    model_type = _hf_model_type(cfg, model_type)
    common = dict(
        architectures=[_ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        dtype=cfg.param_dtype,
        use_cache=True,
    )
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    if model_type == "gpt2":
        return dict(
            common,
            n_embd=cfg.embed_dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            n_positions=cfg.max_len,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
        )
    out = dict(
        common,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling.
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,
        rope_scaling=None,
        attention_dropout=0.0,
    )
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:  # explicit: a Mistral config without the key gets a 4096-token window
        out.update(sliding_window=None)
    return out


# ----------------------------------------------------------------------------------------------------------
# Tensor layout: which HF tensor holds which kdjax parameter, and how it is reshaped.


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the kdjax parameters it holds (three for GPT-2's fused q|k|v).

    `parts[i] = (kdjax path, hf array -> kdjax array)`; the functions return numpy *views* where they can
    (reshape / transpose / slice of a memory map), so slicing them for one device reads only that slice.
    `to_hf(*kdjax arrays in parts order)` is the inverse, used by `save_hf`.
    """

    name: str
    shape: tuple
    parts: tuple
    to_hf: Callable


def _single(name, shape, path, from_hf, to_hf):
    return _Tensor(name, tuple(shape), ((path, from_hf),), to_hf)


_same = lambda x: x
_transpose = lambda x: x.T


def _layout(cfg: TransformerConfig, model_type: str, hf_positions: Optional[int] = None) -> list:
    """Every HF tensor of `model_type` for `cfg`, with its kdjax parameter(s).

    `hf_positions` is GPT-2's n_positions in the checkpoint when it has more learned positions than
    `cfg.max_len` uses.  A llama export of a model with q/k/v biases but no output bias gets an all-zero
    o_proj bias (a tensor with no kdjax part; see `_hf_model_type`).
    """
    d, h, k, e = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f, v = cfg.mlp_dim, cfg.vocab_size
    tensors = []
    if model_type == "gpt2":
        p = _PREFIX["gpt2"]
        n_pos = hf_positions or cfg.max_len
        max_len = cfg.max_len
        tensors += [
            _single(p + "wte.weight", (v, d), ("embed",), _same, _same),
            _single(p + "wpe.weight", (n_pos, d), ("pos_embed",), lambda w: w[:max_len], _same),
        ]
        for i in range(cfg.num_layers):
            b, blk = f"{p}h.{i}.", ("blocks", i)
            # c_attn is Conv1D [in, out] with out = q | k | v, each head-major [H, E].
            qkv = lambda j: (lambda w: w[:, j * d : (j + 1) * d].reshape(d, h, e))
            qkv_b = lambda j: (lambda w: w[j * d : (j + 1) * d].reshape(h, e))
            tensors += [
                _single(b + "ln_1.weight", (d,), blk + ("attn_norm", "scale"), _same, _same),
                _single(b + "ln_1.bias", (d,), blk + ("attn_norm", "bias"), _same, _same),
                _Tensor(
                    b + "attn.c_attn.weight",
                    (d, 3 * d),
                    tuple((blk + ("attn", n), qkv(j)) for j, n in enumerate(("wq", "wk", "wv"))),
                    lambda *ws: np.concatenate([w.reshape(d, d) for w in ws], axis=1),
                ),
                _Tensor(
                    b + "attn.c_attn.bias",
                    (3 * d,),
                    tuple((blk + ("attn", n), qkv_b(j)) for j, n in enumerate(("bq", "bk", "bv"))),
                    lambda *ws: np.concatenate([w.reshape(d) for w in ws]),
                ),
                _single(
                    b + "attn.c_proj.weight",
                    (d, d),
                    blk + ("attn", "wo"),
                    lambda w: w.reshape(h, e, d),
                    lambda x: x.reshape(h * e, d),
                ),
                _single(b + "attn.c_proj.bias", (d,), blk + ("attn", "bo"), _same, _same),
                _single(b + "ln_2.weight", (d,), blk + ("mlp_norm", "scale"), _same, _same),
                _single(b + "ln_2.bias", (d,), blk + ("mlp_norm", "bias"), _same, _same),
                _single(b + "mlp.c_fc.weight", (d, f), blk + ("mlp", "w_up"), _same, _same),
                _single(b + "mlp.c_fc.bias", (f,), blk + ("mlp", "b_up"), _same, _same),
                _single(b + "mlp.c_proj.weight", (f, d), blk + ("mlp", "w_down"), _same, _same),
                _single(b + "mlp.c_proj.bias", (d,), blk + ("mlp", "b_down"), _same, _same),
            ]
        tensors += [
            _single(p + "ln_f.weight", (d,), ("final_norm", "scale"), _same, _same),
            _single(p + "ln_f.bias", (d,), ("final_norm", "bias"), _same, _same),
        ]
    else:
        p = _PREFIX[model_type]
        tensors.append(_single(p + "embed_tokens.weight", (v, d), ("embed",), _same, _same))
        # nn.Linear [out, in] with out head-major: [H*E, D] <-> kdjax [D, H, E].
        proj_in = lambda n: (lambda w: w.reshape(n, e, d).transpose(2, 0, 1), lambda x: x.reshape(d, n * e).T)
        for i in range(cfg.num_layers):
            b, blk = f"{p}layers.{i}.", ("blocks", i)
            a, attn = b + "self_attn.", blk + ("attn",)
            tensors += [
                _single(b + "input_layernorm.weight", (d,), blk + ("attn_norm", "scale"), _same, _same),
                _single(a + "q_proj.weight", (h * e, d), attn + ("wq",), *proj_in(h)),
                _single(a + "k_proj.weight", (k * e, d), attn + ("wk",), *proj_in(k)),
                _single(a + "v_proj.weight", (k * e, d), attn + ("wv",), *proj_in(k)),
                _single(
                    a + "o_proj.weight",
                    (d, h * e),
                    attn + ("wo",),
                    lambda w: w.reshape(d, h, e).transpose(1, 2, 0),
                    lambda x: x.reshape(h * e, d).T,
                ),
            ]
            if cfg.qkv_bias:
                for n, heads in (("q", h), ("k", k), ("v", k)):
                    tensors.append(
                        _single(
                            a + f"{n}_proj.bias",
                            (heads * e,),
                            attn + (f"b{n}",),
                            lambda w, heads=heads: w.reshape(heads, e),
                            lambda x: x.reshape(-1),
                        )
                    )
            if cfg.out_bias:
                tensors.append(_single(a + "o_proj.bias", (d,), attn + ("bo",), _same, _same))
            elif cfg.qkv_bias and model_type == "llama":
                tensors.append(_Tensor(a + "o_proj.bias", (d,), (), lambda: np.zeros((d,), np.float32)))
            m, mlp, post_norm = b + "mlp.", blk + ("mlp",), b + "post_attention_layernorm.weight"
            tensors += [
                _single(post_norm, (d,), blk + ("mlp_norm", "scale"), _same, _same),
                _single(m + "gate_proj.weight", (f, d), mlp + ("w_gate",), _transpose, _transpose),
                _single(m + "up_proj.weight", (f, d), mlp + ("w_up",), _transpose, _transpose),
                _single(m + "down_proj.weight", (d, f), mlp + ("w_down",), _transpose, _transpose),
            ]
        tensors.append(_single(p + "norm.weight", (d,), ("final_norm", "scale"), _same, _same))
    if not cfg.tie_embeddings:
        tensors.append(_single("lm_head.weight", (v, d), ("lm_head",), _transpose, _transpose))
    return tensors


# ----------------------------------------------------------------------------------------------------------
# safetensors: a memory-mapped reader and a streaming writer.
#
# The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
# (offsets relative to the end of the header) and the raw row-major tensor bytes.  Reading it directly
# gives lazily paged numpy views of every dtype, bfloat16 included (safetensors' numpy backend has no
# bfloat16, and its flax backend would put each whole tensor on one device).


def _read_header(path: str):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class _Checkpoint:
    """The tensors of an HF directory's `model.safetensors` or sharded `*.safetensors` + index."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{path}: expected model.safetensors or model.safetensors.index.json, found "
                    f"{found or 'no *.safetensors'} (PyTorch .bin checkpoints must be converted to "
                    "safetensors)"
                )
            files = found
        self.path, self._entries, self._maps = path, {}, {}
        for name in files:
            base, header = _read_header(os.path.join(path, name))
            for key, info in header.items():
                self._entries[key] = (name, base, info)

    def names(self):
        return set(self._entries)

    def shape(self, name) -> tuple:
        return tuple(self._entries[name][2]["shape"])

    def dtype_code(self, name) -> str:
        return self._entries[name][2]["dtype"]

    def view(self, name) -> np.ndarray:
        """A read-only memory-mapped array: pages are read only when sliced."""
        file, base, info = self._entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(os.path.join(self.path, file), dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[file][base + start : base + end]
        return raw.view(_ST_TO_NP[info["dtype"]]).reshape(info["shape"])


def _write_safetensors(path: str, entries: Sequence[tuple]):
    """Streams [(name, shape, numpy dtype, produce() -> array)]: one tensor in host memory at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without "format"
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = dict(dtype=_NP_TO_ST[dtype], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned, as safetensors itself does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != dtype:
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# Tokenizer files


class _OtherEosTokenizer(Tokenizer):
    """A `Tokenizer` whose end-of-sequence token is not "<|endoftext|>" (Llama's and Mistral's "</s>", ...).

    `Tokenizer.__init__` requires "<|endoftext|>" (kdjax's own tokenizers have it); this sets the same state
    with another EOS.  It goes away once `Tokenizer` takes the EOS token as an argument.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str):
        self._tok = tokenizer
        self._json = tokenizer.to_str()
        self._eos_id = tokenizer.token_to_id(eos_token)
        if self._eos_id is None:
            raise ValueError(f"tokenizer has no EOS token {eos_token!r}")
        self._tok.encode_special_tokens = True


def _token_content(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def _load_tokenizer(path: str, hf_config: dict) -> Tokenizer:
    """The directory's tokenizer.json; EOS is "<|endoftext|>" when present, else tokenizer_config.json's
    eos_token, else config.json's eos_token_id."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{path} has no tokenizer.json (a fast tokenizer); convert a slow one once with "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path)"
        )
    tok = tokenizers.Tokenizer.from_file(file)
    if tok.token_to_id(EOS) is not None:
        return Tokenizer(tok)
    eos = None
    tok_config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tok_config):
        with open(tok_config) as f:
            eos = _token_content(json.load(f).get("eos_token"))
    if eos is None:
        eos_id = hf_config.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
        eos = tok.id_to_token(eos_id) if eos_id is not None else None
    if eos is None:
        raise ValueError(f"{path}: cannot tell the EOS token (no {EOS!r}, no eos_token, no eos_token_id)")
    return _OtherEosTokenizer(tok, eos)


def _tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict:
    """tokenizer_config.json so `AutoTokenizer` builds a `PreTrainedTokenizerFast` from tokenizer.json as is.

    The class is named explicitly: left to config.json's model_type, AutoTokenizer would pick e.g.
    GPT2Tokenizer, which rebuilds the pipeline (prefix space, ...) and could change the ids.
    EOS doubles as BOS, UNK (byte-level BPE never needs it) and PAD, as in GPT-2.
    """
    eos = _token(tokenizer, tokenizer.eos_id)
    return dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=max_len,
        bos_token=eos,
        eos_token=eos,
        unk_token=eos,
        pad_token=eos,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def compare_tokenizers(
    a: Tokenizer, b: Tokenizer, sample_texts: Sequence[str], *, names: tuple = ("a", "b")
) -> Optional[str]:
    """None when `a` and `b` agree; else one line saying the first difference found.

    Checks, in order: vocab size, EOS id, the token -> id map, then the ids of each sample text (the first
    text and position where they differ).  Distilling between tokenizers that differ anywhere compares
    logits over different meanings of the same index, so the caller should stop.
    """
    na, nb = names
    if a.to_str() == b.to_str():
        return None
    if a.vocab_size != b.vocab_size:
        return f"tokenizers differ: vocab size {a.vocab_size} ({na}) vs {b.vocab_size} ({nb})"
    if a.eos_id != b.eos_id:
        return f"tokenizers differ: EOS id {a.eos_id} ({na}) vs {b.eos_id} ({nb})"
    va = tokenizers.Tokenizer.from_str(a.to_str()).get_vocab(with_added_tokens=True)
    vb = tokenizers.Tokenizer.from_str(b.to_str()).get_vocab(with_added_tokens=True)
    if va != vb:
        token = min(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[0]
        return (
            f"tokenizers differ: token {token!r} has id {va.get(token)} ({na}) vs {vb.get(token)} ({nb}) "
            "(same vocab size, different vocabularies)"
        )
    for i, text in enumerate(sample_texts):
        ia, ib = a.encode(text), b.encode(text)
        if ia != ib:
            j = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
            return (
                f"tokenizers differ on sample text {i} ({text[:40]!r}...): first differing id at token "
                f"position {j}: {ia[j:j + 5]} ({na}) vs {ib[j:j + 5]} ({nb})"
            )
    return None


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class HFCheckpoint:
    """What `load_hf_params` returns; `.model()` merges it into a `Transformer`."""

    graphdef: nnx.GraphDef
    params: nnx.State  # nnx.Param state placed in the requested shardings
    config: TransformerConfig
    tokenizer: Tokenizer
    hf_config: dict  # config.json as read
    skipped: tuple  # checkpoint tensors deliberately not loaded (buffers; lm_head of a tied model)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def _param_sharding(var, mesh, rules):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    axes, shape = var.get_metadata()["logical_axes"], var.get_value().shape
    return NamedSharding(mesh, sharding_lib.logical_to_spec(axes, shape, rules, mesh))


def load_hf_params(
    path: str | os.PathLike,
    *,
    mesh=None,
    rules=None,
    max_len: Optional[int] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
) -> HFCheckpoint:
    """Reads an HF directory (config.json, safetensors, tokenizer.json) into sharded kdjax params.

    With `mesh`, every parameter lands in the sharding its logical axes get from `rules` (default
    `sharding.DEFAULT_RULES`), each device reading only its slice from the memory-mapped files; without,
    everything goes to the first device.  Raises ValueError for an unsupported config, a missing tensor
    (naming all missing ones), a tensor of the wrong shape (naming it and both shapes), a non-float tensor,
    or checkpoint tensors the model has no place for (naming them).  See `hf_config_to_kdjax` for the
    keyword arguments.
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    cfg = hf_config_to_kdjax(hf_config, max_len=max_len, param_dtype=param_dtype, dtype=dtype)
    model_type = hf_config["model_type"]
    tokenizer = _load_tokenizer(path, hf_config)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )

    ckpt = _Checkpoint(path)
    available = ckpt.names()
    layout = _layout(cfg, model_type, hf_config.get("n_positions"))
    prefix = _PREFIX[model_type]

    def resolve(name):  # a base-model checkpoint stores the decoder's tensors without the prefix
        if name in available or not name.startswith(prefix):
            return name
        return name[len(prefix) :] if name[len(prefix) :] in available else name

    stored = {t.name: resolve(t.name) for t in layout}
    missing = [stored[t.name] for t in layout if stored[t.name] not in available]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks tensor(s) {missing} (expected for model_type {model_type})"
        )
    for t in layout:
        found = ckpt.shape(stored[t.name])
        if found != t.shape:
            raise ValueError(
                f"{path}: tensor {stored[t.name]!r} has shape {found} in the checkpoint but config.json "
                f"implies {t.shape}"
            )
        code = ckpt.dtype_code(stored[t.name])
        if code not in _ST_TO_NP:
            raise ValueError(f"{path}: tensor {stored[t.name]!r} has non-float dtype {code}")
    leftover = available - set(stored.values())
    tied_head = {n for n in leftover if cfg.tie_embeddings and n == "lm_head.weight"}  # HF ties it on load
    skipped = {n for n in leftover if _BUFFERS.search(n)} | tied_head
    if leftover - skipped:
        raise ValueError(
            f"{path}: checkpoint tensor(s) {sorted(leftover - skipped)} have no place in the kdjax "
            f"{model_type} model (an unsupported variant?)"
        )

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rules = rules if rules is not None else sharding_lib.DEFAULT_RULES
    by_path = {part_path: (t, fn) for t in layout for part_path, fn in t.parts}
    pdt = np.dtype(jnp.dtype(cfg.param_dtype))
    flat = []
    for param_path, var in nnx.to_flat_state(abstract):
        if param_path not in by_path:
            raise AssertionError(f"kdjax parameter {param_path} has no Hugging Face tensor in the layout")
        tensor, from_hf = by_path[param_path]
        host = from_hf(ckpt.view(stored[tensor.name]))  # a lazy view; nothing read yet
        shape = var.get_value().shape
        if host.shape != shape:
            raise AssertionError(
                f"{tensor.name} -> {param_path}: layout gives {host.shape}, model has {shape}"
            )
        # Always a copy: a device buffer must never alias the read-only memory map (on CPU jax may
        # adopt host memory, and donating it to a train step would then write into the file mapping).
        array = jax.make_array_from_callback(
            shape, _param_sharding(var, mesh, rules), lambda idx, host=host: np.array(host[idx], pdt)
        )
        flat.append((param_path, var.replace(array)))
    params = nnx.from_flat_state(flat)
    return HFCheckpoint(graphdef, params, cfg, tokenizer, hf_config, tuple(sorted(skipped)))


def load_hf(
    path: str | os.PathLike,
    *,
    mesh=None,
    rules=None,
    max_len: Optional[int] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from an HF directory: `model(tokens_bt) -> logits_btv`.  See `load_hf_params`."""
    ckpt = load_hf_params(path, mesh=mesh, rules=rules, max_len=max_len, param_dtype=param_dtype, dtype=dtype)
    return ckpt.model(), ckpt.tokenizer


# ----------------------------------------------------------------------------------------------------------
# Saving


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # only multi-host runs need it

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _shard_groups(entries, max_shard_bytes):
    """Consecutive tensors packed greedily into files of at most max_shard_bytes (a bigger tensor alone)."""
    groups, size = [[]], 0
    for entry in entries:
        n = math.prod(entry[1]) * entry[2].itemsize
        if groups[-1] and max_shard_bytes is not None and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def _replace_dir(tmp: str, path: str):
    """Moves the finished `tmp` to `path`; an existing export is swapped out whole, never half-overwritten."""
    if os.path.exists(path):
        if os.listdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            shutil.rmtree(tmp)
            raise FileExistsError(f"{path} exists and is not a Hugging Face export; not overwriting it")
        old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.old.")
        os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def save_hf(
    path: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    max_shard_bytes: Optional[int] = None,
    model_type: Optional[str] = None,
    dtype: Optional[str] = None,
):
    """Writes an HF directory that `AutoModelForCausalLM` and `AutoTokenizer` load.

    Files: config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json when the tensors exceed `max_shard_bytes`), tokenizer.json,
    tokenizer_config.json.  Tensors are gathered to the host one at a time and keep the params' dtype
    unless `dtype` ("float32" | "bfloat16" | "float16") casts them (e.g. a float32 student shipped in bf16).
    `model_type` overrides the default family (gpt2 or llama; see `_hf_model_type`, e.g. "qwen2").
    Everything is written to a temporary sibling directory first and renamed into place, so a crash
    never leaves a half-written export; an existing export at `path` is replaced.  In a multi-host run
    every process must call this (the gathers are collective); only process 0 writes.
    """
    path = os.path.abspath(os.fspath(path))
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )
    if dtype not in (None, *_DTYPE_NAMES):
        raise ValueError(f"dtype={dtype!r}; expected one of {_DTYPE_NAMES}")
    hf_config = kdjax_to_hf_config(cfg, tokenizer, model_type=model_type)
    hf_config["dtype"] = dtype or hf_config["dtype"]
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def dtype_of(tensor):  # else its params' dtype; the embedding's for a padding tensor without any
        if dtype is not None:
            return np.dtype(jnp.dtype(dtype))
        path = tensor.parts[0][0] if tensor.parts else ("embed",)
        return np.dtype(params[path].get_value().dtype)

    def produce(tensor):
        host = lambda: tensor.to_hf(*[_to_host(params[p].get_value()) for p, _ in tensor.parts])
        return lambda: host().astype(dtype_of(tensor), copy=False)

    entries = [(t.name, t.shape, dtype_of(t), produce(t)) for t in _layout(cfg, hf_config["model_type"])]
    writer = jax.process_index() == 0
    if not writer:  # take part in the gathers, write nothing
        for entry in entries:
            entry[3]()
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp.")
    try:
        groups = _shard_groups(entries, max_shard_bytes)
        if len(groups) == 1:
            _write_safetensors(os.path.join(tmp, "model.safetensors"), groups[0])
        else:
            weight_map = {}
            for i, group in enumerate(groups):
                file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                _write_safetensors(os.path.join(tmp, file), group)
                weight_map.update({name: file for name, *_ in group})
            total = sum(math.prod(s) * dt.itemsize for _, s, dt, _ in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        eos = tokenizer.eos_id
        _write_json(
            os.path.join(tmp, "generation_config.json"),
            {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
        )
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(os.path.join(tmp, "tokenizer_config.json"), _tokenizer_config(tokenizer, cfg.max_len))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is meant to be shared
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


def _write_json(path: str, obj: Any):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
