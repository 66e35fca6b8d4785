"""A toy teacher and token source for the teacher-store tests; run as a script it writes or reads a store.

teacher_store_test.py runs this file in a subprocess: `PATH --delay_s 0.1` writes slowly, to be SIGKILLed
mid-write; `PATH --read` iterates the store through StoreSource + the grain train iterator (prefetch
threads) until the end or an error, to see what a run that hits a corrupt shard prints.
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
# The store keeps the tokenizer's JSON verbatim and fingerprints it; it never parses it.
TOKENIZER_JSON = '{"toy tokenizer": {"vocab_size": 300}}'


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


def manifest_for(params, *, seed=0, dataset="toy", split="train"):
    return {
        "teacher_fingerprint": teacher_store.params_fingerprint(params),
        "teacher": teacher_store.teacher_record(description=f"toy teacher, seed {seed}"),
        "dataset": dataset,
        "split": split,
    }


def write(
    path,
    *,
    k=8,
    vocab_size=VOCAB_SIZE,
    delay_s=0.0,
    process_index=0,
    process_count=1,
    source=None,
    seed=0,
    dataset="toy",
    split="train",
    tokenizer=TOKENIZER_JSON,
):
    params, logits_fn = toy_teacher(vocab_size, seed=seed)
    return teacher_store.write_store(
        path,
        source=source or TokenSource(delay_s=delay_s),
        logits_fn=logits_fn,
        k=k,
        batch_size=BATCH_SIZE,
        examples_per_shard=EXAMPLES_PER_SHARD,
        manifest=manifest_for(params, seed=seed, dataset=dataset, split=split),
        tokenizer=tokenizer,
        process_index=process_index,
        process_count=process_count,
        progress=False,
    )


def read_through_grain(path, *, verify, num_threads):
    """Every batch of one epoch through StoreSource + pipeline.train_iterator; prints how many it got."""
    from kdjax.data import pipeline  # pylint: disable=g-import-not-at-top

    source = teacher_store.StoreSource(TokenSource(), teacher_store.open_store(path, verify=verify))
    dataset = pipeline.train_dataset(source, batch_size=4, seed=0, num_epochs=1)
    iterator = pipeline.train_iterator(dataset, num_threads=num_threads)
    count = sum(1 for _ in iterator)
    print(f"read {count} batches")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--delay_s", type=float, default=0.0)
    parser.add_argument("--read", action="store_true", help="read the store instead of writing it")
    parser.add_argument("--verify", default="lazy")
    parser.add_argument("--num_threads", type=int, default=4)
    args = parser.parse_args()
    if args.read:
        read_through_grain(args.path, verify=args.verify, num_threads=args.num_threads)
    else:
        write(args.path, delay_s=args.delay_s)
