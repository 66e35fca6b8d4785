"""One call from a data config to (tokenizer, packed train and validation sources), cached on disk.

Experiments (pretraining, distillation, teacher precompute) all read text the same way; this keeps
the cache keys in one place, so the teacher store and the student see byte-identical token streams.
"""

import dataclasses
import hashlib
import os
import pathlib

from kdjax.data import corpus, local_sources
from kdjax.data.pipeline import PackedSequences, cached_token_stream
from kdjax.data.tfds_source import tfds_documents
from kdjax.data.tokenizer import Tokenizer, get_or_train_tokenizer


@dataclasses.dataclass
class TextData:
    """A tokenized corpus: `train` / `validation` are PackedSequences of examples
    {"tokens": int32[seq_len + 1], "example_id": int64}."""

    tokenizer: Tokenizer
    train: PackedSequences
    validation: PackedSequences
    description: str
    # Identifies the documents (files and their bytes and the reading recipe, or the TFDS dataset).
    corpus_fingerprint: str


def load_text_data(
    *,
    corpus_name="stdlib",
    cache_dir="~/.cache/kdjax",
    vocab_size,
    seq_len,
    max_files=0,
    val_fraction=0.05,
    tfds_text_key="text",
    tfds_data_dir="",
    text_field="text",
    text_column="text",
    train_max_files=0,
    tokenizer_path=None,
    tokenizer=None,
) -> TextData:
    """Loads or builds the tokenizer and the token streams of both splits.

    Args:
      corpus_name: "stdlib" (the Python standard library's source files), "tfds:<name>" for a TFDS
        text dataset prepared locally (its "train" and "validation" splits), or a local corpus of
        `kdjax.data.local_sources`: "files:<dir|glob>", "jsonl:<file|dir|glob>",
        "parquet:<file|dir|glob>", "arrow:<file|dir|glob>" (e.g. a `datasets` save_to_disk directory).
      cache_dir: holds tokenizer-*.json and tokens-*.npy, keyed by the corpus fingerprint, the vocab
        size and the tokenizer fingerprint, so changing any of them never reuses a stale cache.
      max_files: 0 = all; else a deterministic subset of that many files (stdlib and local corpora).
      val_fraction: share of documents in validation (stdlib and local corpora; TFDS has its splits).
      text_field: the JSONL field with the text ("a/b" for nested objects).
      text_column: the Parquet / Arrow column with the text.
      train_max_files: stdlib only: 0 = every train file; else the train split keeps a deterministic
        subset of this many files (a limited transfer set) while validation stays whole.
      tokenizer_path: use this tokenizer.json (e.g. the teacher's) instead of training one.
      tokenizer: use this Tokenizer object instead (e.g. a Hugging Face teacher's, whose EOS token the
        tokenizer.json alone does not name); vocab_size must equal its size.

    Raises:
      ValueError: an unknown corpus, or bad input (nothing matches, a bad JSONL line, a missing or
        non-string column...), naming the file and line / row, before anything is written.
    """
    documents, fingerprint, description = _corpus(
        corpus_name,
        max_files=max_files,
        val_fraction=val_fraction,
        tfds_text_key=tfds_text_key,
        tfds_data_dir=tfds_data_dir,
        text_field=text_field,
        text_column=text_column,
        train_max_files=train_max_files,
    )
    cache = pathlib.Path(os.path.expanduser(cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None or tokenizer_path:
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_path or tokenizer} has vocab size {tokenizer.vocab_size}, config says {vocab_size}"
            )
    else:
        tok_file = cache / f"tokenizer-{fingerprint[:12]}-v{vocab_size}.json"
        tokenizer = get_or_train_tokenizer(tok_file, lambda: documents("train"), vocab_size=vocab_size)
    sources = {}
    for split in corpus.SPLITS:
        stream_file = cache / f"tokens-{fingerprint[:12]}-{tokenizer.fingerprint[:12]}-{split}.npy"
        stream = cached_token_stream(stream_file, tokenizer, lambda: documents(split))
        sources[split] = PackedSequences(stream, seq_len)
    description += (
        f" | tokens: train {len(sources['train'].stream):,}, validation {len(sources['validation'].stream):,};"
        f" vocab {tokenizer.vocab_size}"
    )
    return TextData(tokenizer, sources["train"], sources["validation"], description, fingerprint)


def _corpus(corpus_name, *, max_files, val_fraction, tfds_text_key, tfds_data_dir, text_field, text_column,
            train_max_files=0):
    """(documents(split) -> iterable of str, fingerprint hex, description) of a corpus name.

    Only cheap work happens here (listing files, hashing their bytes, reading schemas); documents
    are read when `documents` is called, i.e. only when a cache is missing.
    """
    if train_max_files and corpus_name != "stdlib":
        raise ValueError(f"train_max_files applies to the stdlib corpus, not {corpus_name!r}")
    if corpus_name == "stdlib":
        n = max_files or None
        files = {s: corpus.split_file_list(s, max_files=n, val_fraction=val_fraction) for s in corpus.SPLITS}
        description = corpus.describe(max_files=n, val_fraction=val_fraction)
        if train_max_files:
            # A limited transfer set: a deterministic sample of the train files; validation stays whole.
            files["train"] = corpus.subset_files(files["train"], max_files=train_max_files)
            description += f"; training on a subset of {len(files['train'])} train files"
        fingerprint = corpus.files_fingerprint(files["train"] + files["validation"])
        documents = lambda split: corpus.read_files(files[split])
        return documents, fingerprint, description
    if corpus_name.startswith("tfds:"):
        name = corpus_name[len("tfds:") :]
        data_dir = tfds_data_dir or None
        documents = lambda split: tfds_documents(name, split=split, text_key=tfds_text_key, data_dir=data_dir)
        key = f"{name}\0{tfds_text_key}\0{data_dir}\0" + "\0".join(
            str(len(documents(s))) for s in corpus.SPLITS
        )
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        description = f"TFDS {name}: " + ", ".join(
            f"{s} {len(documents(s)):,} documents" for s in corpus.SPLITS
        )
        return documents, fingerprint, description
    if local_sources.is_local_corpus(corpus_name):
        local = local_sources.open_corpus(
            corpus_name,
            text_field=text_field,
            text_column=text_column,
            max_files=max_files,
            val_fraction=val_fraction,
        )
        return local.documents, local.fingerprint, local.describe()
    kinds = ", ".join(f"'{k}:<path>'" for k in local_sources.KINDS)
    raise ValueError(f"unknown corpus {corpus_name!r}; expected 'stdlib', 'tfds:<name>', {kinds}")


def load_from_config(data_config, **overrides) -> TextData:
    """`load_text_data` from an ml_collections `config.data`.

    Keys added after a config was written (text_field, text_column, TFDS keys) default when absent,
    so older configs keep working.
    """
    kw = dict(
        corpus_name=data_config.corpus,
        cache_dir=data_config.cache_dir,
        vocab_size=data_config.vocab_size,
        seq_len=data_config.seq_len,
        max_files=data_config.max_files,
        val_fraction=data_config.val_fraction,
        tfds_text_key=data_config.get("tfds_text_key", "text"),
        tfds_data_dir=data_config.get("tfds_data_dir", ""),
        text_field=data_config.get("text_field", "text"),
        text_column=data_config.get("text_column", "text"),
        train_max_files=data_config.get("train_max_files", 0),
    )
    kw.update(overrides)
    return load_text_data(**kw)
