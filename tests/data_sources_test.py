"""A user's own corpora (kdjax.data.local_sources): text files, JSONL, Parquet, Arrow save_to_disk.

Every corpus is written by the test into tmp_path from deterministic synthetic documents, so the
expected document order and split are enumerated here from the documented rule and compared with
what the implementation returns.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


from configs import lm_distill as distill_config
from configs import precompute_teacher as precompute_config
from experiments import lm_distill, precompute_teacher
from kdjax.data import corpus, local_sources
from kdjax.data import text as text_data
from kdjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = local_sources.KINDS
VOCAB = 300  # 43 merges: quick to train on a few KB, and the BPE still has real merges
VAL_FRACTION = 0.3
_SYLLABLES = "ka lo mi ra te su no vi pe do an el or ut is ba ce fu gi ho".split()


def make_docs(n, *, seed):
    """n distinct pseudo-sentences of 20-60 words drawn from 200 made-up words."""
    rng = np.random.RandomState(seed)
    words = ["".join(rng.choice(_SYLLABLES, rng.randint(1, 4))) for _ in range(200)]
    return [f"{i}: " + " ".join(rng.choice(words, rng.randint(20, 60))) + "." for i in range(n)]


def write_arrow_stream(path, table):
    """One .arrow shard as `datasets` writes it: the Arrow IPC stream format."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)  # several record batches per shard


def write_saved_dataset(directory, columns, *, num_shards):
    """The layout of `datasets.Dataset.save_to_disk`: contiguous shards, state.json lists them."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    names = [f"data-{s:05d}-of-{num_shards:05d}.arrow" for s in range(num_shards)]
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        write_arrow_stream(directory / name, pa.table({k: v[lo:hi] for k, v in columns.items()}))
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    features = {k: {"dtype": "string" if isinstance(v[0], str) else "int64", "_type": "Value"}
                for k, v in columns.items()}
    (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "features": features}))


def write_source(kind, root, docs):
    """Writes `docs` as a corpus of `kind` under root.

    Returns (corpus name, load_text_data keyword options, records): records are
    (relative path, index in file, text) in the documented document order.
    """
    root.mkdir(parents=True, exist_ok=True)
    if kind == "files":
        records = []
        for i, doc in enumerate(docs):
            rel = f"{'sub/' if i % 3 == 0 else ''}doc{i:02d}.txt"
            (root / rel).parent.mkdir(exist_ok=True)
            (root / rel).write_text(doc, encoding="utf-8")
            records.append((rel, 0, doc))
        (root / ".hidden.txt").write_text("never read")  # hidden names are skipped in a directory
        return f"files:{root}", {}, sorted(records)
    if kind == "jsonl":
        parts = {"a.jsonl": docs[0::3], "b.jsonl": docs[1::3], "sub/c.jsonl": docs[2::3]}
        for rel, part in parts.items():
            (root / rel).parent.mkdir(exist_ok=True)
            lines = [json.dumps({"id": j, "doc": {"body": d}}) for j, d in enumerate(part)]
            lines.insert(1, "   ")  # a blank line is not a record and takes no record index
            (root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "notes.txt").write_text("not *.jsonl, not read")
        records = [(rel, j, d) for rel in sorted(parts) for j, d in enumerate(parts[rel])]
        return f"jsonl:{root}", {"text_field": "doc/body"}, records
    if kind == "parquet":
        parts = {"part-0.parquet": docs[: len(docs) // 2], "part-1.parquet": docs[len(docs) // 2 :]}
        for rel, part in parts.items():
            # Both string layouts Arrow has: "string" (int32 offsets) and "large_string" (int64).
            text_type = pa.large_string() if rel.startswith("part-1") else pa.string()
            table = pa.table({"id": np.arange(len(part)), "content": pa.array(part, text_type)})
            pq.write_table(table, root / rel, row_group_size=5)  # several row groups per file
        records = [(rel, j, d) for rel in sorted(parts) for j, d in enumerate(parts[rel])]
        return f"parquet:{root}", {"text_column": "content"}, records
    assert kind == "arrow"
    write_saved_dataset(root, {"text": docs, "label": list(range(len(docs)))}, num_shards=2)
    half = int(np.linspace(0, len(docs), 3)[1])
    records = [("data-00000-of-00002.arrow", j, d) for j, d in enumerate(docs[:half])]
    records += [("data-00001-of-00002.arrow", j, d) for j, d in enumerate(docs[half:])]
    return f"arrow:{root}", {}, records


def expected_split(kind, records, val_fraction):
    """The documented rule, enumerated: key = path (text files) or path + "\\0" + record index."""
    key = (lambda rel, i: rel) if kind == "files" else (lambda rel, i: f"{rel}\0{i}")
    is_val = [corpus.hash_unit(key(rel, i), salt="split") < val_fraction for rel, i, _ in records]
    return {
        "train": [d for (_, _, d), v in zip(records, is_val) if not v],
        "validation": [d for (_, _, d), v in zip(records, is_val) if v],
    }


def open_kwargs(options):
    return {k: options[k] for k in ("text_field", "text_column") if k in options}


def load(name, options, cache, **kw):
    return text_data.load_text_data(
        corpus_name=name,
        cache_dir=str(cache),
        vocab_size=VOCAB,
        seq_len=16,
        val_fraction=VAL_FRACTION,
        **options,
        **kw,
    )


# ------------------------------------------------------------------------- order and splits


@pytest.mark.parametrize("kind", KINDS)
def test_documents_follow_the_documented_order_and_split(tmp_path, kind):
    docs = make_docs(30, seed=1)
    name, options, records = write_source(kind, tmp_path / "data", docs)
    assert sorted(d for _, _, d in records) == sorted(docs)
    want = expected_split(kind, records, VAL_FRACTION)
    assert want["train"] and want["validation"]  # the rule itself splits this data; no fix-up involved
    local = local_sources.open_corpus(name, val_fraction=VAL_FRACTION, **open_kwargs(options))
    for split in corpus.SPLITS:
        assert list(local.documents(split)) == want[split]
    # A second object (nothing memoised) gives the same documents, files and fingerprint.
    again = local_sources.open_corpus(name, val_fraction=VAL_FRACTION, **open_kwargs(options))
    assert again.files == local.files and again.fingerprint == local.fingerprint
    assert list(again.documents("validation")) == want["validation"]


def test_a_glob_and_its_directory_are_the_same_corpus(tmp_path, monkeypatch):
    name, _, records = write_source("files", tmp_path / "data", make_docs(12, seed=2))
    by_dir = local_sources.open_corpus(name)
    by_glob = local_sources.open_corpus(f"files:{tmp_path / 'data'}/**/*.txt")
    assert by_glob.files == by_dir.files == tuple(rel for rel, _, _ in records)
    assert by_glob.fingerprint == by_dir.fingerprint
    # A relative glob (cwd-relative) resolves to the same relative paths.
    monkeypatch.chdir(tmp_path)
    assert local_sources.open_corpus("files:data/**/*.txt").files == by_dir.files


def test_arrow_file_format_and_a_glob_of_shards(tmp_path):
    """Arrow IPC *file* format (Feather v2) read in glob order, batches in order, rows in order."""
    docs = make_docs(14, seed=12)
    for name, part in (("b.arrow", docs[6:]), ("a.arrow", docs[:6])):
        table = pa.table({"text": part})
        with pa.OSFile(str(tmp_path / name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
    local = local_sources.open_corpus(f"arrow:{tmp_path}/*.arrow", val_fraction=0.0)
    assert local.files == ("a.arrow", "b.arrow")
    train, val = list(local.documents("train")), list(local.documents("validation"))
    assert len(val) == 1 and sorted(train + val) == sorted(docs)  # val_fraction 0: the fix-up's one document
    assert [d for rel in local.files for d in local.read_file(rel)] == docs


@pytest.mark.parametrize("kind", ["files", "jsonl"])
@pytest.mark.parametrize("val_fraction", [0.0, 0.5, 0.99])
def test_two_documents_give_one_per_split(tmp_path, kind, val_fraction):
    docs = make_docs(2, seed=3)
    if kind == "files":
        for i, d in enumerate(docs):
            (tmp_path / f"{i}.txt").write_text(d)
        name, keys = f"files:{tmp_path}", ["0.txt", "1.txt"]
    else:
        (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        name, keys = f"jsonl:{tmp_path / 'one.jsonl'}", ["one.jsonl\0" + "0", "one.jsonl\0" + "1"]
    local = local_sources.open_corpus(name, val_fraction=val_fraction)
    splits = {s: list(local.documents(s)) for s in corpus.SPLITS}
    assert sorted(splits["train"] + splits["validation"]) == sorted(docs)
    assert len(splits["train"]) == len(splits["validation"]) == 1
    # Which one: below val_fraction if exactly one is, else the fix-up's lowest score.
    scores = [corpus.hash_unit(k, salt="split") for k in keys]
    below = [s < val_fraction for s in scores]
    val_index = below.index(True) if sum(below) == 1 else int(np.argmin(scores))
    assert splits["validation"] == [docs[val_index]]


def test_max_files_is_the_corpus_subset_rule(tmp_path):
    docs = make_docs(8, seed=4)
    for i, d in enumerate(docs):
        (tmp_path / f"p{i}.jsonl").write_text(json.dumps({"text": d}) + "\n" + json.dumps({"text": d[::-1]}) + "\n")
    every = local_sources.open_corpus(f"jsonl:{tmp_path}").files
    small = local_sources.open_corpus(f"jsonl:{tmp_path}", max_files=3).files
    larger = local_sources.open_corpus(f"jsonl:{tmp_path}", max_files=5).files
    assert list(small) == corpus.subset_files(every, max_files=3)
    assert set(small) < set(larger) < set(every) and len(larger) == 5


# ------------------------------------------------------------------ fingerprints and caches


def _edit(kind, root, options):
    """Changes one word of one document in place, in the source's own format."""
    if kind == "files":
        path = root / "doc01.txt"
        path.write_text(path.read_text() + " EDITED")
    elif kind == "jsonl":
        path = root / "b.jsonl"
        path.write_text(path.read_text().replace('"body": "', '"body": "EDITED ', 1))
    elif kind == "parquet":
        path = root / "part-1.parquet"
        table = pq.read_table(path)
        content = table.column("content").to_pylist()
        content[3] += " EDITED"
        pq.write_table(table.set_column(1, "content", pa.array(content)), path, row_group_size=5)
    else:
        path = root / "data-00001-of-00002.arrow"
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        text = table.column("text").to_pylist()
        text[0] += " EDITED"
        write_arrow_stream(path, table.set_column(0, "text", pa.array(text)))


@pytest.mark.parametrize("kind", KINDS)
def test_an_edited_file_changes_the_fingerprint_and_every_cache_name(tmp_path, kind):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    name, options, _ = write_source(kind, data_dir, make_docs(30, seed=5))
    before = load(name, options, cache)
    cached = sorted(os.listdir(cache))
    assert len(cached) == 3 and all(before.corpus_fingerprint[:12] in f for f in cached)
    # Unchanged: the same fingerprint and the cache is reused (nothing new written).
    assert load(name, options, cache).corpus_fingerprint == before.corpus_fingerprint
    assert sorted(os.listdir(cache)) == cached
    # Moved elsewhere: relative paths and bytes are unchanged, so is the fingerprint.
    shutil.copytree(data_dir, tmp_path / "moved")
    moved = local_sources.open_corpus(f"{kind}:{tmp_path / 'moved'}", val_fraction=VAL_FRACTION,
                                      **open_kwargs(options))
    assert moved.fingerprint == before.corpus_fingerprint
    _edit(kind, data_dir, options)
    after = load(name, options, cache)
    assert after.corpus_fingerprint != before.corpus_fingerprint
    new = sorted(set(os.listdir(cache)) - set(cached))
    assert len(new) == 3 and all(after.corpus_fingerprint[:12] in f for f in new)
    streams = [after.train.stream, after.validation.stream]
    assert any("EDITED" in after.tokenizer.decode(np.asarray(s)) for s in streams)


def test_the_field_and_the_split_fraction_are_part_of_the_fingerprint(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": d, "title": d[:9]}) + "\n" for d in make_docs(6, seed=6)))
    prints = {
        local_sources.open_corpus(f"jsonl:{path}", text_field=field, val_fraction=f).fingerprint
        for field in ("text", "title")
        for f in (0.1, 0.2)
    }
    assert len(prints) == 4


_SUBPROCESS = """
import hashlib, json, sys
import numpy as np
from kdjax.data import text
out = {}
for name, options, cache in json.loads(sys.argv[1]):
    d = text.load_text_data(corpus_name=name, cache_dir=cache, vocab_size=%d, seq_len=16, val_fraction=%r, **options)
    out[name] = [d.corpus_fingerprint, d.tokenizer.fingerprint] + [
        hashlib.sha256(np.ascontiguousarray(s.stream).tobytes()).hexdigest() for s in (d.train, d.validation)]
print(json.dumps(out))
""" % (VOCAB, VAL_FRACTION)


def test_ids_are_the_same_in_other_processes(tmp_path):
    """Fingerprints, tokenizers and token streams (hence every packed example id) agree across processes
    with different hash seeds, each building its own caches from scratch."""
    sources = [write_source(kind, tmp_path / kind, make_docs(24, seed=7)) for kind in KINDS]
    digests = {}
    for name, options, _ in sources:
        d = load(name, options, tmp_path / "cache-here")
        digests[name] = [d.corpus_fingerprint, d.tokenizer.fingerprint] + [
            hashlib.sha256(np.ascontiguousarray(s.stream).tobytes()).hexdigest() for s in (d.train, d.validation)
        ]
    procs = []
    for seed in ("1", "2"):
        jobs = [[name, options, str(tmp_path / f"cache-{seed}")] for name, options, _ in sources]
        env = dict(os.environ, PYTHONHASHSEED=seed)
        procs.append(subprocess.Popen([sys.executable, "-c", _SUBPROCESS, json.dumps(jobs)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == digests


# ------------------------------------------------------------------------------- bad input


def _bad_jsonl(tmp_path, line, *, name="b.jsonl"):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(3, seed=8)))
    good = json.dumps({"text": "fine"})
    (tmp_path / name).write_text(f"{good}\n\n{line}\n{good}\n")  # the bad line is line 3
    return f"jsonl:{tmp_path}", {}


def _parquet(tmp_path, columns, name="x.parquet"):
    pq.write_table(pa.table(columns), tmp_path / name)
    return f"parquet:{tmp_path / name}", {}


BAD = {
    "glob_matches_nothing": (lambda p: (f"jsonl:{p}/*.jsonl", {}), r"no files match"),
    "dir_without_jsonl": (
        lambda p: ((p / "x.txt").write_text("t"), (f"jsonl:{p}", {}))[1],
        r"no \*\.jsonl files under",
    ),
    "missing_path": (lambda p: (f"parquet:{p}/nope.parquet", {}), r"no such file or directory"),
    "unknown_kind": (lambda p: (f"csv:{p}/x.csv", {}), r"unknown corpus 'csv:.*'jsonl:<path>'"),
    "not_json": (lambda p: _bad_jsonl(p, '{"text": "unterminated'), r"b\.jsonl:3: line is not valid JSON"),
    "not_an_object": (lambda p: _bad_jsonl(p, '["text"]'), r"b\.jsonl:3: line is a JSON list, not an object"),
    "missing_field": (lambda p: _bad_jsonl(p, '{"body": "x"}'), r"b\.jsonl:3: no field 'text' .*\['body'\]"),
    "non_string_field": (lambda p: _bad_jsonl(p, '{"text": 5}'), r"b\.jsonl:3: field 'text' is a int, not a string"),
    "null_field": (lambda p: _bad_jsonl(p, '{"text": null}'), r"b\.jsonl:3: field 'text' is a NoneType"),
    "missing_nested_field": (
        lambda p: (_bad_jsonl(p, '{"doc": {"title": "x"}}', name="a2.jsonl")[0], {"text_field": "doc/body"}),
        r"a\.jsonl:1: no field 'doc/body' \(the top level has \['text'\]\)",
    ),
    "missing_column": (lambda p: _parquet(p, {"body": ["a", "b"]}), r"x\.parquet: no column 'text' \(columns: \['body'\]\)"),
    "non_string_column": (lambda p: _parquet(p, {"text": [1, 2]}), r"x\.parquet: column 'text' has type int64, not a string"),
    "null_in_column": (
        lambda p: _parquet(p, {"text": ["a", "b", "c", None, "e"]}),
        r"x\.parquet: row 3: column 'text' is null",
    ),
    "not_parquet": (
        lambda p: ((p / "x.parquet").write_bytes(b"not parquet at all"), (f"parquet:{p}", {}))[1],
        r"x\.parquet: not a readable parquet file",
    ),
    "arrow_missing_column": (
        lambda p: (write_saved_dataset(p / "ds", {"content": ["a", "b", "c"]}, num_shards=2), (f"arrow:{p}/ds", {}))[1],
        r"data-00000-of-00002\.arrow: no column 'text'",
    ),
    "saved_dataset_dict": (
        lambda p: (
            write_saved_dataset(p / "dd" / "train", {"text": ["a", "b"]}, num_shards=1),
            (p / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]})),
            (f"arrow:{p}/dd", {}),
        )[-1],
        r"saved DatasetDict \(splits \['train', 'test'\]\); name one split's directory, e\.g\. arrow:.*dd/train",
    ),
    "one_document": (
        lambda p: ((p / "one.jsonl").write_text(json.dumps({"text": "alone"}) + "\n"), (f"jsonl:{p}", {}))[1],
        r"has 1 document\(s\); a train and a validation split need at least 2",
    ),
    "binary_file_in_directory": (
        lambda p: ((p / "a.txt").write_text("words"), (p / "b.png").write_bytes(b"\x89PNG\0\0"), (f"files:{p}", {}))[-1],
        r"b\.png: byte 4 is NUL, so this is not a text file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_value_error_naming_it_before_anything_is_cached(tmp_path, case):
    make, pattern = BAD[case]
    data = tmp_path / "data"
    data.mkdir()
    name, options = make(data)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=pattern):
        load(name, options, cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_file_changed_after_opening_is_an_error_not_a_stale_fingerprint(tmp_path):
    name, options, _ = write_source("jsonl", tmp_path / "data", make_docs(9, seed=11))
    local = local_sources.open_corpus(name, **open_kwargs(options))
    with open(tmp_path / "data" / "b.jsonl", "a") as f:
        f.write(json.dumps({"doc": {"body": "appended later"}}) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl changed after the corpus was opened"):
        local.fingerprint
    with pytest.raises(ValueError, match=r"b\.jsonl changed after the corpus was opened"):
        local.documents("train")


def test_configs_without_the_new_keys_still_load(tmp_path):
    """An old `config.data` (no text_field / text_column) reads a JSONL corpus's "text" field."""
    docs = make_docs(12, seed=9)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    old = ml_collections.ConfigDict(
        dict(corpus=f"jsonl:{tmp_path / 'd.jsonl'}", cache_dir=str(tmp_path / "cache"), vocab_size=VOCAB,
             seq_len=16, max_files=0, val_fraction=VAL_FRACTION)
    )
    data = text_data.load_from_config(old)
    local = local_sources.open_corpus(old.corpus, val_fraction=VAL_FRACTION)
    assert data.corpus_fingerprint == local.fingerprint
    assert data.tokenizer.decode(np.asarray(data.validation.stream)).split("<|endoftext|>")[:-1] == list(
        local.documents("validation")
    )


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("kind", KINDS)
def test_precompute_and_distill_run_on_the_corpus(tmp_path, kind):
    # The four runs compile identical programs; the suite's persistent cache (conftest.py) loads run 1's.
    name, options, _ = write_source(kind, tmp_path / "data", make_docs(40, seed=10))
    pc = precompute_config.get_config("tiny")  # a random tiny teacher
    pc.data.corpus, pc.data.cache_dir = name, str(tmp_path / "cache")
    pc.data.vocab_size, pc.data.val_fraction = VOCAB, VAL_FRACTION
    for key, value in options.items():
        pc.data[key] = value
    manifest = precompute_teacher.precompute(pc, str(tmp_path / "store"))
    data = text_data.load_from_config(pc.data)
    assert manifest["dataset"] == f"{name}:{data.corpus_fingerprint[:16]}"
    assert manifest["num_examples"] == len(data.train)

    dc = distill_config.get_config("tiny")  # offline, 2 steps, from the store only
    dc.data = pc.data
    dc.store_dir = str(tmp_path / "store" / "store-train")
    result = lm_distill.train(dc, str(tmp_path / "kd"))
    losses = [r["train/loss"] for r in read_metrics(str(tmp_path / "kd")) if "train/loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and np.isfinite(result["val/ce"])

    if kind == "jsonl":
        # The store records the corpus fingerprint: after an edit it is refused, not silently reused.
        _edit(kind, tmp_path / "data", options)
        with pytest.raises(ValueError, match="dataset"):
            precompute_teacher.precompute(pc, str(tmp_path / "store"))
