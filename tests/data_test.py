"""Tests for kdjax.data: corpus, tokenizer, packing, grain pipelines, TFDS adapter.

All offline and small: a tokenizer of 512 ids trained on a few dozen stdlib files, synthetic
token streams for the pipeline properties, and a TFDS dataset built in tmp_path.
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from kdjax.data import corpus
from kdjax.data.pipeline import (
    PackedSequences,
    cached_token_stream,
    encode_documents,
    eval_batches,
    token_dtype,
    train_dataset,
    train_iterator,
)
from kdjax.data.tfds_source import tfds_documents
from kdjax.data.tokenizer import (
    EOS,
    Tokenizer,
    get_or_train_tokenizer,
    train_bpe,
)
from kdjax.hostio import write_atomically

SMALL_VOCAB = 512
SAMPLE_FILES = 40

ODD_STRINGS = [
    "",
    " ",
    "\t",
    "trailing spaces   ",
    "\ttabs\tinside\t\t",
    "line\r\nwindows\rmac\nunix\n\n\n",
    "  leading and double  spaces",
    "héllo wörld — “quotes” ‘single’ …",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 zwj 👨‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 and a\u0308, rtl שלום مرحبا",
    "nul\x00 bell\x07 del\x7f c1\x85 nbsp\xa0 bom\ufeff",
    "a literal " + EOS + " in text",
    "".join(chr(c) for c in range(256)),
    "\U0010ffff max code point",
]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sample_docs():
    return {
        split: corpus.read_documents(split, max_files=SAMPLE_FILES)
        for split in corpus.SPLITS
    }


@pytest.fixture(scope="module")
def small_tokenizer(sample_docs):
    return train_bpe(sample_docs["train"], vocab_size=SMALL_VOCAB)


def _arange_source(num_examples, seq_len):
    """PackedSequences whose token at stream position t is t: contents identify positions."""
    return PackedSequences(np.arange(num_examples * seq_len + 1, dtype=np.uint16), seq_len)


# ------------------------------------------------------------------------------------ corpus


def test_stdlib_files_deterministic_and_filtered():
    files = corpus.stdlib_files()
    assert files == corpus.stdlib_files()
    assert files == sorted(files) and len(set(files)) == len(files)
    assert "os.py" in files and "json/__init__.py" in files
    root = corpus.stdlib_root()
    for f in files:
        parts = f.split("/")
        assert f.endswith(".py") and not f.startswith("/") and "\\" not in f
        assert not set(parts[:-1]) & corpus.EXCLUDED_DIRS, f
        assert not parts[-1].startswith("_sysconfigdata_"), f
        assert (root / f).is_file()


def test_stdlib_files_excludes_on_fake_tree(tmp_path):
    keep = ["a.py", "pkg/__init__.py", "pkg/sub/mod.py", "testing.py", "pkg/test_like.py"]
    drop = [
        "site-packages/numpy/core.py",
        "test/test_os.py",
        "pkg/tests/test_x.py",
        "unittest/test/test_case.py",
        "idlelib/editor.py",
        "lib2to3/fixer.py",
        "turtledemo/demo.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
        "notes.txt",
        "pkg/data.pyc",
    ]
    for f in keep + drop:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x = 1\n")
    assert corpus.stdlib_files(root=tmp_path) == sorted(keep)


def test_max_files_is_a_deterministic_nested_subset():
    full = corpus.stdlib_files()
    small = corpus.stdlib_files(max_files=10)
    larger = corpus.stdlib_files(max_files=25)
    assert small == corpus.stdlib_files(max_files=10)
    assert len(small) == 10 and len(larger) == 25
    assert small == sorted(small)
    assert set(small) <= set(larger) <= set(full)
    # A hash-chosen subset, not just the alphabetically first files.
    assert small != full[:10]


def test_split_disjoint_covering_and_stable():
    files = corpus.stdlib_files()
    splits = corpus.split_files(files, val_fraction=0.05)
    train, val = set(splits["train"]), set(splits["validation"])
    assert not train & val
    assert train | val == set(files)
    assert splits["train"] == sorted(train) and splits["validation"] == sorted(val)
    assert 0 < len(val) < len(files) // 4
    # The split is by path only: subsets and reruns put each file on the same side.
    assert corpus.split_files(files, val_fraction=0.05) == splits
    subset = corpus.stdlib_files(max_files=200)
    sub_splits = corpus.split_files(subset, val_fraction=0.05)
    assert set(sub_splits["validation"]) == val & set(subset)
    # Raising the fraction only moves files into validation.
    assert val <= set(corpus.split_files(files, val_fraction=0.2)["validation"])


def test_file_list_split_and_tokenizer_identical_in_other_processes(sample_docs):
    """Example ids and teacher-store keys depend on these: they must not use hash() etc."""
    script = (
        "import json; from kdjax.data import corpus, train_bpe\n"
        "docs = corpus.read_documents('train', max_files=40)[:10]\n"
        "print(json.dumps([corpus.split_files(corpus.stdlib_files(), val_fraction=0.05),\n"
        "                  corpus.stdlib_files(max_files=25),\n"
        "                  train_bpe(docs, vocab_size=300).fingerprint]))\n"
    )
    here = [
        corpus.split_files(corpus.stdlib_files(), val_fraction=0.05),
        corpus.stdlib_files(max_files=25),
        train_bpe(sample_docs["train"][:10], vocab_size=300).fingerprint,
    ]
    repo = pathlib.Path(__file__).resolve().parents[1]
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(repo)},
            capture_output=True, text=True, check=True, cwd=repo,
        ).stdout
        assert json.loads(out) == here


@pytest.mark.parametrize("n", [2, 3, 5])
def test_split_both_sides_non_empty_for_tiny_lists(n):
    files = [f"m{i}.py" for i in range(n)]
    for fraction in (0.0, 0.05, 0.99):
        splits = corpus.split_files(files, val_fraction=fraction)
        assert splits["train"] and splits["validation"]
        assert sorted(splits["train"] + splits["validation"]) == sorted(files)


def test_read_documents_matches_files_and_describe():
    val_files = corpus.split_file_list("validation", max_files=60)
    docs = corpus.read_documents("validation", max_files=60)
    root = corpus.stdlib_root()
    assert docs == [(root / f).read_bytes().decode("utf-8") for f in val_files]
    with pytest.raises(ValueError, match="split"):
        corpus.read_documents("test")

    line = corpus.describe(max_files=60)
    splits = corpus.split_files(corpus.stdlib_files(max_files=60))
    m = re.match(
        r"stdlib corpus: (\d+) files, ([\d.]+) MB: train (\d+) files ([\d.]+) MB, "
        r"validation (\d+) files ([\d.]+) MB",
        line,
    )
    assert m, line
    n, mb, n_train, mb_train, n_val, mb_val = m.groups()
    assert (int(n), int(n_train), int(n_val)) == (
        60, len(splits["train"]), len(splits["validation"])
    )
    total_bytes = sum((root / f).stat().st_size for f in corpus.stdlib_files(max_files=60))
    assert float(mb) == pytest.approx(total_bytes / 1e6, abs=0.01)
    assert float(mb_train) + float(mb_val) == pytest.approx(float(mb), abs=0.02)


def test_files_fingerprint_tracks_contents(tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "b.py").write_text("b = 2\n")
    before = corpus.files_fingerprint(["a.py", "b.py"], root=tmp_path)
    assert before == corpus.files_fingerprint(["a.py", "b.py"], root=tmp_path)
    assert before != corpus.files_fingerprint(["b.py", "a.py"], root=tmp_path)
    (tmp_path / "b.py").write_text("b = 3\n")
    assert before != corpus.files_fingerprint(["a.py", "b.py"], root=tmp_path)


# --------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_corpus(small_tokenizer, sample_docs):
    tok = small_tokenizer
    assert tok.vocab_size == SMALL_VOCAB
    assert tok.decode([tok.eos_id]) == EOS
    # Validation files were not seen in training: byte-level BPE must still be lossless.
    for doc in sample_docs["train"] + sample_docs["validation"]:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc
        assert tok.eos_id not in ids
        assert all(0 <= i < tok.vocab_size for i in ids)
    # Merges were learned: fewer tokens than UTF-8 bytes.
    text = "".join(sample_docs["validation"])
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))
    assert tok.encode_batch(sample_docs["validation"]) == [
        tok.encode(d) for d in sample_docs["validation"]
    ]


@pytest.mark.parametrize("text", ODD_STRINGS, ids=range(len(ODD_STRINGS)))
def test_tokenizer_round_trips_odd_strings(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    # Literal "<|endoftext|>" in a document is text, not a document boundary.
    assert small_tokenizer.eos_id not in ids
    assert (ids == []) == (text == "")


def test_train_bpe_is_deterministic_and_checks_size(sample_docs):
    docs = sample_docs["train"][:10]
    a = train_bpe(docs, vocab_size=300)
    b = train_bpe(docs, vocab_size=300)
    assert a.fingerprint == b.fingerprint
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["tiny text"], vocab_size=SMALL_VOCAB)
    with pytest.raises(ValueError, match="257"):
        train_bpe(docs, vocab_size=256)


def test_cached_tokenizer_reload(tmp_path, small_tokenizer, sample_docs):
    path = tmp_path / "tok" / "tokenizer.json"
    calls = []

    def texts_fn():
        calls.append(1)
        return sample_docs["train"]

    trained = get_or_train_tokenizer(path, texts_fn, vocab_size=SMALL_VOCAB)
    assert calls == [1] and path.is_file()
    assert trained.fingerprint == small_tokenizer.fingerprint  # Same texts, same tokenizer.
    assert trained.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()

    loaded = get_or_train_tokenizer(path, texts_fn, vocab_size=SMALL_VOCAB)
    assert calls == [1], "a cache hit must not read the corpus"
    assert loaded.fingerprint == trained.fingerprint
    assert (loaded.vocab_size, loaded.eos_id) == (trained.vocab_size, trained.eos_id)
    for text in sample_docs["validation"][:3] + ODD_STRINGS:
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert Tokenizer.from_file(path).fingerprint == trained.fingerprint
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # No temp files.

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{SMALL_VOCAB}.*1024"):
        get_or_train_tokenizer(path, texts_fn, vocab_size=1024)


def test_write_atomically_never_leaves_partial_file(tmp_path):
    path = tmp_path / "out.bin"
    write_atomically(path, b"old")

    def crash(f):
        f.write(b"half of the new con")
        raise KeyboardInterrupt  # Like a kill arriving mid-write.

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ---------------------------------------------------------------------------------- encoding


def test_encode_documents_separates_with_eos(small_tokenizer):
    docs = ["def f():\n    return 1\n", "", "x = 'é'\n", "\n\n"]
    stream = encode_documents(small_tokenizer, docs)
    assert stream.ndim == 1 and stream.dtype == np.uint16
    ends = np.flatnonzero(stream == small_tokenizer.eos_id)
    assert len(ends) == len(docs) and ends[-1] == len(stream) - 1
    pieces = np.split(stream, ends + 1)[:-1]
    for piece, doc in zip(pieces, docs):
        assert piece.tolist() == small_tokenizer.encode(doc) + [small_tokenizer.eos_id]
    assert encode_documents(small_tokenizer, []).shape == (0,)


def test_token_dtype():
    assert token_dtype(512) == np.uint16
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


def test_cached_token_stream(tmp_path, small_tokenizer, sample_docs):
    path = tmp_path / "streams" / f"val-{small_tokenizer.fingerprint[:16]}.npy"
    calls = []

    def docs_fn():
        calls.append(1)
        return sample_docs["validation"]

    first = cached_token_stream(path, small_tokenizer, docs_fn)
    second = cached_token_stream(path, small_tokenizer, docs_fn)
    assert calls == [1]
    expected = encode_documents(small_tokenizer, sample_docs["validation"])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, expected.astype(np.int64))
    with pytest.raises(ValueError, match="expected a 1-D uint16"):
        cached_token_stream(wrong, small_tokenizer, docs_fn)


# ----------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("stream_len,seq_len", [(33, 8), (32, 8), (40, 8), (9, 8), (100, 7)])
def test_packed_sequences(stream_len, seq_len):
    stream = (np.arange(stream_len) * 7 % 1000).astype(np.uint16)
    src = PackedSequences(stream, seq_len)
    n = (stream_len - 1) // seq_len
    assert len(src) == n
    covered = []
    for i in range(n):
        ex = src[np.int64(i)]
        assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape == (seq_len + 1,)
        assert ex["example_id"].dtype == np.int64 and ex["example_id"] == i
        np.testing.assert_array_equal(ex["tokens"], stream[i * seq_len : (i + 1) * seq_len + 1])
        if i > 0:  # Labels of i - 1 end where inputs of i start.
            assert ex["tokens"][0] == src[i - 1]["tokens"][-1]
        covered.extend(ex["tokens"][1:].tolist())
    # Every predicted token is a distinct stream position, in order.
    assert covered == stream[1 : n * seq_len + 1].tolist()
    np.testing.assert_array_equal(src[-1]["tokens"], src[n - 1]["tokens"])
    with pytest.raises(IndexError):
        src[n]


def test_packed_sequences_rejects_short_stream():
    with pytest.raises(ValueError, match="too short"):
        PackedSequences(np.arange(8, dtype=np.uint16), 8)


# ------------------------------------------------------------------------------------- grain


def _ids(batches):
    return np.concatenate([b["example_id"] for b in batches]).tolist()


def _check_batch(batch, src, batch_size):
    assert batch["tokens"].shape == (batch_size, src.seq_len + 1)
    assert batch["tokens"].dtype == np.int32 and batch["example_id"].dtype == np.int64
    for row, i in zip(batch["tokens"], batch["example_id"]):
        np.testing.assert_array_equal(row, src[int(i)]["tokens"])


def test_train_dataset_process_slices_cover_each_epoch():
    src = _arange_source(48, 4)
    batch_size, procs = 3, 4
    steps_per_epoch = 48 // (batch_size * procs)
    per_proc = [
        list(train_dataset(src, batch_size=batch_size, seed=7, process_index=p,
                           process_count=procs)[: 2 * steps_per_epoch])
        for p in range(procs)
    ]
    single = list(train_dataset(src, batch_size=batch_size * procs, seed=7)[: 2 * steps_per_epoch])
    epochs = []
    for epoch in range(2):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        ids = []
        for step in steps:
            step_ids = [_ids([per_proc[p][step]]) for p in range(procs)]
            for p in range(procs):
                _check_batch(per_proc[p][step], src, batch_size)
            flat = sum(step_ids, [])
            # Same global batch whatever the number of processes.
            assert sorted(flat) == sorted(_ids([single[step]]))
            ids.extend(flat)
        assert sorted(ids) == list(range(48)), "each epoch: every example once, no overlap"
        epochs.append(ids)
    assert epochs[0] != epochs[1], "reshuffled per epoch"
    assert epochs[0] != list(range(48)), "shuffled"


def test_train_dataset_finite_epochs_equal_batches_per_process():
    # 2 epochs of 29 = 58 examples: strided slices of 15, 15, 14, 14 would give 3, 3, 2, 2
    # batches of 5 without truncation to whole global batches.
    src = _arange_source(29, 4)
    batch_size, procs, num_epochs = 5, 4, 2
    per_proc = [
        list(train_dataset(src, batch_size=batch_size, seed=1, process_index=p,
                           process_count=procs, num_epochs=num_epochs))
        for p in range(procs)
    ]
    lengths = {len(b) for b in per_proc}
    assert lengths == {29 * num_epochs // (batch_size * procs)}
    counts = np.bincount(sum((_ids(b) for b in per_proc), []), minlength=29)
    assert counts.max() <= num_epochs and counts.sum() == lengths.pop() * batch_size * procs
    for b in per_proc[0]:
        _check_batch(b, src, batch_size)


def test_train_dataset_seed():
    src = _arange_source(64, 2)
    first = lambda seed: _ids(list(train_dataset(src, batch_size=8, seed=seed)[:8]))
    assert first(3) == first(3)
    assert first(3) != first(4)
    with pytest.raises(ValueError, match="process_index"):
        train_dataset(src, batch_size=8, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_restore_gives_identical_batches(num_threads):
    src = _arange_source(50, 4)
    ds = train_dataset(src, batch_size=4, seed=11, process_index=1, process_count=2)
    n, more = 9, 12  # Crosses the epoch boundary (50 // 8 = 6 steps per epoch).

    uninterrupted = train_iterator(ds, num_threads=num_threads)
    reference = [next(uninterrupted) for _ in range(n + more)]

    it = train_iterator(ds, num_threads=num_threads)
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # As stored by ocp.args.JsonSave.

    restored = train_iterator(ds, num_threads=num_threads)
    restored.set_state(state)
    for expected in reference[n:]:
        got = next(restored)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_iterator_state_restores_on_another_process_count():
    """The state is the step, and step k is the same global batch for any process count."""
    src = _arange_source(40, 2)
    global_batch, n = 8, 7

    def step_ids(procs, state):
        ids = []
        for p in range(procs):
            ds = train_dataset(src, batch_size=global_batch // procs, seed=5, process_index=p,
                               process_count=procs)
            it = train_iterator(ds, num_threads=0)
            it.set_state(state)
            ids += _ids([next(it)])
        return sorted(ids)

    it = train_iterator(train_dataset(src, batch_size=4, seed=5, process_index=0,
                                      process_count=2), num_threads=0)
    for _ in range(n):
        next(it)
    state = it.get_state()
    assert step_ids(2, state) == step_ids(4, state) == step_ids(1, state)


@pytest.mark.parametrize("num_examples,batch_size,procs", [(10, 3, 1), (10, 2, 2), (12, 3, 2), (5, 4, 3)])
def test_eval_batches_cover_every_example_once(num_examples, batch_size, procs):
    seq_len = 4
    src = _arange_source(num_examples, seq_len)
    global_batch = batch_size * procs
    per_proc = [
        list(eval_batches(src, batch_size=batch_size, process_index=p, process_count=procs))
        for p in range(procs)
    ]
    num_batches = -(-num_examples // global_batch)
    assert all(len(b) == num_batches for b in per_proc)
    seen = []
    for k in range(num_batches):
        for p in range(procs):
            batch = per_proc[p][k]
            assert batch["tokens"].shape == (batch_size, seq_len + 1)
            assert batch["mask"].shape == (batch_size, seq_len)
            assert batch["mask"].dtype == np.float32
            valid = batch["example_id"] >= 0
            np.testing.assert_array_equal(batch["mask"], np.repeat(valid[:, None], seq_len, 1))
            assert not batch["tokens"][~valid].any()
            for row, i in zip(batch["tokens"][valid], batch["example_id"][valid]):
                np.testing.assert_array_equal(row, src[int(i)]["tokens"])
            seen.extend(batch["example_id"][valid].tolist())
    assert seen == list(range(num_examples)), "in order, each once"
    # Token-weighted counting is exact: the mask counts every predicted token once.
    assert sum(b["mask"].sum() for bs in per_proc for b in bs) == num_examples * seq_len


# -------------------------------------------------------------------------------------- TFDS


TFDS_DOCS = {
    "train": ["def f(x):\n\treturn x  \n", "héllo wörld 日本 😀", "", "third\r\ndocument\n"],
    "validation": ["only validation doc"],
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    # skip_registration: the test reads the dataset back by name from its files, as for a
    # dataset prepared on another machine whose builder code is not imported here.
    class KdjaxTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "meta": {"title": tfds.features.Text()}}
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(docs) for split, docs in TFDS_DOCS.items()}

        def _generate_examples(self, docs):
            for i, doc in enumerate(docs):
                yield i, {"text": doc, "meta": {"title": f"title {i}"}}

    data_dir = tmp_path_factory.mktemp("tfds")
    KdjaxTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_documents_round_trip(tfds_dir, small_tokenizer):
    docs = tfds_documents("kdjax_tiny_text", split="train", data_dir=tfds_dir)
    assert len(docs) == len(TFDS_DOCS["train"])
    as_list = list(docs)
    # TFDS stores examples in a key-hash order; the content must be exact.
    assert sorted(as_list) == sorted(TFDS_DOCS["train"])
    assert [docs[i] for i in range(len(docs))] == as_list == docs[:]
    assert list(tfds_documents("kdjax_tiny_text", split="validation", data_dir=tfds_dir)) == (
        TFDS_DOCS["validation"]
    )
    assert len(tfds_documents("kdjax_tiny_text", split="train[:2]", data_dir=tfds_dir)) == 2
    titles = tfds_documents("kdjax_tiny_text", split="train", text_key="meta/title",
                            data_dir=tfds_dir)
    assert sorted(titles) == sorted(f"title {i}" for i in range(len(TFDS_DOCS["train"])))

    # Through the same encode/pack pipeline as the stdlib corpus.
    stream = encode_documents(small_tokenizer, docs)
    src = PackedSequences(stream, 4)
    assert src[0]["tokens"].tolist() == stream[:5].tolist()
    text = small_tokenizer.decode(stream.tolist())
    assert text == "".join(doc + EOS for doc in as_list)


def test_tfds_documents_missing_dataset_does_not_download(tmp_path, monkeypatch):
    import socket

    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(tfds.core.DatasetNotFoundError, match="kdjax_tiny_text"):
        tfds_documents("kdjax_tiny_text", split="train", data_dir=tmp_path)
    assert os.listdir(tmp_path) == []  # nothing fetched, nothing prepared


def test_tfds_documents_with_mock_data(small_tokenizer):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        docs = list(tfds_documents("lm1b", split="train"))
    assert len(docs) == 6 and all(isinstance(d, str) for d in docs)
    stream = encode_documents(small_tokenizer, docs)
    assert (stream == small_tokenizer.eos_id).sum() == 6
    assert small_tokenizer.decode(stream.tolist()) == "".join(d + EOS for d in docs)
