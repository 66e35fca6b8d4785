"""A toy teacher and token source for the teacher-store tests; run as a script it writes a store.

teacher_store_test.py runs this file in a subprocess (slowed by --delay) and SIGKILLs it mid-write.
Everything is deterministic from fixed seeds, so the subprocess and the test build the same
teacher and data.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import teacher_store

VOCAB_SIZE = 300
SEQ_LEN = 16
NUM_EXAMPLES = 40
EXAMPLES_PER_SHARD = 8  # 5 shards
BATCH_SIZE = 3  # batches straddle shards; the last one is padded


def toy_apply(params, tokens_bt):
    """An embedding lookup, a causal running mean and an output matmul: logits [B, T, V]."""
    h_btd = jnp.cumsum(params["embed"][tokens_bt], axis=1)
    h_btd = h_btd / jnp.arange(1, tokens_bt.shape[1] + 1)[None, :, None]
    return h_btd @ params["out"]


def toy_teacher(vocab_size=VOCAB_SIZE, dim=16, seed=0):
    """(params, logits_fn): the toy teacher's params and a jitted tokens -> logits closing over them."""
    key_embed, key_out = jax.random.split(jax.random.key(seed))
    params = {
        "embed": jax.random.normal(key_embed, (vocab_size, dim)),
        "out": 2.0 * jax.random.normal(key_out, (dim, vocab_size)),
    }
    return params, jax.jit(lambda tokens_bt: toy_apply(params, tokens_bt))


class TokenSource:
    """Random tokens; source[i] = {"tokens": int32[seq_len + 1], "example_id": i}."""

    def __init__(
        self, num_examples=NUM_EXAMPLES, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, seed=1, delay_s=0.0
    ):
        rng = np.random.default_rng(seed)
        self._tokens = rng.integers(0, vocab_size, (num_examples, seq_len + 1), dtype=np.int32)
        self._delay_s = delay_s

    def __len__(self):
        return len(self._tokens)

    def __getitem__(self, i):
        if self._delay_s:
            time.sleep(self._delay_s)  # makes the writer slow enough to be killed mid-store
        return {"tokens": self._tokens[i], "example_id": np.int64(i)}

    def __repr__(self):
        return f"TokenSource(n={len(self)})"


def manifest_for(params):
    return {
        "teacher_fingerprint": teacher_store.params_fingerprint(params),
        "tokenizer_fingerprint": "sha256:toy-tokenizer",
        "dataset": "toy",
        "split": "train",
    }


def write(path, *, k=8, vocab_size=VOCAB_SIZE, delay_s=0.0, process_index=0, process_count=1, source=None):
    params, logits_fn = toy_teacher(vocab_size)
    return teacher_store.write_store(
        path,
        source=source or TokenSource(delay_s=delay_s),
        logits_fn=logits_fn,
        k=k,
        batch_size=BATCH_SIZE,
        examples_per_shard=EXAMPLES_PER_SHARD,
        manifest=manifest_for(params),
        process_index=process_index,
        process_count=process_count,
        progress=False,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--delay_s", type=float, default=0.0)
    args = parser.parse_args()
    write(args.path, delay_s=args.delay_s)
