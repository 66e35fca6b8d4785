"""Teacher store: exact round trip, crash-safe resume, checksums, mismatches, any process count."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kdjax import teacher_store
import store_writer_helper as helper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(path, **kwargs):
    store = teacher_store.open_store(path, **kwargs)
    return store.get(np.arange(len(store)))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def teacher_topk(tokens, *, k, vocab_size=helper.VOCAB_SIZE):
    """The teacher's own top-k, run at the writer's batch size: f32 logits of near-tied ids deep
    in the tail can differ by an ulp between matmul shapes, which would reorder them at k = V."""
    _, logits_fn = helper.toy_teacher(vocab_size)
    fn = jax.jit(lambda t: teacher_store.topk_targets(logits_fn(t[:, :-1]), t[:, 1:], k=k))
    b = helper.BATCH_SIZE
    tokens = np.stack(tokens)
    padded = np.concatenate([tokens, np.zeros((-len(tokens) % b, tokens.shape[1]), np.int32)])
    parts = [fn(padded[i : i + b]) for i in range(0, len(padded), b)]
    return {name: np.concatenate([p[name] for p in parts])[: len(tokens)] for name in parts[0]}


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    """A store written in one uninterrupted run; tests copy it before changing anything."""
    path = str(tmp_path_factory.mktemp("clean") / "store")
    helper.write(path)
    return path


def test_topk_targets_matches_float64_reference():
    v = 50
    logits = np.random.default_rng(0).normal(size=(2, 3, v)).astype(np.float32) * 3
    logits[0, 0, 7] = 40.0  # top-k holds all but ~e^-40 of the mass: log(1 - sum) would give 0
    labels = np.random.default_rng(1).integers(0, v, (2, 3))
    out = jax.jit(lambda x, y: teacher_store.topk_targets(x, y, k=5))(logits, labels)

    logp = logits.astype(np.float64)
    logp -= np.log(np.sum(np.exp(logp - logp.max(-1, keepdims=True)), -1, keepdims=True)) + logp.max(
        -1, keepdims=True
    )
    ids = np.argsort(-logp, axis=-1)[..., :5]
    np.testing.assert_array_equal(out["teacher_ids"], ids)
    np.testing.assert_allclose(
        out["teacher_logprobs"], np.take_along_axis(logp, ids, -1), rtol=1e-6, atol=1e-5
    )
    np.testing.assert_allclose(
        out["teacher_label_logprob"],
        np.take_along_axis(logp, labels[..., None], -1)[..., 0],
        rtol=1e-6,
        atol=1e-5,
    )
    tail = np.copy(logp)
    np.put_along_axis(tail, ids, -np.inf, -1)
    tail_ref = np.log(np.sum(np.exp(tail), -1))
    assert tail_ref[0, 0] < -30
    np.testing.assert_allclose(out["teacher_tail_logprob"], tail_ref, rtol=1e-5)
    # Top-k plus tail is the whole distribution.
    total = jax.nn.logsumexp(
        jnp.concatenate([out["teacher_logprobs"], out["teacher_tail_logprob"][..., None]], -1), -1
    )
    np.testing.assert_allclose(total, 0.0, atol=1e-5)

    full = teacher_store.topk_targets(logits, labels, k=v)
    assert np.all(np.isneginf(full["teacher_tail_logprob"]))
    np.testing.assert_array_equal(np.sort(full["teacher_ids"], -1), np.broadcast_to(np.arange(v), (2, 3, v)))


def test_id_dtype_is_narrowest():
    assert teacher_store.id_dtype_for_vocab(256) == np.uint8
    assert teacher_store.id_dtype_for_vocab(257) == np.uint16
    assert teacher_store.id_dtype_for_vocab(65_536) == np.uint16
    assert teacher_store.id_dtype_for_vocab(65_537) == np.uint32
    assert teacher_store.id_dtype_for_vocab(152_064) == np.uint32


@pytest.mark.parametrize("k", [8, helper.VOCAB_SIZE])
def test_round_trip_equals_teacher_topk(k, clean_store, tmp_path):
    if k == 8:
        path = clean_store
    else:
        path = str(tmp_path / "store")
        helper.write(path, k=k, source=helper.TokenSource(num_examples=10))
    store = teacher_store.open_store(
        path, expect_vocab_size=helper.VOCAB_SIZE, expect_tokenizer_fingerprint="sha256:toy-tokenizer"
    )
    manifest = store.manifest
    assert manifest["complete"] and manifest["k"] == k and manifest["id_dtype"] == "uint16"
    assert manifest["logprob_dtype"] == "bfloat16" and manifest["seq_len"] == helper.SEQ_LEN
    # Target: 4.5 k + 16 bytes per token. The ~0.5 KB zarr.json per field and shard is
    # negligible at real shard sizes but not at 128 tokens a shard, so count array bytes here.
    data_bytes = sum(
        size
        for shard in manifest["shards"]
        for name, size in shard["files"].items()
        if not name.endswith("zarr.json")
    )
    assert data_bytes / manifest["num_tokens"] <= 4.5 * k + 16

    source = helper.TokenSource(num_examples=len(store))
    ids = np.arange(len(store))[::-1]  # any order
    want = teacher_topk([source[i]["tokens"] for i in ids], k=k)
    got = store.get(ids)
    assert got["teacher_ids"].dtype == np.int32
    assert got["teacher_logprobs"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["teacher_ids"], want["teacher_ids"])
    np.testing.assert_allclose(
        got["teacher_logprobs"].astype(np.float32), want["teacher_logprobs"], rtol=2**-8, atol=1e-6
    )
    for name in ("teacher_label_logprob", "teacher_tail_logprob"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    if k == helper.VOCAB_SIZE:
        assert np.all(np.isneginf(got["teacher_tail_logprob"]))

    repeated = store.get([3, 3, 0])
    np.testing.assert_array_equal(repeated["teacher_ids"], got["teacher_ids"][::-1][[3, 3, 0]])

    # The grain source joins tokens and teacher by example id and batches through _getitems;
    # it pickles (for grain worker processes) and reopens the store there.
    dataset = grain.MapDataset.source(
        pickle.loads(pickle.dumps(teacher_store.StoreSource(source, store)))
    ).batch(4)
    batch = dataset[1]
    assert batch["tokens"].shape == (4, helper.SEQ_LEN + 1)
    assert batch["teacher_ids"].shape == (4, helper.SEQ_LEN, k)
    assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)
    np.testing.assert_array_equal(batch["example_id"], [4, 5, 6, 7])
    np.testing.assert_array_equal(batch["teacher_label_logprob"], got["teacher_label_logprob"][::-1][4:8])
    assert teacher_store.verify_store(path)["ok"]


def test_wide_vocab_stores_uint32_ids_compactly(tmp_path):
    vocab_size, k = 70_000, 4
    path = str(tmp_path / "store")
    source = helper.TokenSource(num_examples=3, seq_len=64, vocab_size=vocab_size)
    helper.write(path, k=k, vocab_size=vocab_size, source=source)
    store = teacher_store.open_store(path, expect_vocab_size=vocab_size)
    assert store.manifest["id_dtype"] == "uint32"
    got = store.get(np.arange(3))
    want = teacher_topk([source[i]["tokens"] for i in range(3)], k=k, vocab_size=vocab_size)
    np.testing.assert_array_equal(got["teacher_ids"], want["teacher_ids"])
    # Bit-shuffled lz4 drops the empty top bit planes: well under 4 bytes per id, even with
    # ~36 bytes of blosc header, crc and index per 256-id chunk.
    ids_bytes = sum(
        size
        for name, size in store.manifest["shards"][0]["files"].items()
        if name.startswith("teacher_ids/c/")
    )
    assert ids_bytes / got["teacher_ids"].size < 3.0


def test_sigkill_mid_write_then_rerun_completes_exactly_once(clean_store, tmp_path):
    path = str(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tests", "store_writer_helper.py"),
            path,
            "--delay_s",
            "0.1",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    first_record = os.path.join(path, "shards", "00000.json")
    deadline = time.monotonic() + 60
    while not os.path.exists(first_record):
        assert writer.poll() is None, writer.stderr.read().decode()
        assert time.monotonic() < deadline, "writer never completed a shard"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stderr.close()
    assert not os.path.exists(os.path.join(path, "manifest.json")), "killed too late"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        teacher_store.open_store(path)
    # Also leave what a kill in the other windows would: a shard renamed into place but not yet
    # recorded, a half-written temporary shard and a half-written record.
    shards_dir = os.path.join(path, "shards")
    assert not os.path.exists(os.path.join(shards_dir, "00004.json"))
    for junk in ("00004/teacher_ids", "00004.tmp-dead/teacher_ids"):
        os.makedirs(os.path.join(shards_dir, junk), exist_ok=True)
        with open(os.path.join(shards_dir, junk, "zarr.json"), "w") as f:
            f.write("{half")
    with open(os.path.join(shards_dir, "00004.json.tmp-dead"), "w") as f:
        f.write("{half")

    manifest = helper.write(path)
    assert manifest["complete"]
    report = teacher_store.verify_store(path)
    assert report["ok"], report["problems"]
    assert not [name for name in os.listdir(os.path.join(path, "shards")) if ".tmp-" in name]
    assert_same(read_all(path), read_all(clean_store))


def test_flipped_byte_names_the_shard(clean_store, tmp_path):
    path = str(tmp_path / "store")
    shutil.copytree(clean_store, path)
    data_file = os.path.join(path, "shards", "00001", "teacher_logprobs", "c", "0", "0", "0")
    with open(data_file, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))

    store = teacher_store.open_store(path)
    store.get([0, 7, 16])  # shards 0 and 2 are fine
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt"):
        store.get([8])
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt"):
        teacher_store.open_store(path, verify="open")
    # Without the sha256, zarr's per-chunk crc32c still stops the bad bytes.
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt"):
        teacher_store.open_store(path, verify="none").get(np.arange(8, 16))
    report = teacher_store.verify_store(path)
    assert not report["ok"] and "shard 00001" in " ".join(report["problems"])


def test_student_mismatch_is_refused_naming_the_field(clean_store):
    with pytest.raises(teacher_store.StoreMismatchError, match="tokenizer_fingerprint differs"):
        teacher_store.open_store(clean_store, expect_tokenizer_fingerprint="sha256:other")
    with pytest.raises(teacher_store.StoreMismatchError, match="vocab_size differs") as error:
        teacher_store.open_store(
            clean_store, expect_vocab_size=301, expect_tokenizer_fingerprint="sha256:toy-tokenizer"
        )
    assert "tokenizer" not in str(error.value)
    store = teacher_store.open_store(clean_store)
    with pytest.raises(teacher_store.StoreMismatchError, match="seq_len"):
        teacher_store.StoreSource(helper.TokenSource(seq_len=helper.SEQ_LEN + 1), store)
    with pytest.raises(KeyError, match="not in teacher store"):
        teacher_store.StoreSource(helper.TokenSource(num_examples=41), store)[40]


def test_two_writers_equal_one_and_finished_store_is_kept(clean_store, tmp_path):
    path = str(tmp_path / "store")
    assert helper.write(path, process_index=1, process_count=2) is None  # shards 1, 3
    manifest = helper.write(path, process_index=0, process_count=2)  # shards 0, 2, 4; finalizes
    with open(os.path.join(clean_store, "manifest.json")) as f:
        assert manifest == json.load(f)  # same per-shard checksums: byte-identical shards
    assert_same(read_all(path), read_all(clean_store))

    mtimes = {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in ("manifest.json",)}
    shard_mtime = os.stat(os.path.join(path, "shards", "00000")).st_mtime_ns
    assert helper.write(path) == manifest
    assert os.stat(os.path.join(path, "manifest.json")).st_mtime_ns == mtimes["manifest.json"]
    assert os.stat(os.path.join(path, "shards", "00000")).st_mtime_ns == shard_mtime
    with pytest.raises(teacher_store.StoreMismatchError, match="k differs"):
        helper.write(path, k=4)


def test_params_as_argument_equals_closure(clean_store, tmp_path):
    params, _ = helper.toy_teacher()
    path = str(tmp_path / "store")
    manifest = teacher_store.write_store(
        path,
        source=helper.TokenSource(),
        logits_fn=helper.toy_apply,
        params=params,
        k=8,
        batch_size=helper.BATCH_SIZE,
        examples_per_shard=helper.EXAMPLES_PER_SHARD,
        manifest=helper.manifest_for(params),
        progress=False,
    )
    assert [s["sha256"] for s in manifest["shards"]] == [
        s["sha256"] for s in teacher_store.open_store(clean_store).manifest["shards"]
    ]


def test_reader_slices_cover_all_ids_disjointly(clean_store):
    store = teacher_store.open_store(clean_store)
    source = helper.TokenSource()
    whole = teacher_store.StoreSource(source, store)
    slices = [
        teacher_store.StoreSource(
            source, teacher_store.open_store(clean_store), process_index=p, process_count=3
        )
        for p in range(3)
    ]
    items = [item for part in slices for item in part._getitems(range(len(part)))]
    assert [int(item["example_id"]) for item in items] == list(range(helper.NUM_EXAMPLES))
    for item, want in zip(items, whole._getitems(range(len(whole)))):
        assert_same(item, want)


def test_writer_refuses_bad_resumes_and_sources(tmp_path):
    path = str(tmp_path / "store")
    helper.write(path, process_index=0, process_count=5)  # one shard of five: incomplete
    with pytest.raises(teacher_store.StoreMismatchError, match="k differs .*store: 8.*requested: 4"):
        helper.write(path, k=4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(FileExistsError, match="not a teacher store"):
        helper.write(str(tmp_path / "other"))

    class Shifted(helper.TokenSource):
        def __getitem__(self, i):
            return dict(super().__getitem__(i), example_id=np.int64(i + 1))

    with pytest.raises(ValueError, match="example_id == i"):
        helper.write(str(tmp_path / "shifted"), source=Shifted())


def test_params_fingerprint_is_deterministic_and_sensitive():
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": jnp.ones(3)}}
    fingerprint = teacher_store.params_fingerprint(params)
    assert fingerprint == teacher_store.params_fingerprint(jax.tree.map(np.copy, params))
    changed = jax.tree.map(np.copy, params)
    changed["a"][1, 2] += 1
    renamed = {"a2": params["a"], "b": params["b"]}
    cast = dict(params, a=params["a"].astype(np.float16))
    reshaped = dict(params, a=params["a"].reshape(3, 2))
    others = {teacher_store.params_fingerprint(p) for p in (changed, renamed, cast, reshaped)}
    assert fingerprint not in others and len(others) == 4


def test_file_fingerprint(tmp_path):
    (tmp_path / "a.json").write_text('{"model": 1}')
    (tmp_path / "b.json").write_text('{"model": 2}')
    a = teacher_store.file_fingerprint(tmp_path / "a.json")
    assert a.startswith("sha256:") and a == teacher_store.file_fingerprint(tmp_path / "a.json")
    assert a != teacher_store.file_fingerprint(tmp_path / "b.json")
