"""Hugging Face config.json <-> `TransformerConfig`, and which HF family a kdjax config is written as.

Supported `model_type`s: gpt2, llama, qwen2, mistral (`SUPPORTED_MODEL_TYPES`).  Anything the kdjax transformer
cannot compute exactly (RoPE scaling, an active sliding window, other activations, ...) is refused with a
message naming the key, never approximated: a teacher that silently computes something else than its
checkpoint would poison every distillation run that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from kdjax.data.tokenizer import Tokenizer
from kdjax.models.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# transformers' config-class defaults of max_position_embeddings: what a config.json without the key means, and
# the smallest value an export of a RoPE model states (RoPE has no learned table, so nothing in the weights
# bounds the length; see `export_positions`).
ROPE_DEFAULT_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}

# The switches each HF family needs; the remaining ones (biases) are checked per family.
_GPT2_SWITCHES = dict(
    positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True
)
_LLAMA_SWITCHES = dict(positions="rope", norm="rmsnorm", mlp="swiglu", mlp_bias=False)
# (qkv_bias, out_bias) each Llama-family type can hold.  llama's attention_bias puts a bias on q, k, v *and* o,
# so a q/k/v-only model fits it with an all-zero o_proj bias (written by the layout).
_FAMILY_BIASES = {
    "llama": ((False, False), (True, True), (True, False)),
    "qwen2": ((True, False),),
    "mistral": ((False, False),),
}


def unsupported(model_type) -> str:
    return f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"


# ----------------------------------------------------------------------------------------------------------
# HF -> kdjax


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
    return name if name in DTYPE_NAMES else "float32"


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
      max_len: longest sequence the model will see (default: the checkpoint's position limit,
        n_positions / max_position_embeddings).  Only matters for learned positions (must be <= n_positions)
        and sliding windows (must fit the window).
      param_dtype, dtype: "float32" | "bfloat16" | "float16"; default: the checkpoint's `dtype`
        (`torch_dtype` in older files), else float32; `dtype` defaults to `param_dtype`.
    """
    hf = hf_config
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(unsupported(model_type))
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


def _llama_biases(hf, model_type) -> tuple[bool, bool]:
    """(qkv_bias, out_bias) of a Llama-family config."""
    if model_type == "llama":
        if hf.get("mlp_bias", False):
            raise ValueError("llama mlp_bias=True is not supported (kdjax's SwiGLU has no biases)")
        bias = bool(hf.get("attention_bias", False))  # biases on q, k, v and o: exactly qkv_bias + out_bias
        return bias, bias
    if model_type == "qwen2":
        return True, False  # Qwen2 always has q/k/v biases and no o bias.
    return False, False


def _llama_config(hf, model_type, max_len, param_dtype, dtype):
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type} hidden_act={act!r} is not supported; kdjax's SwiGLU uses silu")
    theta = _rope_theta(hf)
    d = hf.get("hidden_size", 4096)
    heads = hf.get("num_attention_heads", 32)
    max_len = max_len or hf.get("max_position_embeddings", ROPE_DEFAULT_POSITIONS[model_type])
    _check_sliding_window(hf, model_type, max_len)
    qkv_bias, out_bias = _llama_biases(hf, model_type)
    return TransformerConfig.llama(
        vocab_size=hf.get("vocab_size", 32000),
        num_layers=hf.get("num_hidden_layers", 32),
        embed_dim=d,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads,
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


# ----------------------------------------------------------------------------------------------------------
# kdjax -> HF


def _fits(cfg: TransformerConfig, switches: dict) -> bool:
    return all(getattr(cfg, k) == v for k, v in switches.items())


def hf_model_types(cfg: TransformerConfig, model_type: Optional[str] = None) -> tuple[str, ...]:
    """The HF families `cfg` can be written as, preferred first; ValueError naming what does not fit.

    Without `model_type`: ("gpt2",) for the GPT-2 switches; for the Llama switches ("qwen2", "llama") when
    the model has q/k/v biases and no output bias (Qwen2's layout; llama holds it with a zero o_proj bias,
    the fallback `save_hf` uses when transformers would not load the tokenizer unchanged under qwen2), else
    ("llama",).  With `model_type`: (model_type,) after checking that it holds `cfg` exactly.
    """
    if model_type not in (None, *SUPPORTED_MODEL_TYPES):
        raise ValueError(unsupported(model_type))
    if _fits(cfg, _GPT2_SWITCHES):
        if model_type not in (None, "gpt2"):
            raise ValueError(f"a GPT-2-style TransformerConfig cannot be written as {model_type}")
        if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.embed_dim:
            raise ValueError(
                "GPT-2 needs num_kv_heads == num_heads and head_dim * num_heads == embed_dim; got "
                f"{cfg.num_kv_heads}, {cfg.num_heads}, {cfg.head_dim}, {cfg.embed_dim}"
            )
        return ("gpt2",)
    if not _fits(cfg, _LLAMA_SWITCHES):
        raise ValueError(
            f"no Hugging Face architecture matches this TransformerConfig: GPT-2 needs {_GPT2_SWITCHES}, the "
            f"Llama family needs {_LLAMA_SWITCHES}; got {dataclasses.asdict(cfg)}"
        )
    biases = (cfg.qkv_bias, cfg.out_bias)
    if biases == (False, True):
        raise ValueError("an output-projection bias without q/k/v biases has no Hugging Face equivalent")
    if model_type is not None:
        if biases not in _FAMILY_BIASES.get(model_type, ()):
            raise ValueError(
                f"this TransformerConfig (qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}) cannot be written "
                f"as {model_type}"
            )
        return (model_type,)
    return ("qwen2", "llama") if biases == (True, False) else ("llama",)


def export_positions(cfg: TransformerConfig, model_type: str, max_positions: Optional[int] = None) -> int:
    """The position limit an export states (n_positions / max_position_embeddings, and model_max_length).

    GPT-2: the learned table's rows, `cfg.max_len` (nothing else is possible).  RoPE: nothing in the weights
    bounds the length, so `max_positions` when given (pass the source checkpoint's max_position_embeddings for
    a model that came from HF), else max(cfg.max_len, the family default `ROPE_DEFAULT_POSITIONS`), never
    the (usually much shorter) training sequence length alone.
    """
    if model_type == "gpt2":
        if max_positions not in (None, cfg.max_len):
            raise ValueError(
                f"max_positions={max_positions}: a GPT-2 model has exactly {cfg.max_len} learned positions"
            )
        return cfg.max_len
    if max_positions is not None:
        if max_positions < 1:
            raise ValueError(f"max_positions={max_positions} must be positive")
        return max_positions
    return max(cfg.max_len, ROPE_DEFAULT_POSITIONS[model_type])


def kdjax_to_hf_config(
    cfg: TransformerConfig,
    tokenizer: Optional[Tokenizer] = None,
    *,
    model_type: Optional[str] = None,
    max_positions: Optional[int] = None,
) -> dict:
    """config.json contents for `cfg`: the first of `hf_model_types(cfg, model_type)` (`save_hf` may write the
    second instead, when transformers would not load the tokenizer unchanged under the first).

    Llama gets attention_bias=True when `cfg` has any attention bias.  bos/eos ids are the tokenizer's EOS
    (kdjax documents are separated by EOS alone).  Dropout is 0: the student was trained without it.  The
    position limit is `export_positions(cfg, model_type, max_positions)`.
    """
    model_type = hf_model_types(cfg, model_type)[0]
    positions = export_positions(cfg, model_type, max_positions)
    common = dict(
        architectures=[ARCHITECTURES[model_type]],
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
            n_positions=positions,
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
        max_position_embeddings=positions,
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
