"""Decoder-only transformer LM in Flax NNX, covering the GPT-2 and Llama families.

One module, switched by `TransformerConfig`, so that Hugging Face checkpoints of GPT-2 (learned positions,
LayerNorm, GELU, biases, tied embeddings) and of Llama / Qwen2 / Mistral (RoPE, RMSNorm, SwiGLU,
grouped-query attention, optional qkv bias, tied or untied head) map onto it parameter for parameter.

Shape suffixes: b batch, t query time, s key time (cache length), d embed, h query heads, k kv heads,
g query heads per kv head, e head_dim, f mlp, v vocab, l layers.

Every parameter is an `nnx.Param` whose metadata `logical_axes` names its dimensions with the logical
axes `vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`; `kdjax.sharding` maps them onto the mesh.
Storing names (not mesh shardings) keeps the model free of any mesh: the same module runs on 1 device,
8 fake CPU devices or a pod, and the mapping lives in the config.

The forward pass is functional with respect to the KV cache: the cache is an explicit pytree argument and
return value (no hidden mutable state), so prefill and decode steps jit and scan like any pure function.
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the decoder LM.  `gpt2()` and `llama()` give the two families' switches."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    positions: str = "rope"  # "rope" | "learned"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    qkv_bias: bool = False  # Qwen2 has it without the other biases.
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; attention softmax and norms always run in float32

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name, value, allowed in (
            ("positions", self.positions, ("rope", "learned")),
            ("norm", self.norm, ("rmsnorm", "layernorm")),
            ("mlp", self.mlp, ("swiglu", "gelu")),
            ("param_dtype", self.param_dtype, tuple(_DTYPES)),
            ("dtype", self.dtype, tuple(_DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"TransformerConfig.{name}={value!r}; expected one of {allowed}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def gpt2(cls, **kw):
        """GPT-2 switches: learned positions, LayerNorm, GELU (tanh), biases everywhere, tied embeddings."""
        defaults = dict(
            positions="learned",
            norm="layernorm",
            mlp="gelu",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            norm_eps=1e-5,
        )
        kw.setdefault("num_kv_heads", kw.get("num_heads"))
        return cls(**{**defaults, **kw})

    @classmethod
    def llama(cls, **kw):
        """Llama switches: RoPE, RMSNorm, SwiGLU, no biases (pass qkv_bias=True for Qwen2)."""
        defaults = dict(
            positions="rope",
            norm="rmsnorm",
            mlp="swiglu",
            qkv_bias=False,
            out_bias=False,
            mlp_bias=False,
            tie_embeddings=False,
            norm_eps=1e-6,
        )
        return cls(**{**defaults, **kw})

    @classmethod
    def from_dict(cls, d):
        """Builds from a plain dict (e.g. a ConfigDict's `.to_dict()`); `family` picks the defaults."""
        d = dict(d)
        family = d.pop("family", None)
        if family is None:
            return cls(**d)
        if family not in ("gpt2", "llama"):
            raise ValueError(f"model family {family!r}; expected 'gpt2' or 'llama'")
        return getattr(cls, family)(**d)

    def num_params(self):
        """Parameter count from the config alone (embeddings included)."""
        abstract = nnx.eval_shape(lambda: Transformer(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _param(rngs, init, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


_normal = jax.nn.initializers.normal
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


class Norm(nnx.Module):
    """LayerNorm (scale and bias, mean removed) or RMSNorm (scale only), computed in float32."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pdt = _DTYPES[cfg.param_dtype]
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, _DTYPES[cfg.dtype]
        self.scale = _param(rngs, _ones, (cfg.embed_dim,), ("embed",), pdt)
        self.bias = (
            _param(rngs, _zeros, (cfg.embed_dim,), ("embed",), pdt) if cfg.norm == "layernorm" else None
        )

    def __call__(self, x_btd):
        x = x_btd.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


def rope(x_bthe, positions_bt, theta):
    """Rotary embedding in the Hugging Face "rotate half" layout: pairs (i, i + E/2) rotate by pos·θ^(-2i/E).

    Using HF's layout (rather than interleaved pairs) lets Llama q/k weights load without permutation.
    """
    half = x_bthe.shape[-1] // 2
    inv_freq_e = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_bte = positions_bt[..., None].astype(jnp.float32) * inv_freq_e
    cos, sin = jnp.cos(angle_bte)[:, :, None, :], jnp.sin(angle_bte)[:, :, None, :]
    x = x_bthe.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthe.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads and an optional functional KV cache."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pdt, d, h, k, e = (
            _DTYPES[cfg.param_dtype],
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        std = 0.02
        self.cfg = cfg
        self.wq = _param(rngs, _normal(std), (d, h, e), ("embed", "heads", "head_dim"), pdt)
        self.wk = _param(rngs, _normal(std), (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = _param(rngs, _normal(std), (d, k, e), ("embed", "kv_heads", "head_dim"), pdt)
        # GPT-2 style scaled init of residual projections keeps the residual stream's variance flat in depth.
        self.wo = _param(
            rngs, _normal(std / math.sqrt(2 * cfg.num_layers)), (h, e, d), ("heads", "head_dim", "embed"), pdt
        )
        if cfg.qkv_bias:
            self.bq = _param(rngs, _zeros, (h, e), ("heads", "head_dim"), pdt)
            self.bk = _param(rngs, _zeros, (k, e), ("kv_heads", "head_dim"), pdt)
            self.bv = _param(rngs, _zeros, (k, e), ("kv_heads", "head_dim"), pdt)
        self.bo = _param(rngs, _zeros, (d,), ("embed",), pdt) if cfg.out_bias else None

    def __call__(self, x_btd, positions_bt, cache=None, cache_index=None):
        """Returns (y_btd, new_cache).  Without a cache, attends causally within x.

        With `cache={'k': [B,S,K,E], 'v': [B,S,K,E]}` the new keys/values are written at
        [cache_index, cache_index + T) (`cache_index` a scalar, or [B] with one offset per row) and queries
        attend to every cache slot <= their own position (`positions_bt`, the slot they are written to).
        """
        cfg, dt = self.cfg, _DTYPES[self.cfg.dtype]
        x = x_btd.astype(dt)
        q = jnp.einsum("btd,dhe->bthe", x, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dke->btke", x, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dke->btke", x, self.wv[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if cfg.positions == "rope":
            q, k = rope(q, positions_bt, cfg.rope_theta), rope(k, positions_bt, cfg.rope_theta)
        if cache is None:
            keys, values, key_pos_bs = k, v, positions_bt
            new_cache = None
        else:
            keys, values = _write_cache(cache["k"], k, cache_index), _write_cache(cache["v"], v, cache_index)
            new_cache = {"k": keys, "v": values}
            s = keys.shape[1]
            # Slots past a row's write head hold zeros or stale entries (e.g. tokens a speculative decoder
            # rejected: rolling back is resetting the row's length); the causal test below excludes them.
            key_pos_bs = jnp.broadcast_to(jnp.arange(s), (x.shape[0], s))
            keys, values = keys.astype(dt), values.astype(dt)
        b, t, h, e = q.shape
        g = h // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, g, e)
        scores = jnp.einsum("btkge,bske->bkgts", q, keys).astype(jnp.float32) / math.sqrt(e)
        allowed_bts = key_pos_bs[:, None, :] <= positions_bt[:, :, None]
        scores = jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bske->btkge", probs, values).reshape(b, t, h, e)
        y = jnp.einsum("bthe,hed->btd", out, self.wo[...].astype(dt))
        if self.bo is not None:
            y = y + self.bo[...].astype(dt)
        return y, new_cache


def _write_cache(cache_bske, new_btke, index):
    """Writes T new entries at slots [index, index + T) of each row; `index` is a scalar or [B] per-row offsets."""
    new_btke = new_btke.astype(cache_bske.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache_bske, new_btke, index, axis=1)
    write_row = lambda c_ske, n_tke, i: jax.lax.dynamic_update_slice_in_dim(c_ske, n_tke, i, axis=0)
    return jax.vmap(write_row)(cache_bske, new_btke, index)


class MLP(nnx.Module):
    """GELU MLP (GPT-2, tanh approximation) or SwiGLU (Llama): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pdt, d, f = _DTYPES[cfg.param_dtype], cfg.embed_dim, cfg.mlp_dim
        self.cfg = cfg
        self.w_up = _param(rngs, _normal(0.02), (d, f), ("embed", "mlp"), pdt)
        if cfg.mlp == "swiglu":
            self.w_gate = _param(rngs, _normal(0.02), (d, f), ("embed", "mlp"), pdt)
        self.w_down = _param(
            rngs, _normal(0.02 / math.sqrt(2 * cfg.num_layers)), (f, d), ("mlp", "embed"), pdt
        )
        if cfg.mlp_bias:
            self.b_up = _param(rngs, _zeros, (f,), ("mlp",), pdt)
            self.b_down = _param(rngs, _zeros, (d,), ("embed",), pdt)

    def __call__(self, x_btd):
        cfg, dt = self.cfg, _DTYPES[self.cfg.dtype]
        x = x_btd.astype(dt)
        up = x @ self.w_up[...].astype(dt)
        if cfg.mlp_bias:
            up = up + self.b_up[...].astype(dt)
        if cfg.mlp == "swiglu":
            hidden = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True)
        y = hidden @ self.w_down[...].astype(dt)
        if cfg.mlp_bias:
            y = y + self.b_down[...].astype(dt)
        return y


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, cache=None, cache_index=None):
        y, new_cache = self.attn(self.attn_norm(x_btd), positions_bt, cache, cache_index)
        x_btd = x_btd + y
        return x_btd + self.mlp(self.mlp_norm(x_btd)), new_cache


class Transformer(nnx.Module):
    """Decoder-only LM: `model(tokens_bt) -> logits_btv`.

    `return_hidden=True` also returns the residual stream after every block, a list of L arrays [B, T, D]
    (the inputs of feature-distillation losses).  `forward_cached` is the KV-cache path used by the sampler.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pdt, d, v = _DTYPES[cfg.param_dtype], cfg.embed_dim, cfg.vocab_size
        self.cfg = cfg
        self.embed = _param(rngs, _normal(0.02), (v, d), ("vocab", "embed"), pdt)
        self.pos_embed = (
            _param(rngs, _normal(0.01), (cfg.max_len, d), (None, "embed"), pdt)
            if cfg.positions == "learned"
            else None
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _param(rngs, _normal(0.02), (d, v), ("embed", "vocab"), pdt)
        )

    def _embed(self, tokens_bt, positions_bt):
        dt = _DTYPES[self.cfg.dtype]
        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dt)
        return x

    def _logits(self, x_btd):
        dt = _DTYPES[self.cfg.dtype]
        x = self.final_norm(x_btd)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt))
        return x @ self.lm_head[...].astype(dt)

    def _blocks(self, tokens_bt, positions_bt):
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x = self._embed(tokens_bt, positions_bt)
        hidden = []
        for block in self.blocks:
            x, _ = block(x, positions_bt)
            hidden.append(x)
        return x, hidden

    def __call__(self, tokens_bt, *, positions_bt=None, return_hidden=False):
        x, hidden = self._blocks(tokens_bt, positions_bt)
        logits_btv = self._logits(x)
        return (logits_btv, hidden) if return_hidden else logits_btv

    def final_hidden(self, tokens_bt, *, positions_bt=None):
        """The final-normed hidden states [B, T, D]: what the unembedding turns into logits.  A fused
        chunked head (`kdjax.fused_head`) starts here, so no [B, T, V] logits are ever built."""
        x, _ = self._blocks(tokens_bt, positions_bt)
        return self.final_norm(x)

    def unembedding(self):
        """(w, layout): `lm_head` [D, V] as "dv", or the tied `embed` table [V, D] as "vd" (no transposed
        copy), in the compute dtype; logits = final_hidden @ w (or @ w.T)."""
        dt = _DTYPES[self.cfg.dtype]
        if self.lm_head is None:
            return self.embed[...].astype(dt), "vd"
        return self.lm_head[...].astype(dt), "dv"

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Any = None):
        """Empty KV cache: a list over layers of {'k','v': [B, S, K, E]}."""
        cfg = self.cfg
        max_len = max_len or cfg.max_len
        dtype = dtype or _DTYPES[cfg.dtype]
        shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]

    def forward_cached(self, tokens_bt, cache, cache_index):
        """Runs T new tokens at positions [cache_index, cache_index + T) against the cache.

        `cache_index` is a scalar (every row at the same length) or an int [B] array (row b writes its T keys
        and values at its own offset cache_index[b], its positions are cache_index[b] + arange(T), and its
        queries see only its slots <= their position).  Prefill is this call with the prompt and
        cache_index=0; decoding is this call with T=1.  Rolling a row back (speculative decoding's rejected
        tokens) is calling again with a smaller index: stale slots past it are masked, then overwritten.
        Returns (logits_btv, new_cache).  Slots beyond `cache`'s length are an error of the caller (the write
        would be clamped); positions >= max_len only occur for scratch tokens whose outputs a caller discards,
        and reuse the last learned position instead of reading past the table (which gives NaN).
        """
        t = tokens_bt.shape[1]
        cache_index = jnp.asarray(cache_index, jnp.int32)
        positions_bt = jnp.broadcast_to(cache_index[..., None] + jnp.arange(t), tokens_bt.shape)
        x = self._embed(tokens_bt, jnp.minimum(positions_bt, self.cfg.max_len - 1))
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, positions_bt, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache
