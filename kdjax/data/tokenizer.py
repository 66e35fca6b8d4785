"""Byte-level BPE tokenizer: trained with HF `tokenizers`, cached as a `tokenizer.json`.

Byte-level means the base alphabet is the 256 byte values (GPT-2's printable remapping), so
every Unicode string encodes without unknown tokens and `decode(encode(s)) == s` exactly: no
normalizer, no prefix space, no whitespace cleanup on decode.

The only special token is EOS (`<|endoftext|>`, id 0); documents are joined with it when
packed. Text that happens to contain the literal string "<|endoftext|>" is encoded as ordinary
bytes (`encode_special_tokens`), so no document can inject a document boundary.  A tokenizer
loaded from elsewhere (a Hugging Face checkpoint's tokenizer.json) may name another EOS token
(`Tokenizer(tok, eos_token="</s>")`, see `kdjax.data.hf_tokenizer`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kdjax.hostio import write_atomically

EOS = "<|endoftext|>"
# 256 byte tokens + EOS: below this BPE has nothing to learn and some bytes have no id.
MIN_VOCAB_SIZE = 257


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with the small interface kdjax uses.

    Token ids are Python ints in [0, vocab_size). Build with `train_bpe`, `from_file` or
    `from_str`; the serialized JSON (what `save` writes) and the EOS token define `fingerprint`.

    Args:
      tokenizer: the `tokenizers.Tokenizer` (its JSON is what `save` writes).
      eos_token: the token that ends (and separates) documents; it must be in the vocabulary.
        kdjax's own tokenizers use "<|endoftext|>"; HF checkpoints may use e.g. "</s>".
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token: str = EOS):
        self._tok = tokenizer
        self._json = tokenizer.to_str()
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no EOS token {eos_token!r}")
        self._eos_token, self._eos_id = eos_token, eos_id
        # Not part of tokenizer.json, so it is set on every load: a special token's literal text
        # ("<|endoftext|>") in a document must round-trip as text rather than become its id.
        self._tok.encode_special_tokens = True

    @classmethod
    def from_str(cls, json_str: str, *, eos_token: str = EOS) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_str(json_str), eos_token=eos_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, eos_token: str = EOS) -> Tokenizer:
        return cls.from_str(pathlib.Path(path).read_text(encoding="utf-8"), eos_token=eos_token)

    def to_str(self) -> str:
        """The tokenizer.json contents."""
        return self._json

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json atomically; `from_file(path, eos_token=self.eos_token)` has the same
        fingerprint.  The EOS token is not part of tokenizer.json: `kdjax.data.hf_tokenizer.save_tokenizer_files`
        also writes it (tokenizer_config.json)."""
        write_atomically(path, self._json.encode("utf-8"))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the model's embedding rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the tokenizer.json contents: use it in names of derived caches.

        Another EOS token than "<|endoftext|>" is hashed in too (packed streams separate documents with
        it); with the default the fingerprint is that of the file alone, as before the argument existed.
        """
        text = self._json if self._eos_token == EOS else f"{self._json}\0eos_token={self._eos_token}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never contains `eos_id`."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, parallelised by `tokenizers` (Rust threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. EOS shows as "<|endoftext|>" unless `skip_special_tokens`.

        Ids that split a multi-byte character decode to U+FFFD for the partial bytes.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        eos = "" if self._eos_token == EOS else f", eos_token={self._eos_token!r}"
        return f"Tokenizer(vocab_size={self.vocab_size}{eos}, fingerprint={self.fingerprint[:12]})"


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE tokenizer with exactly `vocab_size` ids (EOS included).

    Training is deterministic for a given text sequence. Raises ValueError when the corpus is
    too small to learn `vocab_size - 257` merges, so that a cached tokenizer's vocab size always
    equals the configured one and the model's embedding matches it.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + EOS), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    # GPT-2's split regex keeps merges inside words/number runs/whitespace runs; no prefix
    # space, so the first word of a document is not altered.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 bytes from the start, not only those seen in training: any string encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    result = Tokenizer(tok)
    if result.vocab_size != vocab_size:
        raise ValueError(
            f"BPE training produced {result.vocab_size} ids, not the requested {vocab_size}: "
            "the training text is too small; use more text or a smaller vocab_size"
        )
    return result


def get_or_train_tokenizer(
    path: str | os.PathLike, texts_fn: Callable[[], Iterable[str]], *, vocab_size: int
) -> Tokenizer:
    """Loads the tokenizer cached at `path`, or trains one on `texts_fn()` and caches it.

    Args:
      path: tokenizer.json location. Written atomically, so a killed run never leaves a
        half-written file that a later run would load.
      texts_fn: called only when training is needed (reading the corpus is skipped on a hit).
      vocab_size: required vocab size; a cached tokenizer of another size is an error (rather
        than silently retrained or used) naming the file and both sizes.
    """
    path = pathlib.Path(path)
    if path.exists():
        tok = Tokenizer.from_file(path)
        if tok.vocab_size != vocab_size:
            raise ValueError(
                f"cached tokenizer {path} has vocab_size {tok.vocab_size}, but {vocab_size} was "
                "requested; delete it or point to another path"
            )
        return tok
    tok = train_bpe(texts_fn(), vocab_size=vocab_size)
    tok.save(path)
    return tok
