"""Class-conditional diffusion denoisers in Flax NNX: a residual MLP (2-D points, or flattened images)
and a small convolutional residual net (H x W x C images).

    model(z_b..., logsnr_b, labels_b, w_b=None) -> output_b...   (in `cfg.prediction`: "x", "eps" or "v")

Conditioning: Fourier features of the log-SNR (scaled by 1 / 20, the schedule's bound) go through a
two-layer MLP into the time embedding; with `cfg.guidance_embed` the guidance weight w enters as Fourier
features of w / w_scale projected and ADDED to the time embedding's input (Meng et al. 2023); the class
embedding (num_classes + 1 rows, the last one the null class of classifier-free guidance) is added to it.
Each residual block is adaLN-style: a parameter-free layer norm, then a per-block scale and shift from the
conditioning vector, then the block's MLP (or two 3x3 convolutions).

Every parameter is an `nnx.Param` with `logical_axes` metadata (`embed` for the residual width, `mlp`
for the hidden width, `vocab` for the class table's rows, None where a dimension is tiny), which
`kdjax.sharding` maps onto the mesh.  Shape suffixes: b batch, d width, f hidden, c channels, h w pixels.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_normal = jax.nn.initializers.normal
_zeros = jax.nn.initializers.zeros
# lambda in [-20, 20] -> [-1, 1] before the Fourier features, so one frequency set covers the range.
_LOGSNR_SCALE = 20.0


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of a conditional denoiser.

    data_shape: one example's shape, (2,) for points or (H, W, C) for images.
    num_classes: real classes; label `num_classes` is the null class (unconditional).
    arch: "mlp" (residual MLP on the flattened example) or "conv" (3x3 conv residual net, images only).
    width / hidden: residual width d and block hidden width f (conv: channels d and f).
    guidance_embed: whether the model takes w (guided-distillation students); w_scale divides w first.
    prediction: what the output means ("v" is stable at both ends of the schedule).
    """

    data_shape: tuple
    num_classes: int
    arch: str = "mlp"
    width: int = 256
    hidden: int = 512
    num_blocks: int = 4
    fourier_features: int = 32
    guidance_embed: bool = False
    w_scale: float = 4.0
    prediction: str = "v"
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        for name, value, allowed in (
            ("arch", self.arch, ("mlp", "conv")),
            ("prediction", self.prediction, ("x", "eps", "v")),
            ("param_dtype", self.param_dtype, tuple(_DTYPES)),
            ("dtype", self.dtype, tuple(_DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"DenoiserConfig.{name}={value!r}; expected one of {allowed}")
        if self.arch == "conv" and len(self.data_shape) != 3:
            raise ValueError(f"arch 'conv' needs (H, W, C) images, got data_shape {self.data_shape}")
        if self.num_classes < 1 or self.fourier_features % 2 or self.num_blocks < 1:
            raise ValueError(
                f"need num_classes >= 1, an even fourier_features and num_blocks >= 1; got {self}"
            )

    @property
    def null_class(self) -> int:
        return self.num_classes

    def num_params(self) -> int:
        abstract = nnx.eval_shape(lambda: Denoiser(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _param(rngs, init, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _dense_init(fan_in):
    return _normal(1.0 / math.sqrt(fan_in))


def fourier_features(u_b, num: int):
    """[sin(pi f_k u), cos(pi f_k u)] with f_k log-spaced in [1, 64]: [b] -> [b, num] float32."""
    freqs = jnp.exp(jnp.linspace(0.0, math.log(64.0), num // 2))
    angle = math.pi * jnp.asarray(u_b, jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def _layer_norm(x, eps=1e-6):
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class Conditioning(nnx.Module):
    """(logsnr_b, labels_b, w_b) -> conditioning vector [b, d]."""

    def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
        pdt, d, ff = _DTYPES[cfg.param_dtype], cfg.width, cfg.fourier_features
        self.cfg = cfg
        self.w_time = _param(rngs, _dense_init(ff), (ff, d), (None, "embed"), pdt)
        self.b_time = _param(rngs, _zeros, (d,), ("embed",), pdt)
        if cfg.guidance_embed:
            # Zero: a student initialised from an unguided teacher starts as that teacher, whatever w is.
            self.w_guidance = _param(rngs, _zeros, (ff, d), (None, "embed"), pdt)
        self.w_mix = _param(rngs, _dense_init(d), (d, d), ("embed", None), pdt)
        self.b_mix = _param(rngs, _zeros, (d,), (None,), pdt)
        self.classes = _param(rngs, _normal(1.0), (cfg.num_classes + 1, d), ("vocab", None), pdt)

    def __call__(self, logsnr_b, labels_b, w_b=None):
        cfg = self.cfg
        if cfg.guidance_embed and w_b is None:
            raise ValueError("this denoiser takes a guidance weight w (guidance_embed=True); pass w_b")
        if not cfg.guidance_embed and w_b is not None:
            raise ValueError("this denoiser has no guidance input (guidance_embed=False); got w_b")
        b = labels_b.shape[0]
        logsnr_b = jnp.broadcast_to(jnp.asarray(logsnr_b, jnp.float32), (b,))
        h = fourier_features(logsnr_b / _LOGSNR_SCALE, cfg.fourier_features) @ self.w_time[...]
        if cfg.guidance_embed:
            w_b = jnp.broadcast_to(jnp.asarray(w_b, jnp.float32), (b,))
            h = h + fourier_features(w_b / cfg.w_scale, cfg.fourier_features) @ self.w_guidance[...]
        h = jax.nn.silu(h + self.b_time[...]) @ self.w_mix[...] + self.b_mix[...]
        return h + jnp.take(self.classes[...], labels_b, axis=0)


class MLPBlock(nnx.Module):
    """x + W_out silu(W_in (LN(x) (1 + scale) + shift)), (scale, shift) = W_c silu(cond)."""

    def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
        pdt, d, f = _DTYPES[cfg.param_dtype], cfg.width, cfg.hidden
        self.dtype = _DTYPES[cfg.dtype]
        self.w_cond = _param(rngs, _zeros, (d, 2 * d), (None, "embed"), pdt)
        self.b_cond = _param(rngs, _zeros, (2 * d,), ("embed",), pdt)
        self.w_in = _param(rngs, _dense_init(d), (d, f), ("embed", "mlp"), pdt)
        self.b_in = _param(rngs, _zeros, (f,), ("mlp",), pdt)
        self.w_out = _param(rngs, _dense_init(f * cfg.num_blocks), (f, d), ("mlp", "embed"), pdt)
        self.b_out = _param(rngs, _zeros, (d,), ("embed",), pdt)

    def __call__(self, x_bd, cond_bd):
        dt = self.dtype
        scale, shift = jnp.split(jax.nn.silu(cond_bd) @ self.w_cond[...] + self.b_cond[...], 2, axis=-1)
        h = _layer_norm(x_bd) * (1.0 + scale) + shift
        h = jax.nn.silu(h.astype(dt) @ self.w_in[...].astype(dt) + self.b_in[...].astype(dt))
        return x_bd + (h @ self.w_out[...].astype(dt) + self.b_out[...].astype(dt)).astype(x_bd.dtype)


def _conv(x_bhwc, kernel_hwio):
    """3x3 'SAME' convolution (cross-correlation, stride 1) as one matmul over the 9 shifted copies (im2col).

    Why not `lax.conv_general_dilated`: on CPU, XLA compiles these tiny convolutions far more slowly than a
    dot, and at 8x8 pixels the 9x larger operand costs nothing.  Kernel [3, 3, C_in, C_out] (HWIO).
    """
    b, h, w, c = x_bhwc.shape
    padded = jnp.pad(x_bhwc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel_hwio.reshape(9 * c, -1)


class ConvBlock(nnx.Module):
    """x + conv3x3(silu(conv3x3(LN_c(x) (1 + scale) + shift))) at full resolution."""

    def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
        pdt, d, f = _DTYPES[cfg.param_dtype], cfg.width, cfg.hidden
        self.dtype = _DTYPES[cfg.dtype]
        self.w_cond = _param(rngs, _zeros, (d, 2 * d), (None, "embed"), pdt)
        self.b_cond = _param(rngs, _zeros, (2 * d,), ("embed",), pdt)
        self.k_in = _param(rngs, _dense_init(9 * d), (3, 3, d, f), (None, None, "embed", "mlp"), pdt)
        self.b_in = _param(rngs, _zeros, (f,), ("mlp",), pdt)
        fan = 9 * f * cfg.num_blocks
        self.k_out = _param(rngs, _dense_init(fan), (3, 3, f, d), (None, None, "mlp", "embed"), pdt)
        self.b_out = _param(rngs, _zeros, (d,), ("embed",), pdt)

    def __call__(self, x_bhwd, cond_bd):
        dt = self.dtype
        scale, shift = jnp.split(jax.nn.silu(cond_bd) @ self.w_cond[...] + self.b_cond[...], 2, axis=-1)
        h = _layer_norm(x_bhwd) * (1.0 + scale[:, None, None]) + shift[:, None, None]
        h = jax.nn.silu(_conv(h.astype(dt), self.k_in[...].astype(dt)) + self.b_in[...].astype(dt))
        y = _conv(h, self.k_out[...].astype(dt)) + self.b_out[...].astype(dt)
        return x_bhwd + y.astype(x_bhwd.dtype)


class Denoiser(nnx.Module):
    """`model(z, logsnr_b, labels_b, w_b=None)`: the raw output (cfg.prediction) for noisy inputs z [b, ...].

    Labels in [0, num_classes] (num_classes = null).  Computation in float32 unless cfg.dtype says otherwise.
    """

    def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
        pdt, d = _DTYPES[cfg.param_dtype], cfg.width
        self.cfg = cfg
        self.cond = Conditioning(cfg, rngs=rngs)
        if cfg.arch == "mlp":
            n_in = int(np.prod(cfg.data_shape))
            self.w_in = _param(rngs, _dense_init(n_in), (n_in, d), (None, "embed"), pdt)
            self.blocks = nnx.List([MLPBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
            self.w_out = _param(rngs, _zeros, (d, n_in), ("embed", None), pdt)
            self.b_out = _param(rngs, _zeros, (n_in,), (None,), pdt)
        else:
            c = cfg.data_shape[-1]
            self.k_in = _param(rngs, _dense_init(9 * c), (3, 3, c, d), (None, None, None, "embed"), pdt)
            self.blocks = nnx.List([ConvBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
            self.k_out = _param(rngs, _zeros, (3, 3, d, c), (None, None, "embed", None), pdt)
            self.b_out = _param(rngs, _zeros, (c,), (None,), pdt)
        self.b_in = _param(rngs, _zeros, (d,), ("embed",), pdt)

    def __call__(self, z, logsnr_b, labels_b, w_b=None):
        cfg = self.cfg
        if tuple(z.shape[1:]) != cfg.data_shape:
            raise ValueError(f"inputs of shape {z.shape[1:]} but the denoiser was built for {cfg.data_shape}")
        cond_bd = self.cond(logsnr_b, jnp.asarray(labels_b, jnp.int32), w_b)
        x = jnp.asarray(z, jnp.float32)
        if cfg.arch == "mlp":
            h = x.reshape(x.shape[0], -1) @ self.w_in[...] + self.b_in[...]
            for block in self.blocks:
                h = block(h, cond_bd)
            out = _layer_norm(h) @ self.w_out[...] + self.b_out[...]
            return out.reshape(z.shape)
        h = _conv(x, self.k_in[...]) + self.b_in[...]
        for block in self.blocks:
            h = block(h, cond_bd)
        return _conv(_layer_norm(h), self.k_out[...]) + self.b_out[...]
