"""Hugging Face interop: HF checkpoints give HF's logits in kdjax, kdjax exports load in transformers.

Every model is a random tiny one built from a config (no downloads).  Parity is float32 against PyTorch
transformers with eager attention: max abs diff <= 1e-4 for HF checkpoints, whose random weights are drawn
larger than HF's 0.02 init with every bias / norm perturbed, so that a mis-mapped tensor, a wrong RoPE base or
a skipped bias moves the logits by far more than the tolerance (checked: the logits span several units);
<= 1e-5 for exports of kdjax students after two training steps.  Every export is also loaded with
`AutoTokenizer`, which must give kdjax's ids (unicode, NFD, whitespace and digit runs, a literal
"<|endoftext|>").
"""

import dataclasses
import functools
import inspect
import json
import os
import re
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

from kdjax import hf, sharding, steps
from kdjax.data import hf_tokenizer
from kdjax.data.tokenizer import EOS, Tokenizer, train_bpe
from kdjax.hf import config as hf_config_lib
from kdjax.hf import safetensors_io
from kdjax.models.transformer import Transformer, TransformerConfig

V = 300
ATOL = 1e-4  # HF checkpoints drawn with large random weights: logits of several units
EXPORT_ATOL = 1e-5  # kdjax students after two steps: what an export must reproduce in transformers
SAMPLE_TEXTS = [
    "Hello world, this is kdjax.",
    "naïve café: 日本語 and emoji 🙂 too",
    "  leading spaces,\ttabs\n\nand newlines   ",
    "numbers 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2  # square\n",
    "a literal <|endoftext|> in a document",
    "NFD cafe\u0301 vs NFC café, digits 2024 and 1234567890",
]
TRAIN_TEXTS = [inspect.getsource(m) for m in (json, os, shutil, string, textwrap)]


def qwen_style_tokenizer(texts, *, vocab_size):
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer (taken from transformers' own
    `Qwen2Tokenizer`), trained with `tokenizers`: the tokenizer.json a real Qwen2 checkpoint ships."""
    pipeline = transformers.Qwen2Tokenizer().backend_tokenizer
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.normalizer, tok.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == vocab_size
    return Tokenizer(tok)


@pytest.fixture(scope="module")
def tokenizer():
    """kdjax's own tokenizer: GPT-2's split regex, no normalizer."""
    return train_bpe(TRAIN_TEXTS, vocab_size=V)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return qwen_style_tokenizer(TRAIN_TEXTS, vocab_size=V)


# ---------------------------------------------------------------------------------------------------------
# HF -> kdjax

# A real checkpoint's config.json declares its tokenizer's EOS (id 0 here; Llama's default would be 2), and
# the loader takes the model's declaration first.
common = dict(
    vocab_size=V, num_hidden_layers=2, hidden_size=32, intermediate_size=64, max_position_embeddings=32,
    bos_token_id=0, eos_token_id=0,
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
# Four students (each costs a train-step compile), written out as the four HF families.
GPT2 = TransformerConfig.gpt2(**KD_BASE)
LLAMA_GQA = TransformerConfig.llama(**KD_BASE, num_kv_heads=2, rope_theta=500.0)  # untied, no biases
# Tied, with biases on q, k, v and o: llama's attention_bias.
LLAMA_TIED = TransformerConfig.llama(
    **KD_BASE, num_kv_heads=4, tie_embeddings=True, qkv_bias=True, out_bias=True
)
# Qwen2's layout: biases on q, k, v, none on o.
QWEN_LAYOUT = TransformerConfig.llama(**KD_BASE, num_kv_heads=2, tie_embeddings=True, qkv_bias=True)
KD_CASES = {  # name: (config, tokenizer fixture, model_type given to save_hf, the class transformers loads)
    "gpt2": (GPT2, "tokenizer", None, "GPT2LMHeadModel"),
    "llama": (LLAMA_GQA, "tokenizer", None, "LlamaForCausalLM"),
    "llama_tied": (LLAMA_TIED, "tokenizer", None, "LlamaForCausalLM"),
    # Qwen2's layout is written as Qwen2 by default when AutoTokenizer (which always rebuilds a qwen2
    # tokenizer with Qwen's pipeline) reproduces the tokenizer: a real Qwen2 tokenizer does ...
    "qwen2": (QWEN_LAYOUT, "qwen_tokenizer", None, "Qwen2ForCausalLM"),
    # ... kdjax's GPT-2-style one does not, so that student is written as llama with a zero o_proj bias.
    "qwen_layout_kdjax_tokenizer": (QWEN_LAYOUT, "tokenizer", None, "LlamaForCausalLM"),
    "mistral": (LLAMA_GQA, "tokenizer", "mistral", "MistralForCausalLM"),
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


def assert_same_ids(path, tokenizer):
    """`AutoTokenizer.from_pretrained(path)` encodes like kdjax (unicode, NFD, whitespace, digits, a literal
    "<|endoftext|>"), and its EOS / PAD are kdjax's EOS."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    for text in SAMPLE_TEXTS + list(hf_tokenizer.PROBE_TEXTS):
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text), text
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == tokenizer.eos_id
    return hf_tok


@pytest.mark.parametrize("case", list(KD_CASES))
def test_kdjax_to_hf_after_training(case, request, tmp_path):
    cfg, tokenizer_fixture, model_type, hf_class = KD_CASES[case]
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    student = nnx.merge(*train_two_steps(cfg))
    path = str(tmp_path / "export")
    written = hf.save_hf(path, student, tokenizer, model_type=model_type)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f) == written

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert type(torch_model).__name__ == hf_class
    tokens = random_tokens(4)
    want = forward(student, tokens)
    np.testing.assert_allclose(hf_logits(torch_model, tokens), want, atol=EXPORT_ATOL, rtol=0)
    hf_tok = assert_same_ids(path, tokenizer)

    # The length limit comes from the model, not from the training length (max_len = 24): GPT-2 keeps its
    # learned table; RoPE has no learned limit, so the export states transformers' default for the family.
    limit = written.get("n_positions", written.get("max_position_embeddings"))
    if cfg.positions == "learned":
        assert limit == cfg.max_len == torch_model.transformer.wpe.weight.shape[0]
    else:
        assert limit == transformers.AutoConfig.for_model(written["model_type"]).max_position_embeddings
    assert hf_tok.model_max_length == limit

    # kdjax -> HF -> kdjax is the identity on parameters, bit for bit.
    reloaded, tok = hf.load_hf(path, max_len=cfg.max_len)
    before, after = flat_params(student), flat_params(reloaded)
    if hf_class == "LlamaForCausalLM" and cfg.qkv_bias and not cfg.out_bias:  # its zero o_proj bias comes back
        assert reloaded.cfg.out_bias
        assert not any(after.pop(("blocks", i, "attn", "bo")).any() for i in range(cfg.num_layers))
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=str(key))
    assert tok.fingerprint == tokenizer.fingerprint


def test_qwen2_export_of_a_tokenizer_transformers_would_rebuild_is_refused(tokenizer, tmp_path):
    """Asked for explicitly, qwen2 with kdjax's GPT-2-style tokenizer is refused before anything is written:
    AutoTokenizer would load it as Qwen2Tokenizer with Qwen's normalizer and give other ids."""
    path = tmp_path / "export"
    match = r"as qwen2 because AutoTokenizer loads it as Qwen2Tokenizer, whose normalizer"
    with pytest.raises(ValueError, match=match):
        hf.save_hf(path, Transformer(QWEN_LAYOUT, rngs=nnx.Rngs(0)), tokenizer, model_type="qwen2")
    assert os.listdir(tmp_path) == []
    # The tokenizer files alone show why: under qwen2 the decomposed "é" is composed (NFC) first.
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "config.json").write_text(json.dumps(hf.kdjax_to_hf_config(QWEN_LAYOUT, tokenizer)))
    hf_tokenizer.save_tokenizer_files(probe, tokenizer, model_max_length=64)
    qwen_tok = transformers.AutoTokenizer.from_pretrained(probe)
    assert type(qwen_tok).__name__ == "Qwen2Tokenizer"
    assert qwen_tok("cafe\u0301")["input_ids"] != tokenizer.encode("cafe\u0301")


def test_export_length_from_the_source_checkpoint(tokenizer, tmp_path):
    """A model that came from HF keeps its checkpoint's max_position_embeddings when passed through, and a
    GPT-2 table cannot be declared longer than it is."""
    src = save_hf_dir(random_hf_model("llama"), tokenizer, tmp_path / "src")
    ckpt = hf.load_hf_params(src, max_len=16)  # e.g. loaded for training on 16-token sequences
    limit = ckpt.hf_config["max_position_embeddings"]
    written = hf.save_hf(tmp_path / "out", ckpt.model(), ckpt.tokenizer, max_positions=limit)
    assert written["max_position_embeddings"] == limit == 32 and ckpt.config.max_len == 16
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").model_max_length == limit
    with pytest.raises(ValueError, match="exactly 24 learned positions"):
        hf.save_hf(tmp_path / "gpt2", Transformer(GPT2, rngs=nnx.Rngs(0)), tokenizer, max_positions=48)
    assert not (tmp_path / "gpt2").exists()


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

    monkeypatch.setattr(safetensors_io, "write_safetensors", crash)
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
        hf.check_export_dir(other)  # what an experiment calls before training
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
        hf.save_hf(other, model, tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["export", "notes"]
    assert os.listdir(other) == ["todo.txt"]


def test_config_round_trip():
    for cfg, _, model_type, _ in KD_CASES.values():
        hf_config = hf.kdjax_to_hf_config(cfg, model_type=model_type)
        back = hf.hf_config_to_kdjax(json.loads(json.dumps(hf_config)))
        if cfg.positions == "rope":  # the export states the family's limit, not the training length
            assert back.max_len == hf_config["max_position_embeddings"] > cfg.max_len
            back = dataclasses.replace(back, max_len=cfg.max_len)
        assert back == cfg
    # Qwen2's layout written as llama holds a zero o_proj bias: out_bias comes back, nothing else changes.
    back = hf.hf_config_to_kdjax(hf.kdjax_to_hf_config(QWEN_LAYOUT, model_type="llama"), max_len=24)
    assert back == dataclasses.replace(QWEN_LAYOUT, out_bias=True)
    # A Mistral export states "no window": left out, transformers would default to 4096 tokens.
    assert hf.kdjax_to_hf_config(LLAMA_GQA, model_type="mistral")["sliding_window"] is None
    with pytest.raises(ValueError, match="cannot be written as mistral"):
        hf.kdjax_to_hf_config(QWEN_LAYOUT, model_type="mistral")

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

    # The same file read with another EOS token is another tokenizer.
    other_eos = Tokenizer.from_str(tokenizer.to_str(), eos_token="a")
    assert hf.compare_tokenizers(tokenizer, other_eos, SAMPLE_TEXTS).startswith("tokenizers differ: EOS id 0")


def test_tokenizer_with_another_eos(tmp_path, llama_dir):
    """A Llama-style tokenizer whose EOS is "</s>": found through tokenizer_config.json, or config.json's
    eos_token_id, kept by an export, and reproduced by AutoTokenizer."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getsource(m) for m in (json, os, shutil)], trainer=trainer)
    with pytest.raises(ValueError, match=re.escape("no EOS token '<|endoftext|>'")):
        Tokenizer(tok)
    direct = Tokenizer(tok, eos_token="</s>")
    assert direct.eos_id == 2 and direct.eos_token == "</s>"
    # The EOS is part of the fingerprint (packed streams are separated by it); the default is the file's hash.
    assert direct.fingerprint != Tokenizer(tok, eos_token="<s>").fingerprint
    assert Tokenizer(tok, eos_token="<s>").encode("a </s> b") == direct.encode("a </s> b")  # literal text

    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    tok.save(os.path.join(path, "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    model, loaded = hf.load_hf(path)
    assert loaded.eos_token == "</s>" and loaded.fingerprint == direct.fingerprint
    assert loaded.encode("abc def") == tok.encode("abc def").ids
    (path / "tokenizer_config.json").unlink()  # config.json's eos_token_id then names it
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    assert hf.load_hf(path)[1].eos_token == "</s>"

    export = tmp_path / "export"
    written = hf.save_hf(export, model, loaded)
    assert written["eos_token_id"] == written["bos_token_id"] == 2
    hf_tok = assert_same_ids(export, loaded)
    assert hf_tok.eos_token == "</s>" and hf_tok("a </s> b")["input_ids"] == direct.encode("a </s> b")
    assert hf.load_hf(export)[1].fingerprint == direct.fingerprint


def test_eos_lookup_failures_are_named(tmp_path, llama_dir):
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["abc def"], trainer=tokenizers.trainers.BpeTrainer(show_progress=False))
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if "token_id" not in k}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot tell the EOS token"):
        hf.load_hf(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        hf.load_hf(path)


def test_the_models_declared_eos_comes_before_endoftext(tmp_path):
    # Qwen2.5-Instruct has "<|endoftext|>" in its vocabulary but ends turns with "<|im_end|>"
    # (tokenizer_config.json's eos_token): rollouts must stop there.
    import json as _json

    import tokenizers
    from tokenizers import models as tok_models

    from kdjax.data import hf_tokenizer

    vocab = {"a": 0, "b": 1, "<|endoftext|>": 2, "<|im_end|>": 3}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="a"))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert hf_tokenizer.load_tokenizer_files(tmp_path).eos_token == "<|endoftext|>"  # nothing declared
    assert hf_tokenizer.load_tokenizer_files(tmp_path, eos_token_id=3).eos_id == 3  # config.json's id
    (tmp_path / "tokenizer_config.json").write_text(_json.dumps({"eos_token": "<|im_end|>"}))
    assert hf_tokenizer.load_tokenizer_files(tmp_path, eos_token_id=2).eos_id == 3  # the tokenizer's own first
