"""A small Transformer text classifier: causal `Transformer` blocks, masked mean pooling, a linear head.

    model(tokens_bt, mask_bt) -> logits_bk;  model(tokens_bt, mask_bt, return_features=True) -> (logits_bk, f_bd)

f_b = sum_t m_bt h_bt / max(sum_t m_bt, 1) with h the encoder's final-normed hidden states; logits = f W + c.
Used by the CFG-distillation evaluation to score how well a generation matches its requested category (the
probability of that category) and as an embedding independent of the LM.  Parameters carry logical axes
(the head's class dimension is unsharded).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class TextClassifierConfig:
    vocab_size: int
    num_classes: int
    max_len: int
    num_layers: int = 2
    embed_dim: int = 64
    num_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 128

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"need num_classes >= 2, got {self.num_classes}")

    def encoder_config(self) -> TransformerConfig:
        return TransformerConfig.llama(
            vocab_size=self.vocab_size, num_layers=self.num_layers, embed_dim=self.embed_dim,
            num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
            max_len=self.max_len, tie_embeddings=True,
        )


class TextClassifier(nnx.Module):
    def __init__(self, cfg: TextClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Transformer(cfg.encoder_config(), rngs=rngs)
        self.w = nnx.Param(jnp.zeros((cfg.embed_dim, cfg.num_classes), jnp.float32), logical_axes=("embed", None))
        self.b = nnx.Param(jnp.zeros((cfg.num_classes,), jnp.float32), logical_axes=(None,))

    def __call__(self, tokens_bt, mask_bt, *, return_features: bool = False):
        h_btd = self.encoder.final_hidden(tokens_bt).astype(jnp.float32)
        m = mask_bt.astype(jnp.float32)[..., None]
        features_bd = jnp.sum(h_btd * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        logits_bk = features_bd @ self.w[...] + self.b[...]
        return (logits_bk, features_bd) if return_features else logits_bk


def class_probabilities(logits_bk, labels_b):
    """softmax(logits)[label] per row: [B, K], [B] -> [B]."""
    probs = jax.nn.softmax(logits_bk.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probs, labels_b[:, None], axis=-1)[:, 0]
