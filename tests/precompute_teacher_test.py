"""The precompute_teacher experiment: a real kdjax teacher over real packed data, then --verify."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import precompute_teacher as precompute_config
from experiments import precompute_teacher
from kdjax import teacher_store
from kdjax.data import text as text_data
from kdjax.models.transformer import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = precompute_config.get_config("tiny")
    config.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    config.split = "validation"
    config.mesh.fsdp = 2  # the teacher sharded FSDP-style over the 8 test devices (data=4 x fsdp=2)
    workdir = tmp_path_factory.mktemp("store")
    manifest = precompute_teacher.precompute(config, str(workdir))
    return config, workdir, manifest


def test_store_equals_the_teachers_own_top_k(written):
    config, workdir, manifest = written
    data = text_data.load_from_config(config.data)
    assert manifest["num_examples"] == len(data.validation) and manifest["k"] == config.k
    assert manifest["tokenizer_fingerprint"] == data.tokenizer.fingerprint
    # Rebuild the same random teacher and compare its top-k on some examples, read back by id.
    model_cfg = TransformerConfig.from_dict(
        {
            **config.teacher.model.to_dict(),
            "vocab_size": data.tokenizer.vocab_size,
            "max_len": config.data.seq_len,
        }
    )
    teacher = Transformer(model_cfg, rngs=nnx.Rngs(config.seed))
    ids = [0, 5, len(data.validation) - 1]
    tokens = np.stack([data.validation[i]["tokens"] for i in ids])
    logprobs = jax.nn.log_softmax(teacher(tokens[:, :-1]).astype(np.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, config.k)
    stored = teacher_store.open_store(str(workdir / "store-validation"), verify="open").get(ids)
    np.testing.assert_array_equal(stored["teacher_ids"], top_ids)
    np.testing.assert_allclose(stored["teacher_logprobs"].astype(np.float32), top_lp, rtol=1e-2, atol=1e-2)
    label_lp = np.take_along_axis(np.asarray(logprobs), tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(stored["teacher_label_logprob"], label_lp, rtol=1e-5, atol=1e-5)


def test_rerun_is_a_no_op_and_verify_passes(written):
    config, workdir, manifest = written
    before = {p: os.path.getmtime(p) for p in (workdir / "store-validation").rglob("*")}
    again = precompute_teacher.precompute(config, str(workdir))
    assert again == manifest
    assert {p: os.path.getmtime(p) for p in (workdir / "store-validation").rglob("*")} == before
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.precompute_teacher",
            "--config",
            "configs/precompute_teacher.py:tiny",
            "--workdir",
            str(workdir),
            "--config.split=validation",
            "--verify",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and ": OK;" in proc.stdout, proc.stdout + proc.stderr


def test_store_refuses_another_tokenizer(written):
    _, workdir, manifest = written
    with pytest.raises(teacher_store.StoreMismatchError, match="tokenizer_fingerprint"):
        teacher_store.open_store(str(workdir / "store-validation"), expect_tokenizer_fingerprint="0" * 64)
    with pytest.raises(teacher_store.StoreMismatchError, match="vocab_size"):
        teacher_store.open_store(
            str(workdir / "store-validation"), expect_vocab_size=manifest["vocab_size"] + 1
        )
