"""A small MLP image classifier whose penultimate features serve the sample metrics (FD, precision/recall).

    model(x_b...) -> logits_bk;  model(x_b..., return_features=True) -> (logits_bk, features_bf)

The features are the last hidden layer (after its nonlinearity), the analogue of Inception's pool
features in FID.  Parameters carry logical axes (`embed`, `mlp`, `vocab` for the class dimension).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    data_shape: tuple
    num_classes: int
    hidden: int = 256
    feature_dim: int = 64

    def __post_init__(self):
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        if self.num_classes < 2 or self.hidden < 1 or self.feature_dim < 1:
            raise ValueError(f"need num_classes >= 2 and positive widths; got {self}")


def _param(rngs, shape, axes, *, zero=False):
    init = jax.nn.initializers.zeros if zero else jax.nn.initializers.normal(1.0 / math.sqrt(shape[0]))
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


class ImageClassifier(nnx.Module):
    """flatten -> Dense(hidden) -> GELU -> Dense(hidden) -> GELU -> Dense(feature_dim) -> GELU -> Dense(K)."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        n_in, h, f, k = int(np.prod(cfg.data_shape)), cfg.hidden, cfg.feature_dim, cfg.num_classes
        self.cfg = cfg
        self.w1, self.b1 = _param(rngs, (n_in, h), (None, "mlp")), _param(rngs, (h,), ("mlp",), zero=True)
        self.w2, self.b2 = _param(rngs, (h, h), ("mlp", None)), _param(rngs, (h,), (None,), zero=True)
        self.w3, self.b3 = _param(rngs, (h, f), (None, "embed")), _param(rngs, (f,), ("embed",), zero=True)
        self.w4, self.b4 = _param(rngs, (f, k), ("embed", "vocab")), _param(rngs, (k,), ("vocab",), zero=True)

    def __call__(self, x, *, return_features: bool = False):
        if tuple(x.shape[1:]) != self.cfg.data_shape:
            raise ValueError(f"inputs of shape {x.shape[1:]}, the classifier takes {self.cfg.data_shape}")
        h = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
        h = jax.nn.gelu(h @ self.w1[...] + self.b1[...])
        h = jax.nn.gelu(h @ self.w2[...] + self.b2[...])
        features_bf = jax.nn.gelu(h @ self.w3[...] + self.b3[...])
        logits_bk = features_bf @ self.w4[...] + self.b4[...]
        return (logits_bk, features_bf) if return_features else logits_bk
