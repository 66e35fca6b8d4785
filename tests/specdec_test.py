"""Speculative sampling: exact by enumeration and by chi-square, greedy == target greedy, lossy, ragged batches.

The exactness reference is a plain numpy enumeration of the algorithm (every draft path, every acceptance
outcome, every replacement token) written here from the paper, not by calling kdjax.specdec; the model
distributions it uses come from full (cache-free) forwards of the models over every possible continuation.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from kdjax import specdec
from kdjax.models import sampling
from kdjax.models.transformer import Transformer, TransformerConfig

V = 5


def tiny(seed, *, family="llama", vocab=V, max_len=24, scale=25.0):
    """A 1-layer model; scaled output weights make its next-token distributions far from uniform."""
    base = dict(vocab_size=vocab, num_layers=1, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=24, max_len=max_len)
    if family == "gpt2":  # learned positions and tied embeddings: the draft exercises the other position code
        model = Transformer(TransformerConfig.gpt2(**base), rngs=nnx.Rngs(seed))
        model.embed[...] = scale * model.embed[...]
    else:
        model = Transformer(TransformerConfig.llama(num_kv_heads=1, **base), rngs=nnx.Rngs(seed))
        model.lm_head[...] = scale * model.lm_head[...]
    return nnx.split(model)


@functools.lru_cache(maxsize=None)
def pair():
    return tiny(0), tiny(1, family="gpt2")


@functools.lru_cache(maxsize=None)
def near_draft():
    """The target with noise of its own scale added to every weight: agrees with it often, not always."""
    graphdef, params = pair()[0]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(99), len(leaves))
    leaves = [x + jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


def full_logits(model_pair, tokens_bt):
    """The model's logits over whole sequences, no cache: the reference the cached paths must equal."""
    graphdef, params = model_pair
    return np.asarray(_forward(graphdef)(params, tokens_bt), np.float64)


# ---------------------------------------------------------------- numpy reference (independent of specdec)


def np_probs(logits_v, *, temperature=1.0, top_k=0, top_p=1.0):
    if temperature == 0.0:
        return np.eye(len(logits_v))[np.argmax(logits_v)]
    z = logits_v / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    if top_p < 1.0:
        desc = np.sort(z)[::-1]
        p_desc = np.exp(desc - desc[0]) / np.exp(desc - desc[0]).sum()
        keep = np.cumsum(p_desc) - p_desc < top_p
        z = np.where(z < desc[keep].min(), -np.inf, z)
    e = np.exp(z - z.max())
    return e / e.sum()


class Table:
    """p(. | prompt + s) for every continuation s of length <= k, read off one batched full forward."""

    def __init__(self, model_pair, prompt_p, k, **options):
        self.p, self.k, self.options, self.memo = len(prompt_p), k, options, {}
        suffixes = np.array(list(itertools.product(range(V), repeat=k)), np.int32).reshape(-1, k)
        seqs = np.concatenate([np.tile(prompt_p, (len(suffixes), 1)), suffixes], axis=1)
        self.logits = full_logits(model_pair, seqs)

    def __call__(self, suffix):
        if suffix not in self.memo:
            padded = tuple(suffix) + (0,) * (self.k - len(suffix))  # causal: the padding is never seen
            row = int(np.dot(padded, V ** np.arange(self.k - 1, -1, -1)))
            self.memo[suffix] = np_probs(self.logits[row, self.p + len(suffix) - 1], **self.options)
        return self.memo[suffix]


def exact_residual(p, q):
    r = np.maximum(p - q, 0.0)
    return r / r.sum() if r.sum() > 0 else p


def block_distribution(P, Q, prefix, *, gamma, lenience, residual):
    """{emitted tokens: probability} of one block started at `prefix` (Leviathan et al., Algorithm 1)."""
    out = {}

    def add(tokens, mass):
        out[tokens] = out.get(tokens, 0.0) + mass

    for drafts in itertools.product(range(V), repeat=gamma):
        path = 1.0  # probability that the draft proposes exactly `drafts`
        for i, x in enumerate(drafts):
            path *= Q(prefix + drafts[:i])[x]
        if path == 0.0:
            continue
        survive = path  # ... and that drafts[:i] were all accepted
        for i, x in enumerate(drafts):
            p, q = P(prefix + drafts[:i]), Q(prefix + drafts[:i])
            accept = min(1.0, p[x] / (lenience * q[x]))
            for t, r in enumerate(residual(p, q)):
                add(drafts[:i] + (t,), survive * (1.0 - accept) * r)
            survive *= accept
        for t, r in enumerate(P(prefix + drafts)):
            add(drafts + (t,), survive * r)
    return out


def sequence_distribution(P, Q, n, *, gamma, lenience=1.0, residual=exact_residual):
    """Exact distribution of the first n output tokens, as an array over the V**n sequences."""
    memo = {}

    def from_prefix(prefix, remaining):
        if (prefix, remaining) not in memo:
            dist = np.zeros(V**remaining)
            for emitted, mass in block_distribution(P, Q, prefix, gamma=gamma, lenience=lenience,
                                                    residual=residual).items():
                head = emitted[:remaining]
                rest = remaining - len(head)
                index = int(np.dot(head + (0,) * rest, V ** np.arange(remaining - 1, -1, -1)))
                if rest == 0:
                    dist[index] += mass
                else:  # the sequences that start with `head` form a contiguous block of V**rest entries
                    dist[index : index + V**rest] += mass * from_prefix(prefix + head, rest)
            memo[(prefix, remaining)] = dist
        return memo[(prefix, remaining)]

    return from_prefix((), n)


def target_distribution(P, n):
    """prod_i p(x_i | prompt, x_<i) over the V**n sequences, in the same order as sequence_distribution."""
    seqs = itertools.product(range(V), repeat=n)
    return np.array([np.prod([P(s[:i])[s[i]] for i in range(n)]) for s in seqs])


def tables(prompt_p, n, gamma, **options):
    target, draft = pair()
    k = n + gamma - 1  # the longest continuation a block conditions on
    return Table(target, prompt_p, k, **options), Table(draft, prompt_p, k, **options)


ENUMERATION_CASES = [
    dict(gamma=1, n=3, prompt=(2, 4), options=dict()),
    dict(gamma=2, n=3, prompt=(1,), options=dict()),  # prompt length 1
    dict(gamma=3, n=2, prompt=(3, 0, 1), options=dict()),
    dict(gamma=2, n=3, prompt=(2, 4), options=dict(temperature=0.7, top_k=2)),  # zero target mass under drafts
    dict(gamma=3, n=3, prompt=(4,), options=dict(temperature=1.5, top_p=0.8)),
]


@pytest.mark.parametrize("case", ENUMERATION_CASES, ids=lambda c: f"gamma{c['gamma']}-n{c['n']}-{c['options']}")
def test_enumerated_output_distribution_is_the_targets(case):
    P, Q = tables(np.array(case["prompt"]), case["n"], case["gamma"], **case["options"])
    want = target_distribution(P, case["n"])
    got = sequence_distribution(P, Q, case["n"], gamma=case["gamma"])
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-9)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Negative control: resampling from p instead of the residual is visibly wrong at this precision.
    wrong = sequence_distribution(P, Q, case["n"], gamma=case["gamma"], residual=lambda p, q: p)
    assert np.abs(wrong - want).sum() > 1e-2


@pytest.mark.parametrize("lenience", [1.0, 0.5, 0.2])
def test_lossy_enumeration_matches_the_one_step_formula(lenience):
    """eps = 1 is exact; eps < 1 moves the first token to
    min(q, p/eps) + (1 - sum min(q, p/eps)) norm(max(0, p - q))."""
    P, Q = tables(np.array([3, 1]), 2, 2)
    got = sequence_distribution(P, Q, 2, gamma=2, lenience=lenience).reshape(V, V).sum(axis=1)
    p, q = P(()), Q(())
    accepted = np.minimum(q, p / lenience)
    np.testing.assert_allclose(got, accepted + (1 - accepted.sum()) * exact_residual(p, q), atol=1e-9)
    if lenience == 1.0:
        np.testing.assert_allclose(got, p, atol=1e-9)
    else:
        assert np.abs(got - p).sum() > 1e-3


def test_acceptance_and_residual_rules_give_the_one_step_formula():
    """The implementation's two rules, enumerated over the draft token, give the lossy one-step formula."""
    rng = np.random.default_rng(0)
    cases = [rng.dirichlet(np.ones(6), size=2) for _ in range(4)]
    cases.append((np.array([0.5, 0.5, 0, 0, 0, 0]), np.array([0, 0, 0.2, 0.3, 0.5, 0])))  # disjoint supports
    cases.append((np.array([0.1, 0.2, 0.3, 0.4, 0, 0]),) * 2)  # q == p
    cases.append((np.array([0, 0.3, 0.7, 0, 0, 0]), np.array([0.25, 0.25, 0.25, 0.25, 0, 0])))  # p zero where q > 0
    for p, q in cases:
        for lenience in (1.0, 0.5, 0.2):
            accept = np.asarray(specdec.acceptance_probs(jnp.asarray(p), jnp.asarray(q), lenience=lenience))
            residual = np.asarray(specdec.residual_probs(jnp.asarray(p), jnp.asarray(q)))
            out = q * accept + np.sum(q * (1 - accept)) * residual
            formula = np.minimum(q, p / lenience) + (1 - np.minimum(q, p / lenience).sum()) * exact_residual(p, q)
            np.testing.assert_allclose(out, formula, atol=1e-6)
            if lenience == 1.0:
                np.testing.assert_allclose(out, p, atol=1e-6)
        if np.array_equal(p, q):
            np.testing.assert_array_equal(np.asarray(specdec.acceptance_probs(p, q, lenience=1.0))[q > 0], 1.0)


# ---------------------------------------------------------------- the implementation


def chi_square_pvalue(new_tokens_mn, probs):
    """Pearson's test of sampled sequences against exact probabilities (cells with expectation < 5 pooled)."""
    n = new_tokens_mn.shape[1]
    index = np.asarray(new_tokens_mn) @ V ** np.arange(n - 1, -1, -1)
    counts = np.bincount(index, minlength=V**n)
    expected = len(index) * probs
    if counts[expected == 0].any():
        return 0.0
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    stat = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
    return scipy.stats.chi2.sf(stat, keep.sum() - 1)


def test_chi_square_exact_lossy_and_a_wrong_residual():
    target, draft = pair()
    prompt_p, n, gamma, m = np.array([2, 4]), 3, 2, 20_000
    P, Q = tables(prompt_p, n, gamma)
    prompts = np.tile(prompt_p, (m, 1)).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), m)
    opts = specdec.SpecOptions(max_new_tokens=n, gamma=gamma)

    def pvalue(opts, probs):
        out = specdec.run(target, draft, prompts, keys, opts)
        return chi_square_pvalue(np.asarray(out["tokens"])[:, 2:], probs), out

    exact, out = pvalue(opts, target_distribution(P, n))
    assert exact > 1e-3
    assert 0 < int(np.sum(out["accepted_b"])) < int(np.sum(out["proposed_b"]))  # both branches were taken
    wrong, _ = pvalue(dataclasses.replace(opts, residual=lambda p, q: p), target_distribution(P, n))
    assert wrong < 1e-3
    lossy_opts = dataclasses.replace(opts, lenience=0.3)
    lossy, _ = pvalue(lossy_opts, sequence_distribution(P, Q, n, gamma=gamma, lenience=0.3))
    assert lossy > 1e-3
    lossy_vs_target, _ = pvalue(lossy_opts, target_distribution(P, n))
    assert lossy_vs_target < 1e-3


def _greedy_sample(target, prompt, n, eos_id=None):
    fn = jax.jit(functools.partial(sampling.sample, target[0], max_new_tokens=n, temperature=0.0, eos_id=eos_id))
    return fn(target[1], prompt, jax.random.split(jax.random.key(0), prompt.shape[0]))


@pytest.mark.parametrize("gamma,prompt_len,with_eos", [(1, 3, False), (3, 1, False), (2, 3, True)])
def test_greedy_equals_greedy_target_decoding(gamma, prompt_len, with_eos):
    target, draft = pair()[0], near_draft()
    prompt = np.asarray(jax.random.randint(jax.random.key(gamma), (6, prompt_len), 0, V), np.int32)
    n = 7  # not a multiple of gamma + 1
    eos_id = int(_greedy_sample(target, prompt, 1)["tokens"][0, -1]) if with_eos else None  # row 0 stops at once
    want = _greedy_sample(target, prompt, n, eos_id)
    keys = jax.random.split(jax.random.key(1), 6)
    out = specdec.speculative_sample(target, draft, prompt, keys, max_new_tokens=n, gamma=gamma, temperature=0.0,
                                     eos_id=eos_id)
    np.testing.assert_array_equal(out["tokens"], want["tokens"])
    np.testing.assert_array_equal(out["mask"], want["mask"])
    counts = set(zip(np.asarray(out["accepted_b"]).tolist(), np.asarray(out["proposed_b"]).tolist()))
    assert len(counts) > 1 and np.sum(out["accepted_b"]) > 0  # rows advanced differently: a ragged batch
    if with_eos:
        assert want["mask"][0].sum() == 1 and (want["mask"][1:].sum(axis=1) > 1).any()
        assert out["proposed_b"][0] == gamma  # the finished row stopped proposing after its first block


def test_top_k_one_zero_target_mass_under_rejected_drafts():
    """top_k = 1 makes p and q one-hot: a draft token off the target's argmax has p = 0 and is always
    rejected, and the output must be the target's greedy decoding."""
    target, draft = pair()
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (6, 2), 0, V), np.int32)
    out = specdec.speculative_sample(target, draft, prompt, jax.random.split(jax.random.key(2), 6),
                                     max_new_tokens=6, gamma=2, top_k=1)
    np.testing.assert_array_equal(out["tokens"], _greedy_sample(target, prompt, 6)["tokens"])
    assert np.all(np.asarray(out["accepted_b"]) < np.asarray(out["proposed_b"]))


def test_draft_equal_to_target_accepts_everything():
    target, _ = pair()
    prompt = np.asarray(jax.random.randint(jax.random.key(6), (4, 2), 0, V), np.int32)
    n, gamma = 7, 2
    out = specdec.speculative_sample(target, target, prompt, jax.random.split(jax.random.key(3), 4),
                                     max_new_tokens=n, gamma=gamma)
    np.testing.assert_array_equal(out["accepted_b"], out["proposed_b"])
    assert int(out["target_calls"]) == -(-n // (gamma + 1))  # ceil: every block yields gamma + 1 tokens
    np.testing.assert_array_equal(out["mask"][:, 2:], np.ones((4, n)))


def test_caches_after_rejections_equal_fresh_forwards_of_the_accepted_prefix():
    target, draft = pair()
    b, p = 8, 2
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (b, p), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(4), b)
    opts = specdec.SpecOptions(max_new_tokens=10, gamma=3)

    @jax.jit
    def blocks(target_params, draft_params):
        tm, dm = nnx.merge(target[0], target_params), nnx.merge(draft[0], draft_params)
        state = specdec.init_state(tm, dm, prompt, opts)
        states = []
        for _ in range(3):
            state = specdec.block_step(state, keys, tm, dm, p, opts)
            length = state.length_b
            last = jnp.take_along_axis(state.tokens_bl, (length - 1)[:, None], axis=1)
            # The target's logits for the next position, from its (rolled-back) cache plus the pending token.
            next_target, _ = tm.forward_cached(last, state.target_cache, length - 1)
            states.append((state.tokens_bl, length, next_target[:, 0], state.draft_logits_bv))
        return states

    previous = np.full(b, p)
    rejected = 0
    for tokens, length, next_target, next_draft in blocks(target[1], draft[1]):
        length = np.asarray(length)
        rejected += np.sum(length - previous < opts.gamma + 1)
        previous = length
        rows = np.arange(b)
        np.testing.assert_allclose(next_target, full_logits(target, tokens)[rows, length - 1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(next_draft, full_logits(draft, tokens)[rows, length - 1], atol=1e-5, rtol=1e-5)
    assert rejected > 0 and len(set(previous.tolist())) > 1


def test_same_keys_same_output_and_no_dependence_on_batch_neighbours():
    target, draft = pair()
    prompt = np.asarray(jax.random.randint(jax.random.key(8), (4, 3), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(5), 4)
    run = functools.partial(specdec.speculative_sample, target, draft, max_new_tokens=8, gamma=2, top_p=0.9)
    a, b = run(prompt, keys), run(prompt, keys)
    for name in ("tokens", "mask", "accepted_b", "proposed_b"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(run(prompt, jax.random.split(jax.random.key(6), 4))["tokens"], a["tokens"])
    perm = np.array([3, 1, 0, 2])
    permuted = run(prompt[perm], keys[perm])
    np.testing.assert_array_equal(permuted["tokens"], np.asarray(a["tokens"])[perm])
    # Row 0 among other neighbours (other prompts and keys) gives the same output and counts.
    others = np.asarray(jax.random.randint(jax.random.key(9), (3, 3), 0, V), np.int32)
    mixed = run(np.concatenate([prompt[:1], others]), jnp.concatenate([keys[:1], jax.random.split(keys[1], 3)]))
    np.testing.assert_array_equal(mixed["tokens"][0], a["tokens"][0])
    assert int(mixed["accepted_b"][0]) == int(a["accepted_b"][0])


@pytest.mark.parametrize("lenience", [1.0, 0.5])
def test_alpha_hat_agrees_with_sum_min_within_its_error(lenience):
    """One block of gamma = 1 per sequence: the first proposal is accepted with probability
    beta = sum_x min(q, p / eps) at the prompt, so alpha_hat is a mean of Bernoulli(beta_b)."""
    target, draft = pair()
    m = 4000
    prompts = np.asarray(jax.random.randint(jax.random.key(10), (m, 3), 0, V), np.int32)
    out = specdec.speculative_sample(target, draft, prompts, jax.random.split(jax.random.key(11), m),
                                     max_new_tokens=1, gamma=1, lenience=lenience)
    alpha_hat = np.sum(out["accepted_b"]) / np.sum(out["proposed_b"])
    t_logits, d_logits = full_logits(target, prompts)[:, -1:], full_logits(draft, prompts)[:, -1:]
    beta_sum, count = specdec.expected_acceptance(t_logits, d_logits, np.ones((m, 1)), lenience=lenience)
    assert int(count) == m
    p, q = np.asarray(specdec.sampling_probs(t_logits)[:, 0]), np.asarray(specdec.sampling_probs(d_logits)[:, 0])
    beta_b = np.minimum(q, p / lenience).sum(-1)
    np.testing.assert_allclose(float(beta_sum), beta_b.sum(), rtol=1e-5)
    if lenience == 1.0:  # beta = 1 - TVD(p, q)
        np.testing.assert_allclose(beta_b, 1 - 0.5 * np.abs(p - q).sum(-1), atol=1e-6)
    stderr = np.sqrt(np.sum(beta_b * (1 - beta_b))) / m
    assert 0.05 < beta_b.mean() < 0.95 and stderr > 0
    assert abs(alpha_hat - beta_b.mean()) < 4 * stderr


def test_expected_block_efficiency_and_speedup():
    for gamma in (1, 3, 7):
        for alpha in (0.0, 0.3, 0.8, 0.999):
            tau = specdec.expected_block_efficiency(alpha, gamma)
            np.testing.assert_allclose(tau, (1 - alpha ** (gamma + 1)) / (1 - alpha), rtol=1e-9)
            np.testing.assert_allclose(specdec.expected_speedup(alpha, gamma, 0.05), tau / (0.05 * gamma + 1))
        assert specdec.expected_block_efficiency(1.0, gamma) == gamma + 1
        np.testing.assert_allclose(specdec.expected_speedup(1.0, gamma, 1.0), 1.0)
    with pytest.raises(ValueError, match="gamma"):
        specdec.expected_block_efficiency(0.5, 0)


def test_bad_input_is_refused_by_name():
    target, draft = pair()
    prompt = np.zeros((2, 3), np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    run = functools.partial(specdec.speculative_sample, target, draft, prompt, keys, max_new_tokens=4)
    for kwargs, message in (
        (dict(gamma=0), "gamma"),
        (dict(gamma=2.0), "gamma"),
        (dict(gamma=2, lenience=0.0), "lenience"),
        (dict(gamma=2, lenience=1.5), "lenience"),
        (dict(gamma=2, top_p=0.0), "top_p"),
    ):
        with pytest.raises(ValueError, match=message):
            run(**kwargs)
    other_vocab = tiny(2, vocab=V + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        specdec.speculative_sample(target, other_vocab, prompt, keys, max_new_tokens=4, gamma=2)
    short = tiny(3, family="gpt2", max_len=6)
    with pytest.raises(ValueError, match="draft's max_len=6"):
        specdec.speculative_sample(target, short, prompt, keys, max_new_tokens=4, gamma=2)
    with pytest.raises(ValueError, match="target's max_len=24"):
        specdec.speculative_sample(target, draft, prompt, keys, max_new_tokens=22, gamma=2)
    with pytest.raises(ValueError, match="keys"):
        specdec.speculative_sample(target, draft, prompt, keys[:1], max_new_tokens=4, gamma=2)


def test_benchmark_runs_at_a_tiny_size():
    """The CLI's measurement path end to end (no timing is asserted: only that it measures what it says)."""
    from benchmarks import specdec as bench  # pylint: disable=g-import-not-at-top

    r = bench.run(vocab=64, target_layers=1, target_dim=64, draft_layers=1, draft_dim=32, prompt_len=3,
                  new_tokens=6, gammas=[2], repeats=1)
    copy = [row for row in r["rows"] if row["draft"] == "draft = target copy"][0]
    assert copy["alpha"] == 1.0 and copy["tau"] == 6 / 2 and all(row["same"] for row in r["rows"])
    assert "| 2 | random draft |" in bench.markdown(r, new_tokens=6, repeats=1)
