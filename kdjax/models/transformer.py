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

Layers: `scan_layers=False` keeps one `Block` per layer (`blocks/0/...`, `blocks/1/...`, the Hugging Face
order); `scan_layers=True` stores one `Block` whose parameters are stacked on a leading [L] axis (logical axis
`layers`) and runs it under `jax.lax.scan`, so the step compiles one block whatever the depth.  Both give the
same function of the same numbers: `to_scanned` / `to_unscanned` convert parameters (or a whole train state)
between the two, and a scanned model's initial parameters are exactly `to_scanned` of the unscanned model's.
`remat_policy` recomputes each block's activations in the backward pass (`jax.checkpoint`) instead of keeping
them: "full" keeps only the block inputs, the dots_* policies also keep matmul outputs, "offload" moves them
to host memory (backends with a pinned host memory space).

Activations carry logical names too (`activation_batch`, `activation_length`, `activation_embed`,
`activation_heads`, `activation_kv_heads`, `activation_head_dim`, `activation_mlp`, `activation_vocab`):
`partitioning.constrain` turns them into sharding constraints when the caller traces the step under
`kdjax.sharding.with_activation_sharding` (and is the identity otherwise).
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.partitioning import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a block keeps for the backward pass: everything ("none": no rematerialisation), only its input
# ("full"), its matmul outputs ("dots_saveable"), its matmul outputs without batch dimensions (the
# projections, not attention's QK^T / PV: "dots_with_no_batch_dims_saveable"), or those moved to pinned host
# memory ("offload").
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")

# Logical names of activation dimensions (see the module docstring).
BTD = ("activation_batch", "activation_length", "activation_embed")
BTHE = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKE = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
BTF = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")


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
    scan_layers: bool = False  # one Block with [L]-stacked params under lax.scan (compile time flat in depth)
    remat_policy: str = "none"  # see REMAT_POLICIES: what each block keeps for the backward pass

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
            ("remat_policy", self.remat_policy, REMAT_POLICIES),
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

    def __call__(self, x_btd, positions_bt, cache=None, cache_index=None, layer=None):
        """Returns (y_btd, new_cache).  Without a cache, attends causally within x.

        With `cache={'k': [B,S,K,E], 'v': [B,S,K,E]}` the new keys/values are written at
        [cache_index, cache_index + T) (`cache_index` a scalar, or [B] with one offset per row) and queries
        attend to every cache slot <= their own position (`positions_bt`, the slot they are written to).
        With `layer` (a traced int: the scanned model's layer), the cache is the whole model's,
        [B, L, S, K, E], and only layer `layer`'s slots are written and read.
        """
        cfg, dt = self.cfg, _DTYPES[self.cfg.dtype]
        x = x_btd.astype(dt)
        q = constrain(_project_in(x, self.wq[...].astype(dt)), BTHE)
        k = constrain(_project_in(x, self.wk[...].astype(dt)), BTKE)
        v = constrain(_project_in(x, self.wv[...].astype(dt)), BTKE)
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if cfg.positions == "rope":
            q, k = rope(q, positions_bt, cfg.rope_theta), rope(k, positions_bt, cfg.rope_theta)
        if cache is None:
            keys, values, key_pos_bs = k, v, positions_bt
            new_cache = None
        else:
            new_cache = {"k": _write_cache(cache["k"], k, cache_index, layer),
                         "v": _write_cache(cache["v"], v, cache_index, layer)}
            keys, values = _read_cache(new_cache["k"], layer), _read_cache(new_cache["v"], layer)
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
        out = constrain(out, BTHE)
        # [B, T, H*E] @ [H*E, D]: both reshapes are free (row-major), and a plain matmul lets XLA use wo as it
        # is stored; the einsum "bthe,hed->btd" made it transpose a copy of wo on every forward.
        y = out.reshape(b, t, h * e) @ self.wo[...].astype(dt).reshape(h * e, -1)
        if self.bo is not None:
            y = y + self.bo[...].astype(dt)
        return constrain(y, BTD), new_cache


def _project_in(x_btd, w_dhe):
    """x @ w as [B, T, D] @ [D, H*E] -> [B, T, H, E].  Same value as einsum("btd,dhe->bthe"); the reshapes are
    free and the plain matmul spares XLA the transposed copies of w and of the gradients it made for the
    einsum in the backward pass (seen in the compiled HLO)."""
    d, h, e = w_dhe.shape
    return (x_btd @ w_dhe.reshape(d, h * e)).reshape(*x_btd.shape[:-1], h, e)


def _write_cache(cache, new_btke, index, layer=None):
    """Writes T new entries at slots [index, index + T) of each row; `index` is a scalar or [B] per-row offsets.

    cache: [B, S, K, E], or [B, L, S, K, E] with `layer` (then only that layer's slots are written)."""
    new_btke = new_btke.astype(cache.dtype)
    if layer is not None:  # one layer of the stacked cache: write [B, 1, T, K, E] at (0, layer, index, 0, 0)
        new_btke = new_btke[:, None]
    zero = jnp.zeros((), jnp.int32)
    lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new_btke, (zero, *lead, index, zero, zero))
    write_row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (*lead, i, zero, zero))
    return jax.vmap(write_row)(cache, new_btke, index)


def _read_cache(cache, layer):
    """[B, S, K, E]: the cache itself, or layer `layer` of a stacked [B, L, S, K, E] cache."""
    if layer is None:
        return cache
    return jax.lax.dynamic_index_in_dim(cache, layer, axis=1, keepdims=False)


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
        hidden = constrain(hidden, BTF)
        y = hidden @ self.w_down[...].astype(dt)
        if cfg.mlp_bias:
            y = y + self.b_down[...].astype(dt)
        return constrain(y, BTD)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, cache=None, cache_index=None, layer=None):
        y, new_cache = self.attn(self.attn_norm(x_btd), positions_bt, cache, cache_index, layer)
        x_btd = constrain(x_btd + y, BTD)
        return constrain(x_btd + self.mlp(self.mlp_norm(x_btd)), BTD), new_cache


class Transformer(nnx.Module):
    """Decoder-only LM: `model(tokens_bt) -> logits_btv`.

    `return_hidden=True` also returns the residual stream after every block, a list of L arrays [B, T, D]
    (the inputs of feature-distillation losses).  `forward_cached` is the KV-cache path used by the sampler.
    With `cfg.scan_layers`, `blocks` is one `Block` whose parameters have a leading [L] axis.
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
        # The same draws in both layouts (same order from the same Rngs), so that a scanned model's initial
        # parameters are the unscanned model's, stacked.
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        self.blocks = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = Norm(cfg, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _param(rngs, _normal(0.02), (d, v), ("embed", "vocab"), pdt)
        )

    def _embed(self, tokens_bt, positions_bt):
        dt = _DTYPES[self.cfg.dtype]
        # The table's model dimension gathered first (as FSDP gathers a layer's weights): a lookup from rows
        # split on `embed` into a batch-split output, or its scatter-add gradient, is a resharding GSPMD
        # cannot do efficiently ("Involuntary full rematerialization").  The vocabulary split stays.
        table_vd = constrain(self.embed[...], ("vocab", "activation_embed"))
        x = jnp.take(table_vd, tokens_bt, axis=0).astype(dt)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dt)
        return constrain(x, BTD)

    def _logits(self, x_btd):
        dt = _DTYPES[self.cfg.dtype]
        x = self.final_norm(x_btd)
        if self.lm_head is None:
            return constrain(jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt)), BTV)
        return constrain(x @ self.lm_head[...].astype(dt), BTV)

    def _blocks(self, tokens_bt, positions_bt, collect=True):
        """(final residual stream [B, T, D], list of every block's output, or [] without `collect`)."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x = self._embed(tokens_bt, positions_bt)
        apply = _remat(self.cfg.remat_policy, self.cfg.scan_layers)
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, layer_state):
                x = apply(graphdef, positions_bt, layer_state, x)
                return x, (x if collect else None)

            x, stacked = jax.lax.scan(body, x, state)
            return x, ([stacked[i] for i in range(self.cfg.num_layers)] if collect else [])
        hidden = []
        for block in self.blocks:
            graphdef, state = nnx.split(block)
            x = apply(graphdef, positions_bt, state, x)
            hidden.append(x)
        return x, (hidden if collect else [])

    def __call__(self, tokens_bt, *, positions_bt=None, return_hidden=False):
        x, hidden = self._blocks(tokens_bt, positions_bt, collect=return_hidden)
        logits_btv = self._logits(x)
        return (logits_btv, hidden) if return_hidden else logits_btv

    def final_hidden(self, tokens_bt, *, positions_bt=None):
        """The final-normed hidden states [B, T, D]: what the unembedding turns into logits.  A fused
        chunked head (`kdjax.fused_head`) starts here, so no [B, T, V] logits are ever built."""
        x, _ = self._blocks(tokens_bt, positions_bt, collect=False)
        return constrain(self.final_norm(x), BTD)

    def unembedding(self):
        """(w, layout): `lm_head` [D, V] as "dv", or the tied `embed` table [V, D] as "vd" (no transposed
        copy), in the compute dtype; logits = final_hidden @ w (or @ w.T)."""
        dt = _DTYPES[self.cfg.dtype]
        if self.lm_head is None:
            return self.embed[...].astype(dt), "vd"
        return self.lm_head[...].astype(dt), "dv"

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Any = None):
        """Empty KV cache.  Unscanned: a list over layers of {'k','v': [B, S, K, E]}; scanned: one
        {'k','v': [B, L, S, K, E]}.  Either way every leaf has the batch on axis 0 (callers may concatenate
        or slice caches along it) and is otherwise opaque: pass it back to `forward_cached`."""
        cfg = self.cfg
        max_len = max_len or cfg.max_len
        dtype = dtype or _DTYPES[cfg.dtype]
        shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        if cfg.scan_layers:
            shape = (batch_size, cfg.num_layers, *shape[1:])
            return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
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
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(carry, xs):
                x, cache = carry
                layer_state, layer = xs
                return nnx.merge(graphdef, layer_state)(x, positions_bt, cache, cache_index, layer), None

            layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
            (x, new_cache), _ = jax.lax.scan(body, (x, cache), (state, layers))
            return self._logits(x), new_cache
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, positions_bt, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache


def _apply_block(graphdef, positions_bt, state, x_btd):
    """One block as a pure function of its parameters (what `jax.checkpoint` and `lax.scan` take)."""
    return nnx.merge(graphdef, state)(x_btd, positions_bt)[0]


def checkpoint_policy(name: str):
    """The `jax.checkpoint` policy of a `REMAT_POLICIES` name ("none" has none: nothing is recomputed)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "dots_saveable":
        return policies.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        if "pinned_host" not in {m.kind for m in jax.devices()[0].addressable_memories()}:
            raise ValueError(f"remat_policy='offload' needs a pinned_host memory space; the {jax.default_backend()} "
                             "backend has none: use 'dots_with_no_batch_dims_saveable' or 'full'")
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat_policy={name!r}; expected one of {REMAT_POLICIES}")


def _remat(name, scanned):
    """`_apply_block`, rematerialised under the named policy (the block's input is always kept)."""
    if name == "none":
        return _apply_block
    # Under scan each iteration is its own region, so CSE across layers cannot undo the remat.
    return jax.checkpoint(_apply_block, policy=checkpoint_policy(name), prevent_cse=not scanned,
                          static_argnums=(0,))


# --------------------------------------------------------------------------------------------------------
# Scanned <-> unscanned parameters.


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def _stack_variables(*variables):
    """One Variable holding the layers' values stacked on a new leading axis named `layers`."""
    first = variables[0]
    axes = first.get_metadata().get("logical_axes")
    value = jnp.stack([v.get_value() for v in variables])
    return first.replace(value, logical_axes=None if axes is None else ("layers", *axes))


def _stack_blocks(blocks):
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(block) for block in blocks]
    return nnx.merge(graphdef, jax.tree.map(_stack_variables, *states, is_leaf=_is_variable))


def _layer_variable(variable, i):
    axes = variable.get_metadata().get("logical_axes")
    return variable.replace(variable.get_value()[i], logical_axes=None if axes is None else tuple(axes[1:]))


def _is_per_layer(path):
    return len(path) > 1 and path[0] == "blocks" and isinstance(path[1], int)


def _state_to_scanned(state):
    flat = list(nnx.to_flat_state(state))
    per_layer = [(p, v) for p, v in flat if _is_per_layer(p)]
    if not per_layer:
        raise ValueError("no per-layer parameters (blocks/0/...) to stack: is it scanned already?")
    groups = {}
    for path, var in per_layer:
        groups.setdefault(path[2:], {})[path[1]] = var
    stacked = []
    for rest, by_layer in groups.items():
        if sorted(by_layer) != list(range(len(by_layer))):
            raise ValueError(f"blocks/*/{'/'.join(map(str, rest))}: layers {sorted(by_layer)} are not 0..L-1")
        stacked.append((("blocks", *rest), _stack_variables(*(by_layer[i] for i in range(len(by_layer))))))
    return nnx.from_flat_state([(p, v) for p, v in flat if not _is_per_layer(p)] + stacked)


def _state_to_unscanned(state):
    flat = list(nnx.to_flat_state(state))
    stacked = [(p, v) for p, v in flat if p and p[0] == "blocks" and not _is_per_layer(p)]
    if not stacked:
        raise ValueError("no stacked parameters (blocks/<name> with a leading [L] axis) to split: is it "
                         "unscanned already?")
    num_layers = stacked[0][1].get_value().shape[0]
    out = [(p, v) for p, v in flat if not (p and p[0] == "blocks")]
    for i in range(num_layers):
        out += [(("blocks", i, *p[1:]), _layer_variable(v, i)) for p, v in stacked]
    return nnx.from_flat_state(out)


def _convert(tree, convert_state):
    def one(x):
        return convert_state(x) if isinstance(x, nnx.State) and "blocks" in x else x

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.State))


def to_scanned(tree):
    """Unscanned -> scanned layout: every `nnx.State` in `tree` with per-layer entries blocks/i/<name>
    (params, or a whole TrainState: params and the optimizer moments that mirror them) gets one entry
    blocks/<name> = stack over i (a new leading [L] axis, logical name `layers`).  Works on arrays and on
    abstract ShapeDtypeStructs.  `Transformer(dataclasses.replace(cfg, scan_layers=True))` has this layout;
    take its graphdef from `nnx.eval_shape`.  Raises ValueError on a state that is scanned already.
    The stacked copy is a second copy of the block parameters until the input is freed."""
    return _convert(tree, _state_to_scanned)


def to_unscanned(tree):
    """Scanned -> unscanned layout, the inverse of `to_scanned`: blocks/<name> [L, ...] becomes blocks/i/<name>."""
    return _convert(tree, _state_to_unscanned)


def convert_layers(tree, *, scan_layers: bool):
    """`to_scanned(tree)` or `to_unscanned(tree)`, by the layout wanted."""
    return to_scanned(tree) if scan_layers else to_unscanned(tree)
