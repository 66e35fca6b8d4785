"""Corpora, tokenizers and grain pipelines.

Typical use (an experiment):
  docs = lambda split: corpus.read_documents(split, max_files=config.max_files)
  tok = get_or_train_tokenizer(workdir / "tokenizer.json", lambda: docs("train"), vocab_size=V)
  stream = cached_token_stream(cache / f"train-{tok.fingerprint[:16]}.npy", tok, lambda: docs("train"))
  ds = train_dataset(PackedSequences(stream, L), batch_size=B, seed=0,
                     process_index=jax.process_index(), process_count=jax.process_count())
  it = train_iterator(ds)   # it.get_state() / it.set_state() for checkpoints

A user's own text (text files, JSONL, Parquet, Arrow / `datasets` save_to_disk) comes from
`local_sources.open_corpus("jsonl:/data/*.jsonl", text_field="text")`, whose `documents(split)`
feeds the same functions; `text.load_text_data(corpus_name=...)` does all of the above in one call.
"""

from kdjax.data import corpus, local_sources
from kdjax.data.local_sources import LocalCorpus, open_corpus
from kdjax.data.pipeline import (
    PackedSequences,
    cached_token_stream,
    encode_documents,
    eval_batches,
    token_dtype,
    train_dataset,
    train_iterator,
)
from kdjax.data.tfds_source import TfdsDocuments, tfds_documents
from kdjax.data.tokenizer import EOS, Tokenizer, get_or_train_tokenizer, train_bpe

__all__ = [
    "EOS",
    "LocalCorpus",
    "PackedSequences",
    "TfdsDocuments",
    "Tokenizer",
    "cached_token_stream",
    "corpus",
    "encode_documents",
    "eval_batches",
    "get_or_train_tokenizer",
    "local_sources",
    "open_corpus",
    "tfds_documents",
    "token_dtype",
    "train_bpe",
    "train_dataset",
    "train_iterator",
]
