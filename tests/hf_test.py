"""Hugging Face interop: HF checkpoints give HF's logits in kdjax, kdjax exports load in transformers.

Every model is a random tiny one built from a config (no downloads).  Parity is float32, max abs diff
<= 1e-4, against PyTorch transformers with eager attention.  Random weights are drawn larger than HF's
0.02 init and every bias / norm is perturbed, so that a mis-mapped tensor, a wrong RoPE base or a skipped
bias moves the logits by far more than the tolerance (checked: the logits span several units).
"""

import dataclasses
import functools
import inspect
import json
import os
import shutil
import string
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax import sharding, steps
from kdjax.data.tokenizer import Tokenizer, train_bpe
from kdjax.models import hf
from kdjax.models.transformer import Transformer, TransformerConfig

V = 300
ATOL = 1e-4
SAMPLE_TEXTS = [
    "Hello world, this is kdjax.",
    "naïve café: 日本語 and emoji 🙂 too",
    "  leading spaces,\ttabs\n\nand newlines   ",
    "numbers 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2  # square\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [inspect.getsource(m) for m in (json, os, shutil, string, textwrap)]
    return train_bpe(texts, vocab_size=V)


# ---------------------------------------------------------------------------------------------------------
# HF -> kdjax

common = dict(
    vocab_size=V, num_hidden_layers=2, hidden_size=32, intermediate_size=64, max_position_embeddings=32
)
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    ),
    # Grouped-query attention, untied head, a non-default RoPE base.
    "llama": lambda: transformers.LlamaConfig(
        **common, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0
    ),
    # Tied head, q/k/v/o biases, and a head_dim other than hidden_size / heads.
    "llama_tied": lambda: transformers.LlamaConfig(
        **common, num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
        attention_bias=True,
    ),
    "qwen2": lambda: transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2),
    # A sliding window wider than any sequence the model sees is plain causal attention.
    "mistral": lambda: transformers.MistralConfig(
        **common, num_attention_heads=4, num_key_value_heads=1, sliding_window=64
    ),
}


def random_hf_model(family, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # HF inits biases to 0 and norm scales to 1: make both visible
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens_bt):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens_bt))).logits.numpy()


def save_hf_dir(model, tokenizer, path, **kw):
    model.save_pretrained(path, **kw)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return str(path)


def forward(model, tokens_bt):
    """`model(tokens_bt)` jitted: one compile instead of one per primitive keeps the tests fast."""
    graphdef, params = nnx.split(model)
    return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, tokens_bt))


def cached_logits(model, tokens_bt, prefill):
    """Prefill `prefill` tokens, then decode the rest one at a time (jitted, the index traced)."""
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, x, cache, i: nnx.merge(graphdef, p).forward_cached(x, cache, i))
    b, t = tokens_bt.shape
    cache = model.init_cache(b, t)
    logits, cache = step(params, tokens_bt[:, :prefill], cache, 0)
    pieces = [logits]
    for i in range(prefill, t):
        logits, cache = step(params, tokens_bt[:, i : i + 1], cache, i)
        pieces.append(logits)
    return np.concatenate(pieces, axis=1)


def random_tokens(seed=0, shape=(2, 12)):
    return np.random.RandomState(seed).randint(0, V, shape)


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_hf_to_kdjax_logits_match(family, tokenizer, tmp_path):
    torch_model = random_hf_model(family)
    path = save_hf_dir(torch_model, tokenizer, tmp_path)
    model, tok = hf.load_hf(path)
    tokens = random_tokens()
    want = hf_logits(torch_model, tokens)
    assert np.abs(want).max() > 1.0  # logits large enough that a mapping error would show
    np.testing.assert_allclose(forward(model, tokens), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(cached_logits(model, tokens, prefill=5), want, atol=ATOL, rtol=0)
    assert tok.fingerprint == tokenizer.fingerprint


def test_bfloat16_checkpoint(tokenizer, tmp_path):
    torch_model = random_hf_model("llama").to(torch.bfloat16)
    path = save_hf_dir(torch_model, tokenizer, tmp_path)
    model, _ = hf.load_hf(path)  # the checkpoint's dtype by default
    assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    want = torch_model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [K*E, D]
    wk = np.asarray(hf.load_hf(path, param_dtype="float32")[0].blocks[1].attn.wk[...])  # [D, K, E]
    np.testing.assert_array_equal(wk.reshape(32, -1).T, want)  # bf16 -> f32 is exact


def test_sharded_hf_checkpoint_loads(tokenizer, tmp_path):
    torch_model = random_hf_model("qwen2")
    path = save_hf_dir(torch_model, tokenizer, tmp_path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    model, _ = hf.load_hf(path)
    tokens = random_tokens(1)
    np.testing.assert_allclose(forward(model, tokens), hf_logits(torch_model, tokens), atol=ATOL, rtol=0)


def test_load_onto_mesh_places_each_slice(tokenizer, tmp_path):
    torch_model = random_hf_model("llama")
    path = save_hf_dir(torch_model, tokenizer, tmp_path)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ckpt = hf.load_hf_params(path, mesh=mesh, rules=sharding.DEFAULT_RULES)
    expected = sharding.tree_shardings(ckpt.params, sharding.DEFAULT_RULES, mesh)
    for (path_, var), (_, want) in zip(nnx.to_flat_state(ckpt.params), nnx.to_flat_state(expected)):
        assert var.get_value().sharding == want, path_
    # Spot checks against the rules by hand: vocab -> tensor, embed -> fsdp, kv_heads (2) -> tensor.
    model = ckpt.model()
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.blocks[0].attn.wk[...].sharding.spec == P("fsdp", "tensor", None)
    assert model.blocks[0].attn.wk[...].addressable_shards[0].data.shape == (16, 1, 8)
    tokens = random_tokens(2, shape=(4, 10))
    np.testing.assert_allclose(forward(model, tokens), hf_logits(torch_model, tokens), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# kdjax -> HF

KD_BASE = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, head_dim=8, mlp_dim=48, max_len=24)
# Three students (each costs a train-step compile), written out as five HF families.
LLAMA_GQA = TransformerConfig.llama(**KD_BASE, num_kv_heads=2, rope_theta=500.0)
# Tied, and with q/k/v biases but none on o: by default written as llama with attention_bias and an
# all-zero o_proj bias (so that AutoTokenizer keeps our tokenizer), or as qwen2 on request.
LLAMA_TIED = TransformerConfig.llama(**KD_BASE, num_kv_heads=4, tie_embeddings=True, qkv_bias=True)
KD_CASES = {  # name: (config, model_type passed to save_hf, the class transformers loads)
    "gpt2": (TransformerConfig.gpt2(**KD_BASE), None, "GPT2LMHeadModel"),
    "llama": (LLAMA_GQA, None, "LlamaForCausalLM"),
    "llama_tied": (LLAMA_TIED, None, "LlamaForCausalLM"),
    "qwen2": (LLAMA_TIED, "qwen2", "Qwen2ForCausalLM"),
    "mistral": (LLAMA_GQA, "mistral", "MistralForCausalLM"),
}


@functools.cache  # cases that differ only in the export format share one student
def train_two_steps(cfg):
    """A kdjax student after two real Adam steps (`steps.jit_train_step`, 1-device mesh), so biases and
    norm scales are no longer the 0 and 1 they start at."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    tx = optax.adam(1e-2)
    # The state is built eagerly rather than by `steps.init_train_state`, whose jitted init costs more
    # compile time than the two steps; the step itself is the real one.
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    state = steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(1)),
    )
    state_shardings = sharding.tree_shardings(state, rules, mesh)
    state = jax.device_put(state, state_shardings)
    batch = {"tokens": random_tokens(3, shape=(4, 17)).astype(np.int32)}
    step = steps.jit_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=steps.lm_loss,
        state_shardings=state_shardings,
        batch_shardings=sharding.batch_shardings(batch, mesh, rules),
        mesh=mesh,
    )
    for _ in range(2):
        state, metrics = step(state, batch, None)
    assert int(state.step) == 2
    return graphdef, state.params


def flat_params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("case", list(KD_CASES))
def test_kdjax_to_hf_after_training(case, tokenizer, tmp_path):
    cfg, model_type, hf_class = KD_CASES[case]
    student = nnx.merge(*train_two_steps(cfg))
    path = str(tmp_path / "export")
    hf.save_hf(path, student, tokenizer, model_type=model_type)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert type(torch_model).__name__ == hf_class
    tokens = random_tokens(4)
    want = forward(student, tokens)
    np.testing.assert_allclose(hf_logits(torch_model, tokens), want, atol=ATOL, rtol=0)

    # kdjax -> HF -> kdjax is the identity on parameters, bit for bit.
    reloaded, tok = hf.load_hf(path)
    before, after = flat_params(student), flat_params(reloaded)
    if case == "llama_tied":  # the zero o_proj bias the llama layout needs comes back as a parameter
        assert reloaded.cfg.out_bias
        assert not any(after.pop(("blocks", i, "attn", "bo")).any() for i in range(cfg.num_layers))
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=str(key))
    assert tok.fingerprint == tokenizer.fingerprint

    if model_type != "qwen2":  # transformers 5 rebuilds any qwen2 tokenizer with Qwen's pre-tokenizer
        hf_tok = transformers.AutoTokenizer.from_pretrained(path)
        for text in SAMPLE_TEXTS:
            assert hf_tok(text)["input_ids"] == tokenizer.encode(text), text
        assert hf_tok.eos_token_id == hf_tok.pad_token_id == tokenizer.eos_id


def test_bfloat16_export(tokenizer, tmp_path):
    model = Transformer(LLAMA_GQA, rngs=nnx.Rngs(2))
    path = str(tmp_path / "export")
    hf.save_hf(path, model, tokenizer, dtype="bfloat16")
    want = np.asarray(model.blocks[0].mlp.w_gate[...].astype(jnp.bfloat16))  # [D, F]
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert torch_model.dtype == torch.bfloat16
    got = torch_model.model.layers[0].mlp.gate_proj.weight.detach().float().numpy()  # [F, D]
    np.testing.assert_array_equal(got.T, want.astype(np.float32))
    reloaded, _ = hf.load_hf(path)
    assert reloaded.cfg.param_dtype == reloaded.cfg.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(reloaded.blocks[0].mlp.w_gate[...]), want)


def test_sharded_export_loads_in_transformers_and_kdjax(tokenizer, tmp_path):
    student = Transformer(LLAMA_GQA, rngs=nnx.Rngs(1))
    path = str(tmp_path / "export")
    hf.save_hf(path, student, tokenizer, max_shard_bytes=20_000)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 2 and files == {f for f in os.listdir(path) if f.endswith(".safetensors")}
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = random_tokens(5)
    np.testing.assert_allclose(hf_logits(torch_model, tokens), forward(student, tokens), atol=ATOL, rtol=0)
    before, after = flat_params(student), flat_params(hf.load_hf(path)[0])
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=str(key))


def test_save_is_atomic(tokenizer, tmp_path, monkeypatch):
    model = Transformer(LLAMA_TIED, rngs=nnx.Rngs(0))
    path = tmp_path / "export"
    hf.save_hf(path, model, tokenizer)
    first = (path / "model.safetensors").read_bytes()

    def crash(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "_write_safetensors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_hf(path, Transformer(LLAMA_TIED, rngs=nnx.Rngs(1)), tokenizer)
    assert (path / "model.safetensors").read_bytes() == first  # the old export is untouched
    assert os.listdir(tmp_path) == ["export"]  # and no temporary directory is left behind
    monkeypatch.undo()

    hf.save_hf(path, Transformer(LLAMA_TIED, rngs=nnx.Rngs(1)), tokenizer)
    assert (path / "model.safetensors").read_bytes() != first  # an existing export is replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
        hf.save_hf(other, model, tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["export", "notes"]


def test_config_round_trip():
    for cfg, model_type, _ in KD_CASES.values():
        hf_config = hf.kdjax_to_hf_config(cfg, model_type=model_type)
        back = hf.hf_config_to_kdjax(json.loads(json.dumps(hf_config)))
        if hf_config["model_type"] == "llama" and cfg.qkv_bias:
            back = dataclasses.replace(back, out_bias=cfg.out_bias)  # the zero o_proj bias
        assert back == cfg
    # A Mistral export states "no window": left out, transformers would default to 4096 tokens.
    assert hf.kdjax_to_hf_config(LLAMA_GQA, model_type="mistral")["sliding_window"] is None


# ---------------------------------------------------------------------------------------------------------
# Bad input


QWEN_SLIDING = dict(
    model_type="qwen2", use_sliding_window=True, sliding_window=16, num_hidden_layers=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "hf_config, match",
    [
        ({"model_type": "t5"}, "unsupported model_type 't5'; supported: gpt2, llama, qwen2, mistral"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3'"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'yarn'"),
        ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "mistral", "max_position_embeddings": 8192, "sliding_window": 4096}, "window=4096"),
        ({"model_type": "mistral", "max_position_embeddings": 8192}, "window=4096"),  # Mistral's default
        ({**QWEN_SLIDING, "max_window_layers": 0}, "sliding_window=16"),
        ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"model_type": "gpt2", "activation_function": "gelu"}, "activation_function='gelu'"),
    ],
)
def test_unsupported_configs_are_refused(hf_config, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        hf.hf_config_to_kdjax(hf_config)


def test_sliding_window_fits_when_max_len_is_shorter():
    cfg = hf.hf_config_to_kdjax({"model_type": "mistral", "sliding_window": 4096}, max_len=4096)
    assert cfg.max_len == 4096
    # Qwen2 slides only in layers >= max_window_layers: none here.
    assert hf.hf_config_to_kdjax({**QWEN_SLIDING, "max_window_layers": 2}).max_len == 64


def test_unsupported_model_type_directory(tokenizer, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ValueError, match="supported: gpt2, llama, qwen2, mistral"):
        hf.load_hf(tmp_path)


def edit_checkpoint(path, edit):
    """Rewrites model.safetensors through `edit(dict of numpy arrays)`."""
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    return save_hf_dir(random_hf_model("llama"), tokenizer, tmp_path_factory.mktemp("llama"))


def test_missing_tensor_is_named(llama_dir, tmp_path):
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    edit_checkpoint(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.load_hf(path)


def test_wrong_shape_is_named_with_both_shapes(llama_dir, tmp_path):
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_checkpoint(path, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(8, 32\) .* implies \(16, 32\)"):
        hf.load_hf(path)


def test_left_over_tensors_are_an_error_but_buffers_are_skipped(llama_dir, tmp_path):
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_checkpoint(path, lambda t: t.update({buffer: np.ones(4, np.float32)}))
    assert hf.load_hf_params(path).skipped == (buffer,)
    extra = "model.layers.0.self_attn.q_norm.weight"  # e.g. a Qwen3 checkpoint mislabelled as qwen2
    edit_checkpoint(path, lambda t: t.update({extra: np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=rf"\['{extra}'\] have no place"):
        hf.load_hf(path)


def test_gpt2_base_model_names_and_mask_buffers(tokenizer, tmp_path):
    """The original GPT-2 uploads name tensors without "transformer." and carry causal-mask buffers."""
    path = save_hf_dir(random_hf_model("gpt2"), tokenizer, tmp_path / "gpt2")
    want = flat_params(hf.load_hf(path)[0])

    def to_base_model(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
        tensors["h.1.attn.masked_bias"] = np.ones(())

    edit_checkpoint(path, to_base_model)
    ckpt = hf.load_hf_params(path)
    assert ckpt.skipped == ("h.0.attn.bias", "h.1.attn.masked_bias")
    got = flat_params(ckpt.model())
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def test_compare_tokenizers(tokenizer):
    assert hf.compare_tokenizers(tokenizer, Tokenizer.from_str(tokenizer.to_str()), SAMPLE_TEXTS) is None

    smaller = train_bpe([inspect.getsource(json)], vocab_size=280)
    msg = hf.compare_tokenizers(tokenizer, smaller, SAMPLE_TEXTS, names=("teacher", "student"))
    assert msg == "tokenizers differ: vocab size 300 (teacher) vs 280 (student)"

    other = train_bpe([inspect.getsource(m) for m in (inspect, string, textwrap, os, shutil)], vocab_size=V)
    assert "has id" in hf.compare_tokenizers(tokenizer, other, SAMPLE_TEXTS)

    # Same vocabulary, different pre-tokenizer: only the ids of the texts tell them apart.
    spec = json.loads(tokenizer.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    prefixed = Tokenizer.from_str(json.dumps(spec))
    msg = hf.compare_tokenizers(tokenizer, prefixed, SAMPLE_TEXTS)
    assert msg.startswith("tokenizers differ on sample text 0 ('Hello world") and "position 0" in msg


def test_tokenizer_with_another_eos(tmp_path, llama_dir):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getsource(m) for m in (json, os, shutil)], trainer=trainer)
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    tok.save(os.path.join(path, "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    _, loaded = hf.load_hf(path)
    assert loaded.eos_id == 2 and loaded.encode("abc def") == tok.encode("abc def").ids
