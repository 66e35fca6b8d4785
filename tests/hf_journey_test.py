"""The Hugging Face journey of issue #17, tiny and end to end through the real experiment functions:

a Qwen2 teacher built in transformers (random weights, safetensors, a byte-level BPE tokenizer.json with
Qwen2's own pipeline) -> its top-k store (`experiments.precompute_teacher.precompute`) -> a student distilled
offline for 2 steps and exported (`experiments.lm_distill.train` with export_hf_dir) -> `AutoModelForCausalLM`
and `AutoTokenizer` on the export give kdjax's ids and, within 1e-5 in float32, the logits of kdjax's forward
of the trained student (read back from its work directory's checkpoint, not from the export).
"""

import inspect
import json
import os
import string
import textwrap

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from configs import lm_distill as distill_config
from configs import precompute_teacher as precompute_config
from experiments import lm_distill, precompute_teacher
from hf_test import qwen_style_tokenizer  # the tokenizer.json a real Qwen2 checkpoint ships
from kdjax import pretrained, sharding
from kdjax.data import hf_tokenizer

V = 384
MAX_FILES = 12  # a small corpus keeps the store quick (fewer leave the validation split under one example)
TEXTS = (
    "Distillation: the student learns the teacher's distribution.",
    "naïve café, 日本語, emoji 🙂; cafe\u0301 decomposed",
    "  whitespace   runs\t\tand\n\n\nnewlines \r\n",
    "a literal <|endoftext|> inside a document stays text",
    "digits 0123456789 and 3.14159",
)


def make_qwen2_teacher(path):
    """A random tiny Qwen2ForCausalLM saved as HF saves it (safetensors), with its tokenizer.json."""
    tokenizer = qwen_style_tokenizer([inspect.getsource(m) for m in (json, os, string, textwrap)], vocab_size=V)
    hf_config = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf_config).save_pretrained(path)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(path))
    return tokenizer


def test_hf_qwen2_teacher_to_store_to_student_to_transformers(tmp_path):
    teacher_dir, export_dir = str(tmp_path / "qwen2_teacher"), str(tmp_path / "export")
    teacher_tokenizer = make_qwen2_teacher(teacher_dir)

    # 1. The teacher's top-k store over the train split, read with the teacher's own tokenizer.
    pc = precompute_config.get_config("tiny")
    pc.data.cache_dir, pc.data.max_files, pc.data.vocab_size = str(tmp_path / "cache"), MAX_FILES, V
    pc.teacher.hf_path = teacher_dir
    manifest = precompute_teacher.precompute(pc, str(tmp_path / "store"))
    assert manifest["vocab_size"] == V
    assert manifest["tokenizer_fingerprint"] == teacher_tokenizer.fingerprint

    # 2. A student with Qwen2's layout (q/k/v biases), distilled offline for 2 steps, exported at the end.
    config = distill_config.get_config("tiny")
    config.data = pc.data
    config.teacher.hf_path = teacher_dir
    config.store_dir = str(tmp_path / "store" / "store-train")
    config.export_hf_dir = export_dir
    config.model.qkv_bias = True
    workdir = str(tmp_path / "student")
    result = lm_distill.train(config, workdir)
    assert np.isfinite(result["val/kl"])

    # 3. transformers loads the export as Qwen2, with kdjax's ids and logits.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    student = pretrained.load_workdir(workdir, mesh=mesh, rules=sharding.DEFAULT_RULES)
    assert student.step == config.steps and student.config.qkv_bias and not student.config.out_bias
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager")
    assert type(torch_model).__name__ == "Qwen2ForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    ids = []
    for text in TEXTS + hf_tokenizer.PROBE_TEXTS:
        want = student.tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == want == teacher_tokenizer.encode(text), text
        ids += want + [student.tokenizer.eos_id]
    assert hf_tok.eos_token_id == student.tokenizer.eos_id

    tokens_bt = np.asarray(ids[: 4 * 24], np.int32).reshape(4, 24)
    graphdef, params = nnx.split(student.model())
    ours = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, tokens_bt))
    with torch.no_grad():
        theirs = torch_model.eval()(torch.tensor(tokens_bt, dtype=torch.long)).logits.numpy()
    assert ours.dtype == theirs.dtype == np.float32 and np.abs(ours).max() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)

    # The export's length is the model's (RoPE: Qwen2's default), not the 32-token training length.
    with open(os.path.join(export_dir, "config.json")) as f:
        written = json.load(f)
    assert written["max_position_embeddings"] == transformers.Qwen2Config().max_position_embeddings
    assert hf_tok.model_max_length == written["max_position_embeddings"] != config.data.seq_len
