"""Hugging Face tokenizer files: load a tokenizer.json with its EOS, write what `AutoTokenizer` loads unchanged.

    load_tokenizer_files(path, eos_token_id=None) -> Tokenizer    tokenizer.json (+ tokenizer_config.json)
    save_tokenizer_files(path, tokenizer, model_max_length=N)     tokenizer.json + tokenizer_config.json
    auto_tokenizer_mismatch(path, tokenizer) -> None | str        does AutoTokenizer give our ids?
    compare_tokenizers(a, b, texts) -> None | str                 first difference between two tokenizers

Why `auto_tokenizer_mismatch` exists (transformers 5.24): `AutoTokenizer.from_pretrained` does not always use
tokenizer.json as written.  For model types in its `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` (qwen2 among
them) it ignores tokenizer_config.json's `tokenizer_class` and instantiates the model type's own class;
`Qwen2Tokenizer.__init__` then rebuilds the pipeline from the vocabulary and merges alone, with Qwen's NFC
normalizer and split regex.  A tokenizer with another pipeline (kdjax's GPT-2-style byte-level BPE) then
gets other ids (digits, NFD text, ...) although every file is right.  No tokenizer_config.json key turns this
off, so an export is checked by loading it the way a user would.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import tokenizers

from kdjax.data.tokenizer import EOS, Tokenizer
from kdjax.hostio import write_json_atomically

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Texts on which an HF-loaded tokenizer must give kdjax's ids: unicode (composed and decomposed), whitespace
# and newline runs, digit runs, contractions, code, and a special token's literal text (kdjax encodes it as
# text: `Tokenizer.encode` never yields a special id).
PROBE_TEXTS = (
    "Hello world, this is kdjax.",
    "naïve café: 日本語 and emoji 🙂 too; cafe\u0301 (decomposed)",
    "  leading spaces,\ttabs\n\nand newlines   \r\n\r\n end",
    "numbers 1234567890 and 3.14159, year 2024",
    "DON'T won't I'm we'll they'd it's",
    "def f(x):\n    return x ** 2  # square\n",
    "a document <|endoftext|> that names the separator",
)


def _token_content(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer_files(path: str | os.PathLike, *, eos_token_id=None) -> Tokenizer:
    """The directory's tokenizer.json as a `Tokenizer`, with its EOS token.

    EOS is tokenizer_config.json's `eos_token`, else the token of `eos_token_id` (config.json's; an int or a
    list whose first entry is used), else "<|endoftext|>" when the vocabulary has it.  The model's own
    declaration comes first: Qwen2.5-Instruct has "<|endoftext|>" in its vocabulary but ends its turns with
    "<|im_end|>", and a rollout that does not stop there trains on text past the end.

    Raises FileNotFoundError without tokenizer.json (a slow tokenizer must be converted once), ValueError when
    no EOS can be found.
    """
    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{path} has no tokenizer.json (a fast tokenizer); convert a slow one once with "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path)"
        )
    tok = tokenizers.Tokenizer.from_file(file)
    eos = None
    tok_config = os.path.join(path, TOKENIZER_CONFIG_FILE)
    if os.path.exists(tok_config):
        with open(tok_config) as f:
            eos = _token_content(json.load(f).get("eos_token"))
    if eos is None and eos_token_id is not None:
        eos_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        eos = tok.id_to_token(eos_id)
    if eos is None and tok.token_to_id(EOS) is not None:
        eos = EOS
    if eos is None:
        raise ValueError(f"{path}: cannot tell the EOS token (no eos_token, no eos_token_id, no {EOS!r})")
    return Tokenizer(tok, eos_token=eos)


def tokenizer_config(tokenizer: Tokenizer, *, model_max_length: int) -> dict:
    """tokenizer_config.json so that `AutoTokenizer` uses tokenizer.json as is and encodes like kdjax.

    The class is named explicitly: left to config.json's model_type, AutoTokenizer would pick e.g.
    GPT2Tokenizer, which rebuilds the pipeline (prefix space, ...).  (qwen2 ignores the name; see the module
    docstring.)  `split_special_tokens` makes a special token's literal text encode as text, as kdjax's
    `Tokenizer.encode` does.  EOS doubles as BOS and PAD (and as UNK unless the model names one), as in
    GPT-2; no BOS / EOS is added to encoded text, since kdjax trains without them.
    """
    eos = tokenizer.eos_token
    unk = json.loads(tokenizer.to_str())["model"].get("unk_token")
    return dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=model_max_length,
        bos_token=eos,
        eos_token=eos,
        unk_token=unk or eos,
        pad_token=eos,
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer_files(path: str | os.PathLike, tokenizer: Tokenizer, *, model_max_length: int) -> None:
    """Writes tokenizer.json and tokenizer_config.json (each atomically) into the directory `path`."""
    tokenizer.save(os.path.join(path, TOKENIZER_FILE))
    config = tokenizer_config(tokenizer, model_max_length=model_max_length)
    write_json_atomically(os.path.join(path, TOKENIZER_CONFIG_FILE), config, indent=2, sort_keys=False)


def _canonical(node):
    """A tokenizer.json section with the spellings that cannot change ids made equal: ByteLevel's
    `trim_offsets` (offsets only) dropped, BPE's null and "" affixes identified."""
    if isinstance(node, list):
        return [_canonical(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if key in out:
            out[key] = out[key] or ""
    return out


def _short(node) -> str:
    if isinstance(node, dict):
        node = {k: v for k, v in node.items() if k not in ("vocab", "merges")}
    text = json.dumps(node)
    return text if len(text) <= 200 else text[:200] + "..."


def auto_tokenizer_mismatch(
    path: str | os.PathLike, tokenizer: Tokenizer, sample_texts: Sequence[str] = PROBE_TEXTS
) -> Optional[str]:
    """None when `AutoTokenizer.from_pretrained(path)` encodes exactly like `tokenizer`; else why not.

    Compares what decides the ids: the normalizer, the pre-tokenizer and the model (vocabulary, merges,
    options) of the backend transformers builds, the full vocabulary with added tokens and the EOS id, then
    the ids of `sample_texts` (which also covers post-processing and special-token handling).  `path` must
    hold config.json, tokenizer.json and tokenizer_config.json.
    """
    import transformers  # pylint: disable=g-import-not-at-top  # heavy; only exports need it

    hf_tok = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    name = type(hf_tok).__name__
    theirs, ours = json.loads(hf_tok.backend_tokenizer.to_str()), json.loads(tokenizer.to_str())
    for section in ("normalizer", "pre_tokenizer", "model"):
        if _canonical(theirs.get(section)) != _canonical(ours.get(section)):
            return (
                f"AutoTokenizer loads it as {name}, whose {section} is {_short(theirs.get(section))} where "
                f"tokenizer.json has {_short(ours.get(section))}"
            )
    ours_vocab = tokenizers.Tokenizer.from_str(tokenizer.to_str()).get_vocab(with_added_tokens=True)
    if hf_tok.get_vocab() != ours_vocab:
        return f"AutoTokenizer loads it as {name} with another vocabulary ({len(hf_tok.get_vocab())} tokens)"
    if hf_tok.eos_token_id != tokenizer.eos_id:
        return f"AutoTokenizer loads it as {name} with EOS id {hf_tok.eos_token_id}, not {tokenizer.eos_id}"
    for text in sample_texts:
        got, want = hf_tok(text)["input_ids"], tokenizer.encode(text)
        if got != want:
            return f"AutoTokenizer ({name}) encodes {text[:40]!r} as {got[:8]}..., kdjax as {want[:8]}..."
    return None


def compare_tokenizers(
    a: Tokenizer, b: Tokenizer, sample_texts: Sequence[str], *, names: tuple = ("a", "b")
) -> Optional[str]:
    """None when `a` and `b` agree; else one line saying the first difference found.

    Checks, in order: vocab size, EOS id, the token -> id map, then the ids of each sample text (the first
    text and position where they differ).  Distilling between tokenizers that differ anywhere compares
    logits over different meanings of the same index, so the caller should stop.
    """
    na, nb = names
    if a.to_str() == b.to_str() and a.eos_token == b.eos_token:
        return None
    if a.vocab_size != b.vocab_size:
        return f"tokenizers differ: vocab size {a.vocab_size} ({na}) vs {b.vocab_size} ({nb})"
    if a.eos_id != b.eos_id:
        return f"tokenizers differ: EOS id {a.eos_id} ({na}) vs {b.eos_id} ({nb})"
    va = tokenizers.Tokenizer.from_str(a.to_str()).get_vocab(with_added_tokens=True)
    vb = tokenizers.Tokenizer.from_str(b.to_str()).get_vocab(with_added_tokens=True)
    if va != vb:
        token = min(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[0]
        return (
            f"tokenizers differ: token {token!r} has id {va.get(token)} ({na}) vs {vb.get(token)} ({nb}) "
            "(same vocab size, different vocabularies)"
        )
    for i, text in enumerate(sample_texts):
        ia, ib = a.encode(text), b.encode(text)
        if ia != ib:
            j = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
            return (
                f"tokenizers differ on sample text {i} ({text[:40]!r}...): first differing id at token "
                f"position {j}: {ia[j:j + 5]} ({na}) vs {ib[j:j + 5]} ({nb})"
            )
    return None
