"""Wall-clock helpers for speed measurements that share a noisy machine (benchmarks and experiments' tables).

    best_times(fns, repeats=)          best time of each zero-argument fn, round-robin after a warm-up call
    forward_cost(pair, tokens=, ...)   one cached forward of `tokens` tokens / one of 1 token (batch 1)
"""

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx


def best_times(fns, *, repeats):
    """Best wall time of each zero-argument fn over `repeats` round-robin rounds after one warm-up (compile)
    call each, so a change of the machine's load hits every contender alike; the minimum, because on a
    shared machine noise only ever adds time.  Returns (times, the warm-up calls' outputs)."""
    outs = [jax.block_until_ready(fn()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times], outs


def forward_cost(model_pair, *, tokens, position, repeats):
    """Time of one cached forward of `tokens` tokens over one of 1 token, both at `position` (batch 1)."""
    graphdef, params = model_pair

    @functools.partial(jax.jit, static_argnums=0)
    def forward(t, params, cache):
        model = nnx.merge(graphdef, params)
        index = jnp.full((1,), position, jnp.int32)
        return model.forward_cached(jnp.zeros((1, t), jnp.int32), cache, index)[0]

    cache = nnx.merge(graphdef, params).init_cache(1, 2 * position + tokens)
    (one, many), _ = best_times(
        [functools.partial(forward, 1, params, cache), functools.partial(forward, tokens, params, cache)],
        repeats=4 * repeats,
    )
    return many / one
