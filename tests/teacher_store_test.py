"""Teacher store: exact round trip, crash-safe resume, checksums, mismatches, any process count."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import hashlib
import threading

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kdjax import teacher_store
import store_writer_helper as helper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hashed here, not by the store: the store's tokenizer_fingerprint must be the sha256 of the JSON's bytes.
TOY_TOKENIZER_SHA256 = hashlib.sha256(helper.TOKENIZER_JSON.encode("utf-8")).hexdigest()


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
        path, expect_vocab_size=helper.VOCAB_SIZE, expect_tokenizer_fingerprint=TOY_TOKENIZER_SHA256
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
    for junk in ("00004.json.tmp-dead", ".00004.json.x1y2.tmp"):  # old and hostio temporary names
        with open(os.path.join(shards_dir, junk), "w") as f:
            f.write("{half")

    manifest = helper.write(path)
    assert manifest["complete"]
    report = teacher_store.verify_store(path)
    assert report["ok"], report["problems"]
    assert not [name for name in os.listdir(os.path.join(path, "shards")) if "tmp" in name]
    assert_same(read_all(path), read_all(clean_store))
    with open(os.path.join(clean_store, "manifest.json")) as f:
        assert manifest == json.load(f)  # byte-identical shards (same per-shard sha256)


def test_flipped_byte_names_the_shard(clean_store, tmp_path, monkeypatch):
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
    hashed = []
    real_hash = teacher_store._hash_shard
    monkeypatch.setattr(teacher_store, "_hash_shard", lambda d: hashed.append(d) or real_hash(d))
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt") as first:
        store.get([8])
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt") as again:
        store.get([9])  # remembered: prefetch threads do not hash a bad shard again and again
    assert len(hashed) == 1 and str(again.value) == str(first.value)
    monkeypatch.undo()
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt"):
        teacher_store.open_store(path, verify="open")
    # Without the sha256, zarr's per-chunk crc32c still stops the bad bytes: one exception whose message
    # carries tensorstore's, no chained second traceback.
    crc_message = "shard 00001 is corrupt .*Digest mismatch"
    with pytest.raises(teacher_store.CorruptShardError, match=crc_message) as crc:
        teacher_store.open_store(path, verify="none").get(np.arange(8, 16))
    assert crc.value.__cause__ is None and crc.value.__suppress_context__
    report = teacher_store.verify_store(path)
    assert not report["ok"] and "shard 00001" in " ".join(report["problems"])


def test_student_mismatch_is_refused_naming_the_field(clean_store):
    with pytest.raises(teacher_store.StoreMismatchError, match="tokenizer_fingerprint differs"):
        teacher_store.open_store(clean_store, expect_tokenizer_fingerprint="sha256:other")
    with pytest.raises(teacher_store.StoreMismatchError, match="vocab_size differs") as error:
        teacher_store.open_store(
            clean_store, expect_vocab_size=301, expect_tokenizer_fingerprint=TOY_TOKENIZER_SHA256
        )
    assert "tokenizer_fingerprint differs" not in str(error.value)
    # The message says which teacher and tokenizer the store was written from.
    assert "toy teacher, seed 0" in str(error.value)
    assert os.path.join(clean_store, "tokenizer.json") in str(error.value)
    store = teacher_store.open_store(clean_store)
    with pytest.raises(teacher_store.StoreMismatchError, match="seq_len"):
        teacher_store.StoreSource(helper.TokenSource(seq_len=helper.SEQ_LEN + 1), store)
    with pytest.raises(teacher_store.StoreMismatchError, match="holds 41 examples but .* holds 40"):
        teacher_store.StoreSource(helper.TokenSource(num_examples=41), store)
    with pytest.raises(KeyError, match="not in teacher store"):
        store.get([40])


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
        tokenizer=helper.TOKENIZER_JSON,
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
    # The same values laid out over 8 devices (gathered leaf by leaf) fingerprint as the host copy.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    on_mesh = lambda x, *axes: jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
    )
    spread = {
        "a": on_mesh(jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6), "a", "b"),
        "b": {"c": on_mesh(jnp.ones(4), "a")},
    }
    assert len(spread["a"].sharding.device_set) == 8
    host = {"a": np.arange(8 * 6, dtype=np.float32).reshape(8, 6), "b": {"c": np.ones(4, np.float32)}}
    assert teacher_store.params_fingerprint(spread) == teacher_store.params_fingerprint(host)


def test_file_fingerprint(tmp_path):
    (tmp_path / "a.json").write_text('{"model": 1}')
    (tmp_path / "b.json").write_text('{"model": 2}')
    a = teacher_store.file_fingerprint(tmp_path / "a.json")
    assert a.startswith("sha256:") and a == teacher_store.file_fingerprint(tmp_path / "a.json")
    assert a != teacher_store.file_fingerprint(tmp_path / "b.json")


# --------------------------------------------------------------------------------------------
# Provenance: another teacher, other data, one mismatched example, an older format.


def test_store_from_another_teacher_is_refused_when_a_teacher_is_configured(clean_store):
    store = teacher_store.open_store(clean_store)
    same = teacher_store.params_fingerprint(helper.toy_teacher(seed=0)[0])
    other = teacher_store.params_fingerprint(helper.toy_teacher(seed=1)[0])  # same vocabulary and tokenizer
    assert other != same
    common = dict(
        dataset="toy",
        split="train",
        num_examples=helper.NUM_EXAMPLES,
        seq_len=helper.SEQ_LEN,
        tokenizer_fingerprint=TOY_TOKENIZER_SHA256,
        vocab_size=helper.VOCAB_SIZE,
        token_source=helper.TokenSource(),
    )
    teacher_store.check_provenance(store, teacher_fingerprint=same, **common)
    with pytest.raises(teacher_store.StoreMismatchError, match="teacher_fingerprint differs") as error:
        teacher_store.check_provenance(store, teacher_fingerprint=other, **common)
    assert "toy teacher, seed 0" in str(error.value)  # names the teacher the store came from
    for key in ("dataset", "num_examples", "seq_len", "tokenizer_fingerprint", "vocab_size", "split"):
        assert f"{key} differs" not in str(error.value)
    # Without a teacher model, a store is the teacher: no fingerprint to compare.
    teacher_store.check_provenance(store, **common)


def test_store_over_other_data_is_refused_before_any_step_naming_every_difference(tmp_path):
    # The store was written over 40 examples of dataset "toy-a" (as precompute with max_files=80 would), the
    # student reads 32 examples of dataset "toy-b" (max_files=60).
    path = str(tmp_path / "store")
    helper.write(path, dataset="toy-a")
    store = teacher_store.open_store(path)
    student_data = helper.TokenSource(num_examples=32, seed=2)
    with pytest.raises(teacher_store.StoreMismatchError) as error:
        teacher_store.check_provenance(
            store, dataset="toy-b", split="train", token_source=student_data, seq_len=helper.SEQ_LEN
        )
    message = str(error.value)
    assert "dataset differs (store: 'toy-a', this run: 'toy-b')" in message
    assert "num_examples differs (store: 40, this run: 32)" in message
    assert "seq_len differs" not in message and "split differs" not in message
    with pytest.raises(teacher_store.StoreMismatchError, match="holds 32 examples"):
        teacher_store.StoreSource(student_data, store)
    # The same count and dataset name over other tokens (an edited file, a stale cache): the sampled
    # checksums catch it, and so does the source before any thread starts.
    edited = helper.TokenSource(num_examples=helper.NUM_EXAMPLES, seed=2)
    with pytest.raises(teacher_store.StoreMismatchError, match="8 of 8 sampled examples .*other data"):
        teacher_store.check_provenance(store, dataset="toy-a", token_source=edited)
    with pytest.raises(teacher_store.StoreMismatchError, match="example 0: its tokens hash to"):
        teacher_store.StoreSource(edited, store)


class OneExampleEdited(helper.TokenSource):
    """The store's data with one token of one example changed."""

    def __init__(self, edited_id):
        super().__init__()
        self._tokens = self._tokens.copy()
        self._tokens[edited_id, 5] = (self._tokens[edited_id, 5] + 1) % helper.VOCAB_SIZE


def test_every_served_example_is_checked_against_its_tokens(clean_store):
    source = teacher_store.StoreSource(OneExampleEdited(13), teacher_store.open_store(clean_store))
    dataset = grain.MapDataset.source(source).batch(4)
    good = [dataset[i] for i in (0, 1, 2, 4)]  # batches without example 13 are served
    assert [int(b["example_id"][0]) for b in good] == [0, 4, 8, 16]
    with pytest.raises(teacher_store.StoreMismatchError, match="example 13: its tokens hash to") as error:
        dataset[3]
    assert clean_store in str(error.value)
    batch_message = "example 13: .*1 of 4 examples of this batch differ"
    with pytest.raises(teacher_store.StoreMismatchError, match=batch_message):
        source._getitems(range(12, 16))  # grain's batched read
    # verify_store with the token source finds it too.
    report = teacher_store.verify_store(clean_store, token_source=OneExampleEdited(13))
    assert report["problems"] == ["shard 00001: examples [13] hold targets of other tokens"]
    assert teacher_store.verify_store(clean_store, token_source=helper.TokenSource())["ok"]


def test_store_of_the_previous_format_is_refused_with_the_rerun_message(clean_store, tmp_path):
    path = str(tmp_path / "store")
    shutil.copytree(clean_store, path)
    for name in ("manifest.json", "config.json"):
        with open(os.path.join(path, name)) as f:
            old = json.load(f)
        old["format_version"] = 1
        with open(os.path.join(path, name), "w") as f:
            json.dump(old, f)
    rerun = "format_version 1; this kdjax reads and writes format 2 .* re-run experiments.precompute_teacher"
    with pytest.raises(teacher_store.StoreMismatchError, match=rerun):
        teacher_store.open_store(path)
    with pytest.raises(teacher_store.StoreMismatchError, match=rerun):
        helper.write(path)
    os.remove(os.path.join(path, "manifest.json"))  # a partial store of the old format: the same
    with pytest.raises(teacher_store.StoreMismatchError, match=rerun):
        helper.write(path)
    report = teacher_store.verify_store(path)
    assert not report["ok"] and "incomplete" in report["problems"][0]


def test_store_keeps_its_tokenizer_and_says_where_its_teacher_came_from(clean_store, tmp_path):
    kept = teacher_store.store_tokenizer_path(clean_store)
    with open(kept, encoding="utf-8") as f:
        assert f.read() == helper.TOKENIZER_JSON
    assert teacher_store.open_store(clean_store).manifest["tokenizer_fingerprint"] == TOY_TOKENIZER_SHA256

    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    record = teacher_store.teacher_record(workdir=str(teacher_dir))
    assert teacher_store.describe_teacher({"teacher": record}).endswith(
        f"(--config.teacher.workdir={teacher_dir})"
    )
    hf = teacher_store.teacher_record(hf_path="org/model")
    assert "(--config.teacher.hf_path=org/model)" in teacher_store.describe_teacher({"teacher": hf})
    with pytest.raises(ValueError, match="not both"):
        teacher_store.teacher_record(workdir="a", hf_path="b")

    # Without the tokenizer, the caller must give its fingerprint; nothing is kept, and asking says so.
    path = str(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="give the tokenizer"):
        helper.write(path, tokenizer=None, source=helper.TokenSource(num_examples=8))
    assert not os.path.exists(path)  # refused before anything was written
    params, logits_fn = helper.toy_teacher()
    manifest = dict(helper.manifest_for(params), tokenizer_fingerprint=TOY_TOKENIZER_SHA256)
    small = dict(logits_fn=logits_fn, k=4, batch_size=3, examples_per_shard=8)
    small["source"] = helper.TokenSource(num_examples=8)
    teacher_store.write_store(path, manifest=manifest, progress=False, **small)
    with pytest.raises(FileNotFoundError, match="keeps no tokenizer.json .*toy teacher, seed 0"):
        teacher_store.store_tokenizer_path(path)
    with pytest.raises(ValueError, match="is not the given tokenizer's"):
        teacher_store.write_store(
            str(tmp_path / "conflict"), manifest=manifest, tokenizer='{"another": 1}', **small
        )
    assert not os.path.exists(tmp_path / "conflict")

    # verify_store checks the kept tokenizer against the manifest.
    copy = str(tmp_path / "copy")
    shutil.copytree(clean_store, copy)
    with open(os.path.join(copy, "tokenizer.json"), "a") as f:
        f.write(" ")
    report = teacher_store.verify_store(copy)
    assert not report["ok"] and "tokenizer.json hashes to" in report["problems"][0]


# --------------------------------------------------------------------------------------------
# Clean failure, finding and verifying every store, the writer's pieces.


def _corrupt_copy(clean_store, path):
    shutil.copytree(clean_store, path)
    data_file = os.path.join(path, "shards", "00001", "teacher_logprobs", "c", "0", "0", "0")
    with open(data_file, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("verify", ["lazy", "none"])
def test_corrupt_shard_mid_run_fails_with_one_clear_error(clean_store, tmp_path, verify):
    path = str(tmp_path / "store")
    _corrupt_copy(clean_store, path)
    # In this process: the error reaches the consumer of the grain iterator as itself, unchained.
    from kdjax.data import pipeline  # pylint: disable=g-import-not-at-top

    store = teacher_store.open_store(path, verify=verify)
    dataset = pipeline.train_dataset(
        teacher_store.StoreSource(helper.TokenSource(), store), batch_size=4, seed=0, num_epochs=1
    )
    iterator = pipeline.train_iterator(dataset, num_threads=4)
    with pytest.raises(teacher_store.CorruptShardError, match="shard 00001 is corrupt") as error:
        for _ in iterator:
            pass
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__
    iterator.close()
    store.close()
    with pytest.raises(ValueError, match="is closed"):
        store.get([0])
    # As a program whose run dies on it: one traceback, ending in the CorruptShardError, and nothing from
    # the prefetch threads or the interpreter's shutdown.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "store_writer_helper.py"), path, "--read"]
        + ["--verify", verify],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    last = proc.stderr.strip().splitlines()
    errors = [line for line in last if "Error" in line and not line.startswith(" ")]
    assert len(errors) == 1, proc.stderr
    want = "kdjax.teacher_store.CorruptShardError: teacher store shard 00001"
    assert errors[0].startswith(want), proc.stderr
    noise = ("cannot schedule", "Exception in thread", "direct cause", "During handling", "Exception ignored")
    assert not [n for n in noise if n in proc.stderr], proc.stderr


def test_find_and_verify_every_store_under_a_root(clean_store, tmp_path):
    root = tmp_path / "stores"
    root.mkdir()
    shutil.copytree(clean_store, root / "store-train")
    validation = helper.TokenSource(num_examples=8)
    helper.write(str(root / "store-validation"), split="validation", source=validation)
    (root / "notes").mkdir()
    assert teacher_store.find_stores(str(root)) == [str(root / "store-train"), str(root / "store-validation")]
    assert teacher_store.find_stores(str(root / "store-train")) == [str(root / "store-train")]

    reports = teacher_store.verify_stores(str(root))
    assert list(reports) == [str(root / "store-train"), str(root / "store-validation")]
    assert all(r["ok"] for r in reports.values())
    os.remove(root / "store-validation" / "shards" / "00000" / "example_id" / "zarr.json")
    reports = teacher_store.verify_stores(str(root))
    assert reports[str(root / "store-train")]["ok"] and not reports[str(root / "store-validation")]["ok"]
    assert list(teacher_store.verify_stores(str(root), split="train")) == [str(root / "store-train")]
    present = r"no teacher store of split 'test' under .*\['train', 'validation'\]"
    with pytest.raises(FileNotFoundError, match=present):
        teacher_store.verify_stores(str(root), split="test")
    with pytest.raises(FileNotFoundError, match="no teacher store under"):
        teacher_store.verify_stores(str(root / "notes"))


def test_shard_assembler_completes_each_shard_exactly_when_its_last_row_arrives():
    identity = dict(
        seq_len=2, k=3, id_dtype="uint16", logprob_dtype="float32", examples_per_shard=4, num_examples=10
    )
    assembler = teacher_store.ShardAssembler(identity)
    order = np.random.default_rng(0).permutation(10)
    seen, done = set(), {}
    for begin in range(0, 10, 3):
        ids = order[begin : begin + 3].tolist()
        rows = np.array(ids + [99] * (4 - len(ids)), np.float32)  # padding rows (99) past the ids
        outputs = {
            "teacher_ids": np.broadcast_to(rows[:, None, None], (4, 2, 3)).astype(np.int32),
            "teacher_logprobs": -np.broadcast_to(rows[:, None, None], (4, 2, 3)),
            "teacher_label_logprob": -np.broadcast_to(rows[:, None], (4, 2)),
            "teacher_tail_logprob": -np.broadcast_to(rows[:, None], (4, 2)),
        }
        seen.update(ids)
        for shard, arrays in assembler.add(ids, outputs, np.array(ids, np.uint64) * 7):
            lo, hi = 4 * shard, min(4 * shard + 4, 10)
            assert set(range(lo, hi)) <= seen and shard not in done  # complete, and only once
            done[shard] = arrays
        # Every shard whose rows have all arrived has been returned.
        assert {s for s in range(3) if set(range(4 * s, min(4 * s + 4, 10))) <= seen} == set(done)
    assert sorted(done) == [0, 1, 2] and assembler.partial_shards == []
    for shard, arrays in done.items():
        ids = np.arange(4 * shard, min(4 * shard + 4, 10))
        np.testing.assert_array_equal(arrays["example_id"], ids)
        np.testing.assert_array_equal(arrays["token_checksum"], ids.astype(np.uint64) * 7)
        np.testing.assert_array_equal(arrays["teacher_ids"][:, 0, 0], ids)
        np.testing.assert_array_equal(arrays["teacher_tail_logprob"][:, 1], -ids)


def test_bounded_worker_bounds_reraises_and_leaves_no_thread():
    gate, running, most = threading.Event(), [], [0]

    def task(i):
        running.append(i)
        gate.wait(5)
        return i

    with teacher_store.BoundedWorker(2, "bw-test") as worker:
        worker.submit(task, 0)
        worker.submit(task, 1)
        blocked = threading.Thread(target=worker.submit, args=(task, 2))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # a third call waits while two are unfinished
        gate.set()
        blocked.join(5)
    assert running == [0, 1, 2]

    def fail():
        raise OSError("disk full")

    worker = teacher_store.BoundedWorker(3, "bw-test")
    with pytest.raises(OSError, match="disk full"):
        with worker:
            worker.submit(fail)
            time.sleep(0.2)
            worker.submit(lambda: None)  # the earlier failure surfaces here
    # Leaving with an exception cancels calls not started and joins the thread.
    started = []
    with pytest.raises(KeyboardInterrupt):
        with teacher_store.BoundedWorker(5, "bw-test") as worker:
            worker.submit(time.sleep, 0.2)
            worker.submit(started.append, 1)
            raise KeyboardInterrupt
    assert started == [] and not [t for t in threading.enumerate() if t.name.startswith("bw-test")]
    # The shard writer lets what it was given finish: finished shards are not thrown away.
    with pytest.raises(KeyboardInterrupt):
        with teacher_store.BoundedWorker(5, "bw-test", finish_on_error=True) as worker:
            worker.submit(time.sleep, 0.2)
            worker.submit(started.append, 1)
            raise KeyboardInterrupt
    assert started == [1] and not [t for t in threading.enumerate() if t.name.startswith("bw-test")]


def test_a_failing_source_stops_the_writer_cleanly_and_a_rerun_completes(clean_store, tmp_path):
    class Failing(helper.TokenSource):
        def __getitem__(self, i):
            if i == 30:
                raise OSError("read error at example 30")
            return super().__getitem__(i)

    path = str(tmp_path / "store")
    with pytest.raises(OSError, match="read error at example 30"):
        helper.write(path, source=Failing())
    assert not [t for t in threading.enumerate() if t.name.startswith(("store-writer", "store-host"))]
    records = sorted(name for name in os.listdir(os.path.join(path, "shards")) if name.endswith(".json"))
    assert records == ["00000.json", "00001.json", "00002.json"]  # the shards before example 30 are kept
    helper.write(path)
    assert_same(read_all(path), read_all(clean_store))


def test_writer_overlaps_the_teacher_with_bounded_memory(clean_store, tmp_path, monkeypatch):
    """While shard 0 is being written, the teacher keeps reading and computing batches - but only as far as
    the bounds allow: 2 shards at the writer, 2 batches at the host thread (batches of 3, shards of 8)."""
    reached_27, read = threading.Event(), []

    class Recording(helper.TokenSource):
        def __getitem__(self, i):
            read.append(i)
            if i == 27:
                reached_27.set()
            return super().__getitem__(i)

    real_write, seen_at_release = teacher_store._write_shard, []

    def slow_first_write(root, shard, arrays):
        if shard == 0:
            reached_27.wait(30)  # a synchronous writer would never get there while shard 0 is unwritten
            time.sleep(0.2)  # let the reader run on if nothing bounded it
            seen_at_release.append(max(read))
        return real_write(root, shard, arrays)

    monkeypatch.setattr(teacher_store, "_write_shard", slow_first_write)
    path = str(tmp_path / "store")
    helper.write(path, source=Recording())
    # Shard 2 (examples 16-23) waits for the writer, which holds shards 0 and 1; batches [24-26] and [27-29]
    # wait for the host thread: the reader got to example 29 and no further.
    assert reached_27.is_set() and seen_at_release == [29]
    assert_same(read_all(path), read_all(clean_store))
