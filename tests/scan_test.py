"""Scanned layers and remat: the same function of the same numbers as the per-layer model.

A scanned model (`TransformerConfig.scan_layers`) holds one Block with parameters stacked on [L]; every test
here compares it against the unscanned model with the same (converted) parameters: logits, hidden states,
gradients, KV-cache decoding with scalar and per-row indices, sampling, Hugging Face import / export and
checkpoints.  Remat policies must not change gradients.  float32 with "highest" matmul precision (conftest);
scan and the Python loop run the same ops in the same order, so differences are rounding only.
"""

import dataclasses
import functools
import inspect
import json
import os
import shutil
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import checkpoint, pretrained, sharding, steps
from kdjax.models import sampling
from kdjax.models.partitioning import unstacked_ndim
from kdjax.models.transformer import (REMAT_POLICIES, Transformer, TransformerConfig, convert_layers, to_scanned,
                                      to_unscanned)

V = 61
ATOL = 2e-5


def make_config(family, **kw):
    base = dict(vocab_size=V, num_layers=3, embed_dim=32, num_heads=4, head_dim=8, mlp_dim=48, max_len=24)
    if family == "gpt2":
        return TransformerConfig.gpt2(**{**base, **kw})
    return TransformerConfig.llama(**{**base, "num_kv_heads": 2, "qkv_bias": family == "qwen2", **kw})


def pair(family, seed=0, **kw):
    """(unscanned model, scanned model) with the same parameters; biases made non-zero."""
    cfg = make_config(family, **kw)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] in ("bq", "bk", "bv", "bo", "b_up", "b_down", "bias"):
            var[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), var[...].shape)
    graphdef, params = nnx.split(model)
    scanned_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, scan_layers=True),
                                                                       rngs=nnx.Rngs(0))))
    return model, nnx.merge(scanned_graphdef, to_scanned(params))


def split_jit(fn, model):
    """`fn(model, *args)` jitted over the model's params (one compile per call site)."""
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, *args: fn(nnx.merge(graphdef, p), *args))
    return functools.partial(jitted, params)


def assert_trees_close(a, b, atol=ATOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5), a, b)


def test_scanned_init_is_the_stacked_unscanned_init_and_conversion_round_trips():
    cfg = make_config("llama")
    unscanned = nnx.state(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    scanned = nnx.state(Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(3)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, to_scanned(unscanned), scanned)
    jax.tree.map(np.testing.assert_array_equal, to_unscanned(scanned), unscanned)
    jax.tree.map(np.testing.assert_array_equal, convert_layers(unscanned, scan_layers=True), scanned)
    wq = scanned["blocks"]["attn"]["wq"]
    assert wq.get_value().shape == (3, 32, 4, 8)
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert unscanned["blocks"][2]["attn"]["wq"].get_metadata()["logical_axes"] == ("embed", "heads", "head_dim")
    with pytest.raises(ValueError, match="scanned already"):
        to_scanned(scanned)
    with pytest.raises(ValueError, match="unscanned already"):
        to_unscanned(unscanned)


def test_a_whole_train_state_converts_optimizer_moments_included():
    cfg = make_config("gpt2")
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    mesh, rules = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), sharding.DEFAULT_RULES
    specs = [steps.train_state_spec(lambda r, c=c: Transformer(c, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
             for c in (cfg, dataclasses.replace(cfg, scan_layers=True))]
    unscanned, scanned = specs[0].init(), specs[1].init()
    converted = to_scanned(unscanned)
    assert jax.tree.structure(converted) == jax.tree.structure(scanned)
    jax.tree.map(np.testing.assert_array_equal, converted, scanned)
    # The sharding rules see the stacked axis: the spec of the scanned state is the spec of its abstract.
    assert jax.tree.structure(sharding.tree_shardings(jax.eval_shape(lambda: converted), rules, mesh)) == \
        jax.tree.structure(specs[1].shardings)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_scanned_equals_unscanned_logits_hidden_and_gradients(family):
    model, scanned = pair(family)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, V)
    forward = lambda m, x: m(x, return_hidden=True)
    (logits_u, hidden_u), (logits_s, hidden_s) = split_jit(forward, model)(tokens), split_jit(forward, scanned)(tokens)
    np.testing.assert_allclose(logits_s, logits_u, atol=ATOL)
    assert len(hidden_s) == len(hidden_u) == 3
    assert_trees_close(hidden_s, hidden_u)
    final = lambda m, x: m.final_hidden(x)
    np.testing.assert_allclose(split_jit(final, scanned)(tokens), split_jit(final, model)(tokens), atol=ATOL)

    def grads(m):
        graphdef, params = nnx.split(m, nnx.Param)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))[..., 0] ** 2)
        return jax.jit(jax.grad(loss))(params)

    g_u, g_s = grads(model), grads(scanned)
    assert_trees_close(to_unscanned(g_s), g_u)
    assert float(jnp.abs(g_u["blocks"][0]["attn"]["wq"][...]).max()) > 0  # the layer-0 gradient exists


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_remat_policies_give_the_same_gradients(scan):
    cfg = make_config("llama", scan_layers=scan)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, V)
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    results = {}
    for policy in REMAT_POLICIES:
        graphdef = nnx.graphdef(nnx.eval_shape(lambda p=policy: Transformer(dataclasses.replace(cfg, remat_policy=p),
                                                                         rngs=nnx.Rngs(0))))
        loss = lambda p, g=graphdef: jnp.mean(nnx.merge(g, p)(tokens) ** 2)
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
        # The policy is really applied: the differentiated program holds a remat region (none for "none").
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none"), policy
    for policy, (value, grads) in results.items():
        np.testing.assert_allclose(value, results["none"][0], rtol=1e-6, err_msg=policy)
        assert_trees_close(grads, results["none"][1], atol=1e-6)


def test_bad_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat_policy"):
        make_config("llama", remat_policy="some")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_cache_decoding_equals_the_full_forward(family):
    model, scanned = pair(family)
    tokens = jax.random.randint(jax.random.key(3), (3, 12), 0, V)
    full = split_jit(lambda m, x: m(x), model)(tokens)
    cache = scanned.init_cache(3, 16)
    assert cache["k"].shape == (3, 3, 16, 2 if family == "llama" else 4, 8)  # [B, L, S, K, E]: batch first
    step = split_jit(lambda m, x, c, i: m.forward_cached(x, c, i), scanned)
    logits, cache = step(tokens[:, :5], cache, 0)
    pieces = [logits]
    for i in range(5, 12):
        logits, cache = step(tokens[:, i : i + 1], cache, i)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=ATOL)


def test_scanned_ragged_cache_index_matches_each_prefix():
    """Per-row offsets in a scanned cache: row b writes layer l's entries at its own offset in slot (b, l)."""
    model, scanned = pair("llama")
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (3, 12), 0, V))
    full = split_jit(lambda m, x: m(x), model)(tokens)
    step_u = split_jit(lambda m, x, c, i: m.forward_cached(x, c, i), model)
    step_s = split_jit(lambda m, x, c, i: m.forward_cached(x, c, i), scanned)
    lengths = np.array([2, 5, 3], np.int32)
    stale = np.asarray(jax.random.randint(jax.random.key(5), (3, 7), 0, V))
    prefill = np.where(np.arange(7) < lengths[:, None], tokens[:, :7], stale)
    _, cache_s = step_s(prefill, scanned.init_cache(3, 16), 0)
    _, cache_u = step_u(prefill, model.init_cache(3, 16), 0)
    for t in (3, 1, 2):
        new = np.stack([tokens[b, i : i + t] for b, i in enumerate(lengths)])
        logits, cache_s = step_s(new, cache_s, lengths)
        _, cache_u = step_u(new, cache_u, lengths)
        for b in range(3):
            np.testing.assert_allclose(logits[b], full[b, lengths[b] : lengths[b] + t], atol=ATOL)
        lengths = lengths + t
    # The stacked cache holds exactly the per-layer caches, layer l at [:, l].
    for layer, per_layer in enumerate(cache_u):
        np.testing.assert_allclose(cache_s["k"][:, layer], per_layer["k"], atol=ATOL)


def test_sampling_from_a_scanned_model_equals_the_unscanned_model():
    model, scanned = pair("gpt2")
    prompt = jax.random.randint(jax.random.key(6), (2, 4), 0, V)
    keys = jax.random.split(jax.random.key(7), 2)
    outs = []
    for m in (model, scanned):
        graphdef, params = nnx.split(m)
        sample = jax.jit(functools.partial(sampling.sample, graphdef, max_new_tokens=6, temperature=1.0, top_k=20))
        guided = jax.jit(functools.partial(sampling.sample_cfg, graphdef, guidance=2.0, max_new_tokens=5,
                                           temperature=0.0))
        outs.append((sample(params, prompt, keys), guided(params, prompt, prompt[:, :2], keys)))
    jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])
    assert outs[1][0]["tokens"].shape == (2, 10)


def test_hugging_face_parity_for_a_scanned_model(tmp_path):
    import torch  # pylint: disable=g-import-not-at-top  (a test dependency)
    import transformers  # pylint: disable=g-import-not-at-top

    from kdjax import hf  # pylint: disable=g-import-not-at-top
    from kdjax.data.tokenizer import train_bpe  # pylint: disable=g-import-not-at-top

    vocab = 300
    tokenizer = train_bpe([inspect.getsource(m) for m in (json, os, shutil, string)], vocab_size=vocab)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                      max_position_embeddings=32, num_attention_heads=4, num_key_value_heads=2)
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in torch_model.parameters():
            p.copy_(0.3 * torch.randn_like(p) if p.ndim > 1 else 1.0 + 0.1 * torch.randn_like(p))
    torch_model.eval().save_pretrained(tmp_path / "src")
    tokenizer.save(str(tmp_path / "src" / "tokenizer.json"))
    tokens = np.random.RandomState(0).randint(0, vocab, (2, 12))
    with torch.no_grad():
        want = torch_model(torch.tensor(tokens)).logits.numpy()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ckpt = hf.load_hf_params(tmp_path / "src", mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
    model = ckpt.model()
    assert model.cfg.scan_layers and model.blocks.attn.wq[...].shape == (3, 32, 4, 8)
    assert model.blocks.attn.wq[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(split_jit(lambda m, x: m(x), model)(tokens), want, atol=1e-4, rtol=0)
    # Export from the scanned model: the same tensors as the unscanned model's export, and transformers
    # reads back the same logits.
    unscanned = hf.load_hf(tmp_path / "src")[0]
    ours, theirs = hf.hf_state_dict(model), hf.hf_state_dict(unscanned)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    hf.save_hf(tmp_path / "out", model, tokenizer)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens)).logits.numpy(), want, atol=1e-4, rtol=0)


def test_checkpoint_of_a_scanned_state_restores_and_converts(tmp_path):
    cfg = make_config("llama", scan_layers=True)
    tx = steps.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    mesh, rules = sharding.make_mesh({"fsdp": 4, "tensor": 2}), sharding.DEFAULT_RULES
    spec = steps.train_state_spec(lambda r: Transformer(cfg, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
    state = spec.init()
    # Stacked params shard like their layers: the `layers` axis is replicated, embed on fsdp.
    assert state.params["blocks"]["mlp"]["w_up"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                                                                  "tensor")
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    try:
        ckpt.save(1, state, force=True)
        ckpt.wait()
        restored_state, _ = ckpt.restore(spec.abstract, 1)
    finally:
        ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, restored_state, state)
    restored = restored_state.params
    # A work directory's model loads in the other layout through pretrained.convert_layers.
    loaded = pretrained.Pretrained(spec.graphdef, restored, cfg, tokenizer=None, step=1)
    flat = pretrained.convert_layers(loaded, scan_layers=False)
    assert not flat.config.scan_layers and flat.model().blocks[2].attn.wq[...].shape == (32, 4, 8)
    tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, V)
    np.testing.assert_allclose(split_jit(lambda m, x: m(x), flat.model())(tokens),
                               split_jit(lambda m, x: m(x), loaded.model())(tokens), atol=ATOL)


def layer_aware_decay_mask(params):
    """AdamW's decay mask that counts a stacked parameter's dimensions without its `layers` axis."""
    return jax.tree.map(lambda v: unstacked_ndim(v) >= 2, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_training_a_scanned_model_equals_training_the_unscanned_one():
    """Three AdamW steps (weight decay on matrices only) on (2, 4, 1) with activation constraints."""
    cfg = make_config("llama")
    mesh, rules = sharding.make_mesh({"data": 2, "fsdp": 4}), sharding.DEFAULT_RULES
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1, mask=layer_aware_decay_mask))
    finals = []
    for scan in (False, True):
        c = dataclasses.replace(cfg, scan_layers=scan, remat_policy="full" if scan else "none")
        spec = steps.train_state_spec(lambda r, c=c: Transformer(c, rngs=r), tx, seed=0, mesh=mesh, rules=rules)
        batch = {"tokens": np.random.RandomState(0).randint(0, V, (8, 13)).astype(np.int32)}
        batch_sh = sharding.batch_shardings(batch, mesh, rules)
        fn = functools.partial(steps.train_step, graphdef=spec.graphdef, tx=tx, loss_fn=steps.lm_loss)
        step = jax.jit(sharding.with_activation_sharding(fn, mesh, rules), in_shardings=(spec.shardings, batch_sh, None),
                       out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
        state = spec.init()
        for _ in range(3):
            state, _ = step(state, jax.device_put(batch, batch_sh), None)
        finals.append(state.params)
    assert_trees_close(to_scanned(finals[0]), finals[1], atol=5e-5)
