"""Property tests for kdjax.losses: definitions, invariances and numerics, with and without jit.

A float64 NumPy reference written straight from the definitions in docs/losses.md checks values;
everything else is a property (zero at p = q, k = V equals dense, T^2 scaling, padding is inert,
-inf is finite, finite differences, ...), not a remembered number.
"""

import functools
import tempfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdjax import losses

B, T, V, K = 2, 3, 7, 4
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)  # one padded position

# One entry per loss name; beta and alpha away from 1/2 so that a swapped p and q shows.
CASES = [
    dict(testcase_name="fkl", name="fkl", hparams={}),
    dict(testcase_name="rkl", name="rkl", hparams={}),
    dict(testcase_name="jsd", name="jsd", hparams={"beta": 0.2}),
    dict(testcase_name="tvd", name="tvd", hparams={}),
    dict(testcase_name="skl", name="skl", hparams={"alpha": 0.1}),
    dict(testcase_name="srkl", name="srkl", hparams={"alpha": 0.1}),
]
TOPK_CASES = [dict(c, testcase_name=f"{c['testcase_name']}_{tail}", tail=tail)
              for c in CASES for tail in losses.TAILS]
# k = V needs its own compilations; the issue names these four (skl and srkl share every line of
# the top-k code path and are checked against the reference at k < V).
TOPK_FULL_CASES = [c for c in TOPK_CASES if c["name"] in ("fkl", "rkl", "jsd", "tvd")]


def _logits(seed, shape=(B, T, V), scale=2.0):
    return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


def _pair(seed=0):
    return _logits(seed), _logits(seed + 100)


def _topk_store(teacher_btv, k):
    """What the offline teacher store holds: log-softmax at the teacher's top-k ids."""
    ids = np.argsort(-teacher_btv, axis=-1)[..., :k]
    logprobs = np.take_along_axis(np.asarray(jax.nn.log_softmax(teacher_btv, axis=-1)), ids, axis=-1)
    return logprobs.astype(np.float32), ids.astype(np.int32)


# Loss callables are built once per (name, hparams) and reused by every test: jax.jit shares its
# compilation cache between wrappers of the same function object, which keeps this file fast.
# Temperature is a (traced) argument for the same reason.


def _key(hparams):
    return tuple(sorted(hparams.items()))


@functools.lru_cache(maxsize=None)
def _dense(name, hkey):
    """fn(student, teacher, mask, temperature) -> ((sum, count), (d sum/d student, d sum/d teacher))."""
    def loss(s, t, mask, temperature):
        return losses.LOSSES[name](s, t, mask, temperature=temperature, **dict(hkey))
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@functools.lru_cache(maxsize=None)
def _topk(name, hkey, tail):
    """fn(student, teacher_logprobs, teacher_ids, mask, temperature) -> ((sum, count), d sum/d student)."""
    def loss(s, lp, ids, mask, temperature):
        return losses.topk_kd(s, lp, ids, mask, divergence=name, tail=tail, temperature=temperature,
                              **dict(hkey))
    return jax.value_and_grad(loss, has_aux=True)


# --------------------------------------------------------------------------------------------
# Float64 NumPy reference, prob-space, written from the docs' formulas.


def np_softmax(x, temperature=1.0):
    x = np.asarray(x, np.float64) / temperature
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(a, b):
    pos = a > 0
    return np.sum(np.where(pos, a * (np.log(np.where(pos, a, 1)) - np.log(np.where(pos, b, 1))), 0), -1)


NP_DIVERGENCES = {
    "fkl": lambda p, q: np_kl(p, q),
    "rkl": lambda p, q: np_kl(q, p),
    "jsd": lambda p, q, beta: (beta * np_kl(p, beta * p + (1 - beta) * q)
                               + (1 - beta) * np_kl(q, beta * p + (1 - beta) * q)),
    "tvd": lambda p, q: 0.5 * np.abs(p - q).sum(-1),
    "skl": lambda p, q, alpha: np_kl(p, alpha * p + (1 - alpha) * q),
    "srkl": lambda p, q, alpha: np_kl(q, (1 - alpha) * p + alpha * q),
}


def np_reduce(per_token, mask, temperature=1.0):
    return temperature**2 * np.sum(per_token * mask), np.sum(mask)


def np_bucket(probs_k, temperature):
    """Documented bucket construction: [P_k * softmax(log p_k / T), 1 - P_k]."""
    mass = probs_k.sum(-1, keepdims=True)
    head = mass * np_softmax(np.log(probs_k), temperature)
    return np.concatenate([head, 1 - mass], -1)


class DenseLossTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_matches_reference(self, name, hparams):
        s, t = _pair(1)
        for temperature in (1.0, 2.0):
            (total, count), _ = self.variant(_dense(name, _key(hparams)))(s, t, MASK, temperature)
            want = NP_DIVERGENCES[name](np_softmax(t, temperature), np_softmax(s, temperature), **hparams)
            want_total, want_count = np_reduce(want, MASK, temperature)
            np.testing.assert_allclose(total, want_total, rtol=1e-5)
            self.assertEqual(count, want_count)
            self.assertEqual(total.dtype, jnp.float32)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_zero_and_stationary_at_equal(self, name, hparams):
        s = _logits(2)
        (total, _), (grad, _) = self.variant(_dense(name, _key(hparams)))(s, s, MASK, 2.0)
        np.testing.assert_allclose(total, 0.0, atol=1e-6)
        if name != "tvd":  # p = q is a kink of |p - q|: any subgradient is right there.
            # p = q is the smooth minimum of the KL family: the student's gradient vanishes too.
            np.testing.assert_allclose(grad, 0.0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_nonnegative_per_token(self, name, hparams):
        fn = self.variant(_dense(name, _key(hparams)))
        for seed, scale in ((3, 1.0), (4, 8.0)):
            s, t = _logits(seed, scale=scale), _logits(seed + 50, scale=scale)
            for b in range(B):
                for pos in range(T):
                    one = np.zeros((B, T), bool)
                    one[b, pos] = True
                    self.assertGreaterEqual(float(fn(s, t, one, 1.0)[0][0]), -1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_temperature_squared_scaling(self, name, hparams):
        # Logits scaled by T at temperature T are the T = 1 distributions: the loss is T^2 times.
        s, t = _pair(5)
        fn = self.variant(_dense(name, _key(hparams)))
        np.testing.assert_allclose(fn(3 * s, 3 * t, MASK, 3.0)[0][0], 9 * fn(s, t, MASK, 1.0)[0][0],
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_padding_is_inert(self, name, hparams):
        s, t = _pair(6)
        s2, t2 = s.copy(), t.copy()
        s2[~MASK] = np.nan                   # anything at all, even NaN ...
        t2[~MASK] = -np.inf                  # ... or a fully masked row
        value_and_grad = self.variant(_dense(name, _key(hparams)))
        v1, (gs1, gt1) = value_and_grad(s, t, MASK, 1.0)
        v2, (gs2, gt2) = value_and_grad(s2, t2, MASK, 1.0)
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(gs1, gs2)
        np.testing.assert_array_equal(gt1, gt2)
        np.testing.assert_array_equal(gs2[~MASK], 0.0)
        np.testing.assert_array_equal(gt2[~MASK], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_neg_inf_logits(self, name, hparams):
        s, t = _pair(7)
        s[..., 0] = t[..., 0] = -np.inf      # vocabulary entry masked on both sides
        t[..., 1] = -np.inf                  # masked by the teacher only
        value_and_grad = self.variant(_dense(name, _key(hparams)))
        (total, _), (gs, gt) = value_and_grad(s, t, MASK, 1.0)
        self.assertTrue(np.isfinite(total))
        self.assertTrue(np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)))
        # A column masked on both sides is the same as a smaller vocabulary.
        s[..., 1] = t[..., 1] = -np.inf
        (full, _), _ = value_and_grad(s, t, MASK, 1.0)
        reduced = NP_DIVERGENCES[name](np_softmax(t[..., 2:]), np_softmax(s[..., 2:]), **hparams)
        np.testing.assert_allclose(full, np_reduce(reduced, MASK)[0], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_extreme_finite_logits_are_exact(self, name, hparams):
        # Log-probabilities far below log(float32 tiny) = -87 are real probabilities, not masks:
        # the loss stays the exact divergence and a confidently wrong student still gets a gradient.
        s, t = _pair(10)
        s[..., 0] = t[..., 0] + 300.0        # student sure of token 0, which the teacher is not
        s[..., 1] = -300.0                   # and sure against token 1
        (total, _), (grad, _) = self.variant(_dense(name, _key(hparams)))(s, t, MASK, 1.0)
        want = NP_DIVERGENCES[name](np_softmax(t), np_softmax(s), **hparams)
        np.testing.assert_allclose(total, np_reduce(want, MASK)[0], rtol=1e-5)
        if name == "fkl":  # d KL(p || q) / d z_1 = q_1 - p_1 = -p_1: not cut off by any floor
            np.testing.assert_allclose(grad[..., 1][MASK], -np_softmax(t)[..., 1][MASK], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_bf16_inputs_give_float32(self, name, hparams):
        s, t = _pair(8)
        s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
        total, count = self.variant(functools.partial(losses.LOSSES[name], temperature=2.0,
                                                      **hparams))(s16, t16, MASK)
        self.assertEqual(total.dtype, jnp.float32)
        self.assertEqual(count.dtype, jnp.float32)
        # Computed in float32 from the rounded values, and close to the float32 inputs' loss.
        fn = self.variant(_dense(name, _key(hparams)))
        (rounded, _), _ = fn(s16.astype(jnp.float32), t16.astype(jnp.float32), MASK, 2.0)
        np.testing.assert_allclose(total, rounded, rtol=1e-6)
        np.testing.assert_allclose(total, fn(s, t, MASK, 2.0)[0][0], rtol=5e-2)

    @parameterized.named_parameters(*CASES)
    def test_gradients_match_finite_differences_float64(self, name, hparams):
        s, t = _pair(9)
        with jax.enable_x64(True):
            s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
            # jit so that the many finite-difference evaluations reuse one compilation.
            fn = jax.jit(lambda a, b: losses.LOSSES[name](a, b, MASK, temperature=1.5, **hparams)[0])
            self.assertEqual(fn(s64, t64).dtype, jnp.float64)
            jax.test_util.check_grads(fn, (s64, t64), order=1, modes=("rev",),
                                      eps=1e-6, atol=1e-6, rtol=1e-6)


class HyperparameterTest(parameterized.TestCase):

    def test_jsd_refuses_degenerate_beta(self):
        s, t = _pair(10)
        with self.assertRaisesRegex(ValueError, "'fkl'"):
            losses.jsd(s, t, MASK, beta=0.0)
        with self.assertRaisesRegex(ValueError, "'rkl'"):
            losses.LOSSES["jsd"](s, t, MASK, beta=1.0)
        with self.assertRaisesRegex(ValueError, "'rkl'"):
            losses.topk_kd(s, *_topk_store(t, K), MASK, divergence="jsd", tail="bucket", beta=1)
        with self.assertRaises(ValueError):
            losses.jsd(s, t, MASK, beta=1.5)

    def test_skew_endpoints(self):
        s, t = _pair(11)
        np.testing.assert_allclose(losses.skew_kl(s, t, MASK, alpha=0.0)[0],
                                   losses.forward_kl(s, t, MASK)[0], rtol=1e-6)
        np.testing.assert_allclose(losses.skew_reverse_kl(s, t, MASK, alpha=0.0)[0],
                                   losses.reverse_kl(s, t, MASK)[0], rtol=1e-6)
        for fn in (losses.skew_kl, losses.skew_reverse_kl):
            with self.assertRaises(ValueError):
                fn(s, t, MASK, alpha=1.0)

    def test_bad_names_and_settings(self):
        s, t = _pair(12)
        with self.assertRaisesRegex(KeyError, "fkl"):
            losses.topk_kd(s, *_topk_store(t, K), MASK, divergence="kl", tail="bucket")
        with self.assertRaisesRegex(ValueError, "tail"):
            losses.topk_kd(s, *_topk_store(t, K), MASK, divergence="fkl", tail="drop")
        with self.assertRaisesRegex(ValueError, "temperature"):
            losses.forward_kl(s, t, MASK, temperature=0.0)
        with self.assertRaises(TypeError):
            losses.forward_kl(s, t, MASK, beta=0.5)  # a hyperparameter the loss does not take


class TopKTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*TOPK_FULL_CASES)
    def test_k_equals_v_is_dense(self, name, hparams, tail):
        s, t = _pair(13)
        logprobs, ids = _topk_store(t, V)
        for temperature in (1.0, 2.0):
            # References run jitted: the same function objects as above, so compiled once.
            (want, _), (want_grad, _) = jax.jit(_dense(name, _key(hparams)))(s, t, MASK, temperature)
            (got, _), grad = self.variant(_topk(name, _key(hparams), tail))(s, logprobs, ids, MASK,
                                                                           temperature)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(grad, want_grad, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_renormalize_is_exact_restriction(self, name, hparams):
        # Restricting and renormalising is exact at any T: it is the dense loss on the k columns.
        s, t = _pair(14)
        logprobs, ids = _topk_store(t, K)
        (got, _), _ = self.variant(_topk(name, _key(hparams), "renormalize"))(s, logprobs, ids, MASK, 2.0)
        p = np_softmax(np.take_along_axis(t, ids, -1), 2.0)
        q = np_softmax(np.take_along_axis(s, ids, -1), 2.0)
        np.testing.assert_allclose(got, np_reduce(NP_DIVERGENCES[name](p, q, **hparams), MASK, 2.0)[0],
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_bucket_matches_reference(self, name, hparams):
        s, t = _pair(15)
        logprobs, ids = _topk_store(t, K)
        for temperature in (1.0, 2.0):
            (got, _), _ = self.variant(_topk(name, _key(hparams), "bucket"))(s, logprobs, ids, MASK,
                                                                             temperature)
            p = np_bucket(np.take_along_axis(np_softmax(t), ids, -1), temperature)
            q = np_bucket(np.take_along_axis(np_softmax(s), ids, -1), temperature)
            want, _ = np_reduce(NP_DIVERGENCES[name](p, q, **hparams), MASK, temperature)
            np.testing.assert_allclose(got, want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES[:2])
    def test_bucket_with_stored_tail(self, name, hparams):
        # The teacher store also keeps log sum_{i not in top-k} p_i, exactly; the bucket uses it.
        s, t = _pair(28)
        logprobs, ids = _topk_store(t, K)
        p = np_softmax(t)
        stored_tail = np.log(1 - np.take_along_axis(p, ids, -1).sum(-1)).astype(np.float32)
        stored_tail[~MASK] = np.nan          # padded entries of the store are garbage too
        fn = self.variant(lambda a, lp, i, lt: losses.topk_kd(
            a, lp, i, MASK, divergence=name, tail="bucket", temperature=2.0,
            teacher_tail_logprob_bt=lt, **hparams))
        got, _ = fn(s, logprobs, ids, stored_tail)
        want, _ = jax.jit(_topk(name, _key(hparams), "bucket"))(s, logprobs, ids, MASK, 2.0)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # At k = V the stored tail is log 0 = -inf and the loss is the dense one.
        logprobs, ids = _topk_store(t, V)
        got, _ = fn(s, logprobs, ids, np.full((B, T), -np.inf, np.float32))
        (want, _), _ = jax.jit(_dense(name, _key(hparams)))(s, t, MASK, 2.0)
        np.testing.assert_allclose(got, want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*TOPK_CASES)
    def test_zero_at_equal_and_padding_inert(self, name, hparams, tail):
        value_and_grad = self.variant(_topk(name, _key(hparams), tail))
        s = _logits(16)
        logprobs, ids = _topk_store(s, K)
        # The store's log-probs and the student's gathered logits round differently: ~ulp noise.
        np.testing.assert_allclose(value_and_grad(s, logprobs, ids, MASK, 2.0)[0][0], 0.0, atol=1e-5)
        t = _logits(17)
        logprobs, ids = _topk_store(t, K)
        s2, logprobs2, ids2 = s.copy(), logprobs.copy(), ids.copy()
        s2[~MASK], logprobs2[~MASK], ids2[~MASK] = np.nan, np.nan, -7  # garbage everywhere padded
        v1, g1 = value_and_grad(s, logprobs, ids, MASK, 2.0)
        v2, g2 = value_and_grad(s2, logprobs2, ids2, MASK, 2.0)
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_array_equal(g2[~MASK], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*TOPK_CASES)
    def test_neg_inf_in_store_and_student(self, name, hparams, tail):
        # A vocabulary with fewer finite entries than k: the store holds -inf log-probs.
        s, t = _pair(18)
        s[..., 3:] = t[..., 3:] = -np.inf
        s[..., 2] = -np.inf                  # and one the student masks but the teacher does not
        logprobs, ids = _topk_store(t, K)
        self.assertTrue(np.isneginf(logprobs).any())
        (total, _), grad = self.variant(_topk(name, _key(hparams), tail))(s, logprobs, ids, MASK, 1.0)
        self.assertTrue(np.isfinite(total))
        self.assertTrue(np.all(np.isfinite(grad)))

    @parameterized.named_parameters(*CASES[:2])
    def test_bucket_gradients_match_finite_differences_float64(self, name, hparams):
        # Renormalize is the dense loss on k columns (tested above) and the divergences are checked
        # densely; what is new here is the bucket, in both KL directions.
        s, t = _pair(27)
        logprobs, ids = _topk_store(t, K)
        with jax.enable_x64(True):
            fn = jax.jit(lambda a: losses.topk_kd(a, jnp.asarray(logprobs, jnp.float64), ids, MASK,
                                                  divergence=name, tail="bucket", temperature=1.5,
                                                  **hparams)[0])
            jax.test_util.check_grads(fn, (jnp.asarray(s, jnp.float64),), order=1, modes=("rev",),
                                      eps=1e-6, atol=1e-6, rtol=1e-6)

    def test_renormalize_builds_nothing_of_vocab_size(self):
        def shapes(jaxpr):  # every intermediate, nested jaxprs (pjit, custom_jvp, ...) included
            for eqn in jaxpr.eqns:
                yield from (v.aval.shape for v in eqn.outvars)
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (tuple, list)) else (param,):
                        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                            yield from shapes(getattr(sub, "jaxpr", sub))

        s, t = _pair(19)
        logprobs, ids = _topk_store(t, K)
        for tail in losses.TAILS:
            forward = functools.partial(losses.topk_kd, divergence="jsd", tail=tail, beta=0.5)
            found = [x for x in shapes(jax.make_jaxpr(forward)(s, logprobs, ids, MASK).jaxpr)
                     if x == (B, T, V)]
            # Bucket mode needs the student's normaliser, which is how we know the check can see.
            self.assertEqual(bool(found), tail == "bucket")


class KdObjectiveTest(parameterized.TestCase):

    def test_cross_entropy_reference_and_padding(self):
        s = _logits(20)
        labels = np.random.RandomState(20).randint(0, V, (B, T))
        labels[~MASK] = -100                 # filler at padded positions is ignored
        total, count = losses.cross_entropy(s, labels, MASK)
        q = np_softmax(s)
        want = -np.log(np.take_along_axis(q, np.where(MASK, labels, 0)[..., None], -1)[..., 0])
        np.testing.assert_allclose(total, np.sum(want * MASK), rtol=1e-5)
        self.assertEqual(count, MASK.sum())

    def test_mixture_is_token_weighted(self):
        s, t = _pair(21)
        labels = np.random.RandomState(21).randint(0, V, (B, T))
        ce, count = losses.cross_entropy(s, labels, MASK)
        kd, _ = losses.jsd(s, t, MASK, temperature=2.0, beta=0.3)
        for alpha in (0.0, 0.25, 1.0):
            total, n = losses.kd_objective(s, t, labels, MASK, alpha=alpha, divergence="jsd",
                                           temperature=2.0, beta=0.3)
            np.testing.assert_allclose(total, alpha * ce + (1 - alpha) * kd, rtol=1e-6)
            self.assertEqual(n, count)
        with self.assertRaises(ValueError):
            losses.kd_objective(s, t, labels, MASK, alpha=1.5)


class TaidTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_t1_is_forward_kl(self):
        s, t = _pair(22)
        s[..., 0] = t[..., 0] = -np.inf      # 0 * (-inf) must not appear at t = 1
        logprobs, ids = _topk_store(t, K)
        # t and T traced, as in a train step where t comes from the TaidState.
        dense = self.variant(lambda a, b, tv, T: losses.taid(a, b, MASK, t=tv, temperature=T))
        topk = {tail: self.variant(lambda a, lp, i, tv, T, tail=tail: losses.taid_topk(
            a, lp, i, MASK, t=tv, temperature=T, tail=tail)) for tail in losses.TAILS}
        for temperature in (1.0, 2.0):
            want = losses.forward_kl(s, t, MASK, temperature=temperature)
            np.testing.assert_allclose(dense(s, t, 1.0, temperature)[0], want[0], rtol=1e-6)
            for tail in losses.TAILS:
                want = losses.topk_kd(s, logprobs, ids, MASK, divergence="fkl", tail=tail,
                                      temperature=temperature)
                np.testing.assert_allclose(topk[tail](s, logprobs, ids, 1.0, temperature)[0], want[0],
                                           rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_interpolation_is_detached(self):
        s, t = _pair(23)
        for t_value in (0.0, 0.4):
            fn = self.variant(jax.value_and_grad(
                lambda a, tv: losses.taid(a, t, MASK, t=tv, temperature=2.0)[0]))
            value, grad = fn(s, t_value)
            # Same value and gradient as forward KL towards a fixed, precomputed interpolated target.
            target = (1 - t_value) * s + t_value * t
            want, want_grad = jax.value_and_grad(
                lambda a: losses.forward_kl(a, target, MASK, temperature=2.0)[0])(s)
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(grad, want_grad, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_topk_at_k_equals_v_is_dense_taid_for_t_below_one(self):
        # At t < 1 the interpolation matters (at t = 1 it vanishes): a store holding all V entries must give
        # exactly the dense TAID, value and gradient, for both tails and at T != 1.
        s, t = _pair(24)
        logprobs, ids = _topk_store(t, V)
        for t_value in (0.0, 0.3, 0.7):
            for temperature in (1.0, 2.0):
                dense = self.variant(jax.value_and_grad(
                    lambda a: losses.taid(a, t, MASK, t=t_value, temperature=temperature)[0]))
                want, want_grad = dense(s)
                for tail in losses.TAILS:
                    topk = self.variant(jax.value_and_grad(lambda a, tail=tail: losses.taid_topk(
                        a, logprobs, ids, MASK, t=t_value, temperature=temperature, tail=tail)[0]))
                    got, got_grad = topk(s)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{t_value} {tail}")
                    np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)

    def test_update_matches_algorithm_1_in_float64(self):
        # An independent route: the paper's Algorithm 1 stepped by hand in float64 Python, the losses being
        # the values of a real TAID objective KL(p_t || q) along a sequence of students, with the first step
        # only recording the loss (as the official code does).
        sched = losses.TaidSchedule(t_start=0.4, t_end=1.0, alpha=0.05, beta=0.9)
        total = 20
        update = jax.jit(losses.taid_update, static_argnums=(3, 4))
        state = losses.taid_init(sched)
        t_ref, m_ref, prev = sched.t_start, 0.0, None
        s0, teacher = _pair(25)
        for step in range(8):
            student = s0 + step * 0.3 * (teacher - s0) / 8  # a student walking towards the teacher
            p_t = np_softmax((1 - t_ref) * student + t_ref * teacher)
            loss = float(np.sum(np_kl(p_t, np_softmax(student)) * MASK) / MASK.sum())
            state = update(state, jnp.float32(loss), step, total, sched)
            if prev is not None:
                m_ref = sched.beta * m_ref + (1 - sched.beta) * (prev - loss) / (prev + sched.eps)
                linear = sched.t_start + (sched.t_end - sched.t_start) * step / total
                step_up = t_ref + sched.alpha * (1 / (1 + np.exp(-m_ref))) * (1 - t_ref)
                t_ref = min(sched.t_end, max(linear, step_up))
            prev = loss
            np.testing.assert_allclose(float(state.t), t_ref, rtol=1e-6)
            np.testing.assert_allclose(float(state.momentum), m_ref, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(float(state.prev_loss), loss, rtol=1e-6)
        state = update(state, jnp.float32(0.5), 2 * total, total, sched)
        self.assertEqual(float(state.t), sched.t_end)

    def test_first_update_only_records_the_loss(self):
        sched = losses.TaidSchedule(t_start=0.25)
        state = losses.taid_update(losses.taid_init(sched), 3.0, 0, 100, sched)
        self.assertEqual(float(state.t), 0.25)
        self.assertEqual(float(state.momentum), 0.0)
        self.assertEqual(float(state.prev_loss), 3.0)

    def test_schedule_is_checked(self):
        for bad in (dict(t_start=1.0), dict(t_start=0.5, t_end=0.4), dict(alpha=-1.0), dict(beta=1.0)):
            with self.assertRaises(ValueError):
                losses.TaidSchedule(**bad).check()

    def test_state_survives_checkpoint(self):
        state = losses.taid_init()
        for step, loss in enumerate([2.0, 1.5, 1.2]):
            state = losses.taid_update(state, loss, step, 100)
        fresh = losses.taid_init()
        self.assertTrue(np.isinf(fresh.prev_loss))  # inf must round-trip too
        with tempfile.TemporaryDirectory() as path, ocp.StandardCheckpointer() as ckptr:
            for name, tree in (("trained", state), ("fresh", fresh)):
                ckptr.save(f"{path}/{name}", tree)
                ckptr.wait_until_finished()
                restored = ckptr.restore(f"{path}/{name}", jax.tree.map(np.zeros_like, tree))
                self.assertIsInstance(restored, losses.TaidState)
                chex.assert_trees_all_equal(restored, tree)
                chex.assert_trees_all_equal_dtypes(restored, tree)


class TvdPlusPlusTest(chex.TestCase):

    def _expected_gradient(self, s, t, temperature, stats):
        """E over x_bt ~ q_bt of the surrogate's gradient, summed exactly over the vocabulary."""
        grad = jax.jit(jax.grad(lambda a, x: losses.tvdpp(a, t, x, MASK, temperature=temperature,
                                                          advantage_stats=stats)[0]))
        q = np_softmax(s, temperature)
        # With constant statistics each position's gradient depends on its own token only, so one
        # call with every position at token x gives all positions' gradients for that x.
        return sum(q[..., x, None] * np.asarray(grad(s, np.full((B, T), x))) for x in range(V))

    @parameterized.parameters(1.0, 2.0)
    def test_expected_gradient_is_tvd_gradient(self, temperature):
        s, t = _pair(24)
        want = jax.grad(lambda a: losses.tvd(a, t, MASK, temperature=temperature)[0])(s)
        got = self._expected_gradient(s, t, temperature, (0.0, 1.0))
        np.testing.assert_allclose(got, np.asarray(want) / (1 + 1e-6), atol=1e-6)

    def test_constant_normalisation_is_parallel(self):
        s, t = _pair(25)
        want = np.asarray(jax.grad(lambda a: losses.tvd(a, t, MASK)[0])(s)).ravel()
        got = self._expected_gradient(s, t, 1.0, (0.3, 0.7)).ravel()
        cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        np.testing.assert_allclose(cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(want) / (0.7 + 1e-6), rtol=1e-5)

    def test_advantage_statistics_span_the_whole_batch(self):
        reward = np.array([[1, 0, 1], [0, 0, 5]], np.float32)  # the 5 sits at the padded position
        adv = np.asarray(losses.normalized_advantage(reward, MASK))
        valid = adv[MASK]
        np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-6)
        np.testing.assert_allclose(valid.std(), 1.0, atol=1e-5)
        self.assertEqual(adv[~MASK], 0.0)
        # One statistic over batch and time: a reward in row 0 moves row 1's advantages.
        reward[0, 1] = 1
        self.assertFalse(np.allclose(losses.normalized_advantage(reward, MASK)[1], adv[1]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_is_inert_and_sampled_tokens_finite(self):
        s, t = _pair(26)
        s[..., 0] = t[..., 0] = -np.inf
        tokens = np.random.RandomState(26).randint(1, V, (B, T))
        fn = self.variant(jax.value_and_grad(lambda a, b, x: losses.tvdpp(a, b, x, MASK)[0]))
        v1, g1 = fn(s, t, tokens)
        s2, t2, tokens2 = s.copy(), t.copy(), tokens.copy()
        s2[~MASK], t2[~MASK], tokens2[~MASK] = np.nan, np.nan, -1
        v2, g2 = fn(s2, t2, tokens2)
        self.assertTrue(np.isfinite(v1) and np.all(np.isfinite(g1)))
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(g1, g2)


class FeatureLossTest(chex.TestCase):
    D = 5

    def _hiddens(self, seed, layers):
        return [_logits(seed + i, (B, T, self.D)) for i in range(layers)]

    def test_uniform_layer_map(self):
        self.assertEqual(losses.uniform_layer_map(4, 12), ((0, 2), (1, 5), (2, 8), (3, 11)))
        self.assertEqual(losses.uniform_layer_map(3, 3), ((0, 0), (1, 1), (2, 2)))
        self.assertEqual(losses.uniform_layer_map(2, 3), ((0, 1), (1, 2)))  # 1.5 rounds up

    @chex.variants(with_jit=True, without_jit=True)
    def test_values_follow_the_layer_map(self):
        student, teacher = self._hiddens(30, 2), self._hiddens(40, 4)
        layer_map = losses.uniform_layer_map(2, 4)            # ((0, 1), (1, 3))
        mse = self.variant(functools.partial(losses.hidden_mse, layer_map=layer_map))
        square = self.variant(functools.partial(losses.squarehead, layer_map=layer_map))
        cosine = self.variant(functools.partial(losses.hidden_cosine, layer_map=layer_map))
        want_mse = sum(((student[i] - teacher[j]) ** 2).mean(-1) for i, j in layer_map)
        want_sq = sum(((student[i] - teacher[j]) ** 2).mean(-1) / (teacher[j][MASK] ** 2).mean()
                      for i, j in layer_map)
        want_cos = sum(1 - (student[i] * teacher[j]).sum(-1)
                       / (np.linalg.norm(student[i], axis=-1) * np.linalg.norm(teacher[j], axis=-1))
                       for i, j in layer_map)
        for fn, want in ((mse, want_mse), (square, want_sq), (cosine, want_cos)):
            for args in ((student, teacher), (np.stack(student), np.stack(teacher))):
                total, count = fn(*args, MASK)
                np.testing.assert_allclose(total, np.sum(want * MASK), rtol=1e-5)
                self.assertEqual(count, MASK.sum())
        # The default map is the uniform one.
        np.testing.assert_allclose(losses.hidden_mse(student, teacher, MASK)[0], mse(student, teacher, MASK)[0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_at_match_and_padding_inert(self):
        teacher = self._hiddens(50, 3)
        for loss in (losses.hidden_mse, losses.squarehead, losses.hidden_cosine):
            fn = self.variant(jax.value_and_grad(lambda s, t: loss(s, t, MASK)[0]))
            scale = 3.0 if loss is losses.hidden_cosine else 1.0   # cosine ignores scale
            np.testing.assert_allclose(fn([scale * h for h in teacher], teacher)[0], 0.0, atol=1e-5)
            student = self._hiddens(60, 3)
            v1, g1 = fn(student, teacher)
            dirty_s, dirty_t = [h.copy() for h in student], [h.copy() for h in teacher]
            for h in dirty_s + dirty_t:
                h[~MASK] = np.nan
            v2, g2 = fn(dirty_s, dirty_t)
            np.testing.assert_array_equal(v1, v2)
            chex.assert_trees_all_equal(g1, g2)
            self.assertTrue(all(np.all(g[~MASK] == 0) for g in g2))

    def test_width_mismatch_is_explained(self):
        student = [np.zeros((B, T, 3), np.float32)]
        with self.assertRaisesRegex(ValueError, "project"):
            losses.hidden_mse(student, self._hiddens(70, 1), MASK)


class MetricsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_metrics(self):
        s, t = _pair(80)
        s[..., 0] = t[..., 0] = -np.inf
        metrics = self.variant(functools.partial(losses.distill_metrics, temperature=2.0))(s, t, MASK)
        count = MASK.sum()
        # Acceptance = 1 - TVD, per token (TVD's (sum, count) carries T^2).
        tvd_total, _ = losses.tvd(s, t, MASK, temperature=2.0)
        np.testing.assert_allclose(metrics["acceptance"][0], count - tvd_total / 4, rtol=1e-5)
        agree = (s.argmax(-1) == t.argmax(-1))[MASK].sum()
        np.testing.assert_allclose(metrics["top1_agreement"][0], agree)
        for name, logits in (("teacher_entropy", t), ("student_entropy", s)):
            p = np_softmax(logits, 2.0)
            want = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
            np.testing.assert_allclose(metrics[name][0], np.sum(want * MASK), rtol=1e-5)
            self.assertEqual(metrics[name][1], count)
        # Uniform over the 6 unmasked entries has entropy log 6.
        uniform = np.where(np.arange(V) == 0, -np.inf, 0.0) * np.ones((B, T, 1))
        np.testing.assert_allclose(losses.entropy(uniform, MASK)[0], count * np.log(V - 1), rtol=1e-6)


class InputChecksTest(chex.TestCase):

    def test_bucket_mode_refuses_raw_logits_when_concrete(self):
        s, t = _pair(40)
        logprobs, ids = _topk_store(t, K)
        raw = np.take_along_axis(t, ids, axis=-1)  # the same entries as logits: logsumexp > 0
        losses.topk_kd(s, logprobs, ids, MASK, divergence="fkl", tail="bucket")  # log-probs pass
        with self.assertRaisesRegex(ValueError, "raw logits"):
            losses.topk_kd(s, raw, ids, MASK, divergence="fkl", tail="bucket")
        # Renormalize mode is invariant to the per-token constant, so logits and log-probs agree there.
        a = losses.topk_kd(s, raw, ids, MASK, divergence="fkl", tail="renormalize")
        b = losses.topk_kd(s, logprobs, ids, MASK, divergence="fkl", tail="renormalize")
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
        # bf16-rounded log-probs of a full distribution may sum a hair above 1: not refused.
        full, full_ids = _topk_store(t, V)
        losses.topk_kd(s, full.astype(jnp.bfloat16), full_ids, MASK, divergence="fkl", tail="bucket")

    def test_check_hparams_raises_the_losses_own_errors(self):
        losses.check_hparams("jsd", temperature=2.0, beta=0.3)
        with self.assertRaisesRegex(ValueError, "beta=1"):
            losses.check_hparams("jsd", beta=1.0)
        with self.assertRaisesRegex(ValueError, "temperature"):
            losses.check_hparams("fkl", temperature=-1.0)
        with self.assertRaisesRegex(ValueError, "alpha"):
            losses.check_hparams("skl", alpha=1.5)
        with self.assertRaises(ValueError):
            losses.check_hparams("nope")
