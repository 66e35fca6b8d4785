"""Which Hugging Face tensor holds which kdjax parameter, and how it is reshaped, per family.

torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` stores [in, out]; kdjax stores [in, heads, head_dim] /
[heads, head_dim, out] / [in, out].  RoPE uses HF's rotate-half layout in both, so Llama q/k weights need no
permutation.  Shape suffixes as in `kdjax/models/transformer.py`.

Every conversion below is a named function of numpy arrays that returns a *view* where it can (reshape,
transpose, slice of a memory map), so slicing its result for one device reads only that slice of the file.
`functools.partial` fixes the dimensions; nothing closes over loop variables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional

import numpy as np

from kdjax.models.transformer import TransformerConfig

# Module prefix of the decoder's tensors in a *ForCausalLM checkpoint; a bare base-model checkpoint
# (GPT2Model, LlamaModel, and the original openai-community/gpt2 upload) has none.
PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model."}
# Non-parameter tensors some checkpoints carry: GPT-2's causal-mask buffers, old Llama's RoPE inverse
# frequencies.  Both are recomputed, so they are skipped; anything else left over is an error.
BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor and the kdjax parameters it holds (three for GPT-2's fused q|k|v, none for a zero bias).

    `parts[i] = (kdjax path, hf array -> kdjax array)`; `to_hf(*kdjax arrays in parts order)` is the inverse,
    used by `save_hf`.
    """

    name: str
    shape: tuple
    parts: tuple
    to_hf: Callable


# ----------------------------------------------------------------------------------------------------------
# Conversions (hf -> kdjax, then the inverse)


def identity(x):
    return x


def transpose(x):
    return x.T


def linear_to_heads(w_hed, *, heads):
    """nn.Linear [H*E, D] (out head-major) -> kdjax [D, H, E]."""
    return w_hed.reshape(heads, -1, w_hed.shape[-1]).transpose(2, 0, 1)


def heads_to_linear(w_dhe):
    """kdjax [D, H, E] -> nn.Linear [H*E, D]."""
    return w_dhe.reshape(w_dhe.shape[0], -1).T


def linear_to_out(w_dhe, *, heads):
    """nn.Linear [D, H*E] -> kdjax [H, E, D]."""
    return w_dhe.reshape(w_dhe.shape[0], heads, -1).transpose(1, 2, 0)


def out_to_linear(w_hed):
    """kdjax [H, E, D] -> nn.Linear [D, H*E]."""
    return w_hed.reshape(-1, w_hed.shape[-1]).T


def split_heads(b, *, heads):
    """[H*E] -> [H, E]."""
    return b.reshape(heads, -1)


def flatten(x):
    return x.reshape(-1)


def conv_qkv_part(w, *, part, heads):
    """GPT-2 c_attn Conv1D [D, 3D] (out = q | k | v, each head-major) -> the part-th of q, k, v as [D, H, E]."""
    d = w.shape[0]
    return w[:, part * d : (part + 1) * d].reshape(d, heads, -1)


def conv_qkv_bias_part(b, *, part, heads):
    """GPT-2 c_attn bias [3D] -> the part-th of bq, bk, bv as [H, E]."""
    d = b.shape[0] // 3
    return b[part * d : (part + 1) * d].reshape(heads, -1)


def qkv_to_conv(*w_dhe):
    """kdjax wq, wk, wv [D, H, E] -> GPT-2 c_attn [D, 3D]."""
    return np.concatenate([w.reshape(w.shape[0], -1) for w in w_dhe], axis=1)


def qkv_bias_to_conv(*b_he):
    """kdjax bq, bk, bv [H, E] -> GPT-2 c_attn bias [3D]."""
    return np.concatenate([b.reshape(-1) for b in b_he])


def conv_to_out(w, *, heads):
    """GPT-2 attn.c_proj Conv1D [H*E, D] -> kdjax [H, E, D]."""
    return w.reshape(heads, -1, w.shape[-1])


def out_to_conv(w_hed):
    """kdjax [H, E, D] -> GPT-2 attn.c_proj [H*E, D]."""
    return w_hed.reshape(-1, w_hed.shape[-1])


def first_rows(w, *, rows):
    """The first `rows` learned positions (a checkpoint may have more than the model uses)."""
    return w[:rows]


def zeros(*, size):
    return np.zeros((size,), np.float32)


def single(name, shape, path, from_hf=identity, to_hf=identity) -> HFTensor:
    return HFTensor(name, tuple(shape), ((path, from_hf),), to_hf)


def model_path(path: tuple, scan_layers: bool) -> tuple:
    """(kdjax parameter path, layer index or None) of a layout part path.

    Layouts name block parameters per layer, ("blocks", i, ...), the unscanned model's paths.  A scanned
    model (`TransformerConfig.scan_layers`) holds them stacked as ("blocks", ...) [L, ...], layer i at
    index i of the leading axis."""
    if scan_layers and len(path) > 1 and path[0] == "blocks" and isinstance(path[1], int):
        return ("blocks", *path[2:]), path[1]
    return path, None


# ----------------------------------------------------------------------------------------------------------
# Layouts


def layout(cfg: TransformerConfig, model_type: str, hf_positions: Optional[int] = None) -> list[HFTensor]:
    """Every HF tensor of `model_type` for `cfg`, with its kdjax parameter(s), in checkpoint order.

    `hf_positions` is GPT-2's n_positions in the checkpoint when it has more learned positions than
    `cfg.max_len` uses.  A llama export of a model with q/k/v biases but no output bias gets an all-zero
    o_proj bias (a tensor with no kdjax part; see `kdjax.hf.config.hf_model_types`).
    """
    if model_type == "gpt2":
        tensors = _gpt2_layout(cfg, hf_positions)
    else:
        tensors = _llama_layout(cfg, model_type)
    if not cfg.tie_embeddings:
        v, d = cfg.vocab_size, cfg.embed_dim
        tensors.append(single("lm_head.weight", (v, d), ("lm_head",), transpose, transpose))
    return tensors


def _gpt2_layout(cfg, hf_positions):
    p, d, v = PREFIX["gpt2"], cfg.embed_dim, cfg.vocab_size
    n_pos = hf_positions or cfg.max_len
    tensors = [
        single(p + "wte.weight", (v, d), ("embed",)),
        single(p + "wpe.weight", (n_pos, d), ("pos_embed",), functools.partial(first_rows, rows=cfg.max_len)),
    ]
    for i in range(cfg.num_layers):
        tensors += _gpt2_block(cfg, f"{p}h.{i}.", ("blocks", i))
    return tensors + [
        single(p + "ln_f.weight", (d,), ("final_norm", "scale")),
        single(p + "ln_f.bias", (d,), ("final_norm", "bias")),
    ]


def _gpt2_block(cfg, b, blk):
    d, h, f = cfg.embed_dim, cfg.num_heads, cfg.mlp_dim
    attn, mlp = blk + ("attn",), blk + ("mlp",)
    qkv = tuple(
        (attn + (n,), functools.partial(conv_qkv_part, part=j, heads=h))
        for j, n in enumerate(("wq", "wk", "wv"))
    )
    qkv_bias = tuple(
        (attn + (n,), functools.partial(conv_qkv_bias_part, part=j, heads=h))
        for j, n in enumerate(("bq", "bk", "bv"))
    )
    to_out = functools.partial(conv_to_out, heads=h)
    return [
        single(b + "ln_1.weight", (d,), blk + ("attn_norm", "scale")),
        single(b + "ln_1.bias", (d,), blk + ("attn_norm", "bias")),
        HFTensor(b + "attn.c_attn.weight", (d, 3 * d), qkv, qkv_to_conv),
        HFTensor(b + "attn.c_attn.bias", (3 * d,), qkv_bias, qkv_bias_to_conv),
        single(b + "attn.c_proj.weight", (d, d), attn + ("wo",), to_out, out_to_conv),
        single(b + "attn.c_proj.bias", (d,), attn + ("bo",)),
        single(b + "ln_2.weight", (d,), blk + ("mlp_norm", "scale")),
        single(b + "ln_2.bias", (d,), blk + ("mlp_norm", "bias")),
        single(b + "mlp.c_fc.weight", (d, f), mlp + ("w_up",)),
        single(b + "mlp.c_fc.bias", (f,), mlp + ("b_up",)),
        single(b + "mlp.c_proj.weight", (f, d), mlp + ("w_down",)),
        single(b + "mlp.c_proj.bias", (d,), mlp + ("b_down",)),
    ]


def _llama_layout(cfg, model_type):
    p, d, v = PREFIX[model_type], cfg.embed_dim, cfg.vocab_size
    tensors = [single(p + "embed_tokens.weight", (v, d), ("embed",))]
    for i in range(cfg.num_layers):
        tensors += _llama_block(cfg, model_type, f"{p}layers.{i}.", ("blocks", i))
    return tensors + [single(p + "norm.weight", (d,), ("final_norm", "scale"))]


def _llama_block(cfg, model_type, b, blk):
    d, h, k, e, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    a, attn, mlp = b + "self_attn.", blk + ("attn",), blk + ("mlp",)
    tensors = [single(b + "input_layernorm.weight", (d,), blk + ("attn_norm", "scale"))]
    for n, heads in (("q", h), ("k", k), ("v", k)):
        to_heads = functools.partial(linear_to_heads, heads=heads)
        shape = (heads * e, d)
        tensors.append(single(a + f"{n}_proj.weight", shape, attn + (f"w{n}",), to_heads, heads_to_linear))
    to_out = functools.partial(linear_to_out, heads=h)
    tensors.append(single(a + "o_proj.weight", (d, h * e), attn + ("wo",), to_out, out_to_linear))
    if cfg.qkv_bias:
        for n, heads in (("q", h), ("k", k), ("v", k)):
            to_heads = functools.partial(split_heads, heads=heads)
            tensors.append(single(a + f"{n}_proj.bias", (heads * e,), attn + (f"b{n}",), to_heads, flatten))
    if cfg.out_bias:
        tensors.append(single(a + "o_proj.bias", (d,), attn + ("bo",)))
    elif cfg.qkv_bias and model_type == "llama":  # attention_bias covers o too: it must be there, as zeros
        tensors.append(HFTensor(a + "o_proj.bias", (d,), (), functools.partial(zeros, size=d)))
    return tensors + [
        single(b + "post_attention_layernorm.weight", (d,), blk + ("mlp_norm", "scale")),
        single(b + "mlp.gate_proj.weight", (f, d), mlp + ("w_gate",), transpose, transpose),
        single(b + "mlp.up_proj.weight", (f, d), mlp + ("w_up",), transpose, transpose),
        single(b + "mlp.down_proj.weight", (d, f), mlp + ("w_down",), transpose, transpose),
    ]
