"""Denoisers and the image classifier: shapes, conditioning inputs, logical axes on every parameter,
sharded == unsharded, and kdjax.models' import rule."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import sharding
from kdjax.models.denoiser import Denoiser, DenoiserConfig
from kdjax.models.image_classifier import ClassifierConfig, ImageClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "mlp-2d": DenoiserConfig(data_shape=(2,), num_classes=4, width=16, hidden=32, num_blocks=2),
    "mlp-img-w": DenoiserConfig(
        data_shape=(8, 8, 1), num_classes=10, width=16, hidden=32, num_blocks=2, guidance_embed=True
    ),
    "conv-img-w": DenoiserConfig(
        data_shape=(8, 8, 1), num_classes=10, arch="conv", width=8, hidden=16, num_blocks=1, guidance_embed=True
    ),
}


def _init(module_cls, cfg, seed=0):
    """(graphdef, params) created under one jit: eager init compiles one tiny program per parameter."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(seed))), nnx.Param)
    params = jax.jit(lambda: nnx.split(module_cls(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])()
    return graphdef, params


@jax.jit
def _redraw(params):
    """Every parameter redrawn (zero-initialised output layers would hide the inputs)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def _forward(graphdef, params):
    fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    return lambda *a: fwd(params, *a)


def _inputs(cfg, b=8):
    z = jax.random.normal(jax.random.key(1), (b, *cfg.data_shape))
    logsnr = jnp.linspace(-10, 10, b)
    labels = jnp.arange(b) % (cfg.num_classes + 1)
    w = jnp.linspace(0, 4, b) if cfg.guidance_embed else None
    return z, logsnr, labels, w


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_denoiser_shapes_and_every_input_matters(name):
    cfg = CONFIGS[name]
    graphdef, params = _init(Denoiser, cfg)
    params = _redraw(params)
    z, logsnr, labels, w = _inputs(cfg)
    other = jax.random.normal(jax.random.key(2), z.shape)
    mixed = jnp.concatenate([z[:3], other[3:]])  # the same first 3 examples in another batch

    @jax.jit  # every variant in one program: compiling is what costs here
    def variants(p):
        m = nnx.merge(graphdef, p)
        out = {
            "base": m(z, logsnr, labels, w),
            "z": m(z + 0.1, logsnr, labels, w),
            "logsnr": m(z, logsnr + 1.0, labels, w),
            "labels": m(z, logsnr, (labels + 1) % (cfg.num_classes + 1), w),
            "mixed": m(mixed, logsnr, labels, w),
        }
        if cfg.guidance_embed:
            out["w"] = m(z, logsnr, labels, w + 0.5)
        return out

    outs = variants(params)
    base = outs.pop("base")
    assert base.shape == z.shape and base.dtype == jnp.float32 and np.all(np.isfinite(base))
    # Examples are independent: one example's output does not depend on the others in the batch.
    np.testing.assert_allclose(outs.pop("mixed")[:3], base[:3], rtol=1e-4, atol=1e-5)
    for name_, out in outs.items():
        assert not np.allclose(out, base, atol=1e-6), name_
    model = nnx.merge(graphdef, params)
    probe = jax.ShapeDtypeStruct
    if cfg.guidance_embed:
        with pytest.raises(ValueError, match="guidance weight"):
            jax.eval_shape(lambda: model(z, logsnr, labels))
    else:
        with pytest.raises(ValueError, match="no guidance input"):
            jax.eval_shape(lambda: model(z, logsnr, labels, jnp.ones(8)))
    with pytest.raises(ValueError, match="built for"):
        jax.eval_shape(lambda: model(probe((2, 3), jnp.float32), logsnr[:2], labels[:2], None if w is None else w[:2]))


def test_im2col_conv_equals_lax_conv():
    from kdjax.models import denoiser

    k1, k2 = jax.random.split(jax.random.key(4))
    x = jax.random.normal(k1, (2, 8, 8, 3))
    kernel = jax.random.normal(k2, (3, 3, 3, 5))
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(jax.jit(denoiser._conv)(x, kernel), want, rtol=1e-5, atol=1e-5)


def test_fresh_v_denoiser_predicts_zero_and_config_validation():
    cfg = CONFIGS["mlp-2d"]
    z, logsnr, labels, _ = _inputs(cfg)
    np.testing.assert_array_equal(_forward(*_init(Denoiser, cfg))(z, logsnr, labels, None), 0.0)  # zero-init head
    assert cfg.null_class == 4 and cfg.num_params() > 0
    with pytest.raises(ValueError, match="arch"):
        DenoiserConfig(data_shape=(2,), num_classes=3, arch="transformer")
    with pytest.raises(ValueError, match="needs"):
        DenoiserConfig(data_shape=(2,), num_classes=3, arch="conv")
    with pytest.raises(ValueError, match="prediction"):
        DenoiserConfig(data_shape=(2,), num_classes=3, prediction="score")


def _all_params_have_axes(module_cls, cfg):
    params = nnx.state(nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    n = 0
    for path, var in jax.tree.leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
        sharding.logical_to_spec(axes, var.get_value().shape, sharding.DEFAULT_RULES, mesh)  # names are known
        n += 1
    return n


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_denoiser_param_has_known_logical_axes(name):
    assert _all_params_have_axes(Denoiser, CONFIGS[name]) > 5


def test_classifier_features_axes_and_shapes():
    cfg = ClassifierConfig(data_shape=(8, 8, 1), num_classes=10, hidden=32, feature_dim=12)
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
    graphdef, params = _init(ImageClassifier, cfg)
    fwd = jax.jit(lambda p, x_, f: nnx.merge(graphdef, p)(x_, return_features=f), static_argnums=2)
    logits, feats = fwd(params, x, True)
    assert logits.shape == (5, 10) and feats.shape == (5, 12)
    np.testing.assert_allclose(fwd(params, x, False), logits, rtol=1e-6)
    assert _all_params_have_axes(ImageClassifier, cfg) == 8
    with pytest.raises(ValueError, match="takes"):
        fwd(params, jnp.zeros((2, 64)), False)


def test_sharded_forward_equals_unsharded():
    cfg = CONFIGS["mlp-img-w"]
    graphdef, params = _init(Denoiser, cfg)
    params = _redraw(params)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.tree_shardings(params, sharding.DEFAULT_RULES, mesh)
    sharded = jax.device_put(params, shardings)
    assert any(len(s.spec) and any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
    z, logsnr, labels, w = _inputs(cfg)
    fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    np.testing.assert_allclose(fwd(sharded, z, logsnr, labels, w), fwd(params, z, logsnr, labels, w), rtol=1e-5, atol=1e-5)


def test_models_import_only_jax_flax_numpy():
    allowed = {"jax", "flax", "numpy", "dataclasses", "math", "typing", "__future__"}
    for name in ("denoiser.py", "image_classifier.py"):
        tree = ast.parse(open(os.path.join(ROOT, "kdjax", "models", name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{name} imports {mod}"
