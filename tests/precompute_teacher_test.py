"""The precompute_teacher experiment: a real kdjax teacher over real packed data, then --verify."""

import glob
import hashlib
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
    return config, workdir, manifest, text_data.load_from_config(config.data)


def _random_teacher(config, vocab_size, seed):
    # `seed`: an int or a jax.random.key (nnx.Rngs(n) uses jax.random.key(n)).
    """The :tiny config's random teacher, built here eagerly on one device (precompute builds it jitted and
    sharded FSDP-style over 8 devices): an independent route to the same parameters."""
    model_cfg = TransformerConfig.from_dict(
        {**config.teacher.model.to_dict(), "vocab_size": vocab_size, "max_len": config.data.seq_len}
    )
    return Transformer(model_cfg, rngs=nnx.Rngs(seed))


def test_store_equals_the_teachers_own_top_k(written):
    config, workdir, manifest, data = written
    assert manifest["num_examples"] == len(data.validation) and manifest["k"] == config.k
    # The tokenizer fingerprint is the sha256 of the tokenizer file's bytes, hashed here, not by the loader.
    (tokenizer_file,) = glob.glob(os.path.join(config.data.cache_dir, "tokenizer-*.json"))
    with open(tokenizer_file, "rb") as f:
        assert manifest["tokenizer_fingerprint"] == hashlib.sha256(f.read()).hexdigest()
    # Rebuild the same random teacher and compare its top-k on some examples, read back by id.
    teacher = _random_teacher(config, data.tokenizer.vocab_size, config.seed)
    ids = [0, 5, len(data.validation) - 1]
    tokens = np.stack([data.validation[i]["tokens"] for i in ids])
    logprobs = jax.nn.log_softmax(teacher(tokens[:, :-1]).astype(np.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, config.k)
    stored = teacher_store.open_store(str(workdir / "store-validation"), verify="open").get(ids)
    np.testing.assert_array_equal(stored["teacher_ids"], top_ids)
    # bf16 keeps 8 significant bits: round-to-nearest moves a value x by at most 2^-8 |x| (unit roundoff
    # 2^-8). The two float32 routes (sharded jit vs eager) differ by ~1e-6 before rounding; atol covers
    # that, rtol the rounding.
    np.testing.assert_allclose(stored["teacher_logprobs"].astype(np.float32), top_lp, rtol=2**-8, atol=1e-5)
    label_lp = np.take_along_axis(np.asarray(logprobs), tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(stored["teacher_label_logprob"], label_lp, rtol=1e-5, atol=1e-5)


def test_teacher_fingerprint_and_provenance(written):
    config, workdir, manifest, data = written
    store = teacher_store.open_store(str(workdir / "store-validation"))
    vocab = data.tokenizer.vocab_size
    # The same jitted initialisation as precompute's, but on one device, not sharded over a 4 x 2 mesh and
    # gathered. (Eager initialisation rounds some weights 1 ulp differently from the jitted one.)
    init = jax.jit(lambda key: nnx.split(_random_teacher(config, vocab, key), nnx.Param)[1])  # one compile
    fingerprint = lambda seed: teacher_store.params_fingerprint(init(jax.random.key(seed)))
    # Two routes to the same teacher agree bit for bit.
    assert manifest["teacher_fingerprint"] == fingerprint(config.seed)
    run = dict(
        seq_len=config.data.seq_len,
        tokenizer_fingerprint=data.tokenizer.fingerprint,
        vocab_size=vocab,
        token_source=data.validation,
    )
    teacher_store.check_provenance(store, teacher_fingerprint=fingerprint(config.seed), **run)
    teacher_store.check_provenance(store, **run)  # no teacher configured: allowed
    # Another teacher with the same tokenizer (another seed) is refused, naming it.
    with pytest.raises(teacher_store.StoreMismatchError, match="teacher_fingerprint differs") as error:
        teacher_store.check_provenance(store, teacher_fingerprint=fingerprint(config.seed + 1), **run)
    assert "num_examples differs" not in str(error.value)
    assert "tokenizer_fingerprint differs" not in str(error.value)

    # Other data: fewer corpus files (few, to tokenize quickly), read with the store's tokenizer.
    other_cfg = config.data.copy_and_resolve_references()
    other_cfg.max_files = 20
    tokenizer_path = str(workdir / "tokenizer.json")
    data.tokenizer.save(tokenizer_path)
    other = text_data.load_from_config(other_cfg, tokenizer_path=tokenizer_path)
    assert other.corpus_fingerprint != data.corpus_fingerprint
    with pytest.raises(teacher_store.StoreMismatchError, match="num_examples differs") as error:
        teacher_store.check_provenance(store, **dict(run, token_source=other.train))
    assert "store: %d" % len(data.validation) in str(error.value)
    with pytest.raises(teacher_store.StoreMismatchError, match="holds %d examples" % len(other.train)):
        teacher_store.StoreSource(other.train, store)


def test_rerun_is_a_no_op_and_verify_passes(written):
    config, workdir, manifest, _ = written
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
    _, workdir, manifest, _ = written
    with pytest.raises(teacher_store.StoreMismatchError, match="tokenizer_fingerprint"):
        teacher_store.open_store(str(workdir / "store-validation"), expect_tokenizer_fingerprint="0" * 64)
    with pytest.raises(teacher_store.StoreMismatchError, match="vocab_size"):
        teacher_store.open_store(
            str(workdir / "store-validation"), expect_vocab_size=manifest["vocab_size"] + 1
        )
