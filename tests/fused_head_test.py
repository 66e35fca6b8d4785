"""kdjax.fused_head: the chunked head + loss equals kdjax.losses on the full logits h @ w + bias.

Every case runs with padding (masked rows of h hold NaN), a chunk size (3) that does not divide B*T (10),
-inf logits (a -inf vocabulary bias on both sides, a label on a -inf entry, a stored -inf teacher log-prob,
a teacher top-k id the student masks), CE and divergence masks that differ, and temperatures 1 and 2.  The
reference is the unfused path exactly as kdjax.distill runs it: `losses` functions on [B, T, V] logits.
"""

import functools

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import fused_head as fh
from kdjax import losses

B, T, D, V, K = 2, 5, 8, 33, 4
CHUNK = 3  # 10 tokens -> 4 chunks, the last padded with 2 masked rows
CE_MASK = np.array([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]], np.float32)
KD_MASK = np.array([[0, 1, 1, 1, 0], [1, 0, 1, 1, 0]], np.float32)  # on-policy: CE and KD masks differ
STUDENT_MASKED_IDS, TEACHER_MASKED_IDS = (3, 7), (3, 5)
CE_W, KD_W = 0.3, 0.7

LOSS_CASES = (("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.2}), ("tvd", {}), ("skl", {"alpha": 0.1}),
              ("srkl", {"alpha": 0.1}), ("taid", {}))
# (temperature, TAID's t): t < 1 and t = 1 (where TAID is fkl); the other losses ignore t.
SCALARS = ((1.0, 0.4), (2.0, 0.4), (2.0, 1.0))
TAIL_MODES = (("renormalize", False), ("bucket", False), ("bucket", True))  # (tail, with the stored tail)


def _bias(masked_ids):
    return jnp.asarray(np.where(np.isin(np.arange(V), masked_ids), -np.inf, 0.0), jnp.float32)


def _data(seed=0):
    rs = np.random.RandomState(seed)
    f32 = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32)
    h, ht = f32(B, T, D), f32(B, T, D)
    live = (CE_MASK + KD_MASK) > 0
    d = dict(
        h=h,
        h_nan=jnp.where(live[..., None], h, jnp.nan),  # masked rows hold NaN ...
        h_garbage=jnp.where(live[..., None], h, 1e3),  # ... or finite garbage (the unfused reference's input)
        w=f32(D, V) * 0.7, ht_nan=jnp.where(KD_MASK[..., None] > 0, ht, jnp.nan), wt=f32(D, V) * 0.7,
        labels=jnp.asarray(rs.randint(0, V, (B, T)), jnp.int32).at[0, 2].set(3),  # a label on a -inf logit
    )
    d["labels"] = d["labels"].at[1, 1].set(-100)  # filler label at a masked position
    return d


def _topk_teacher(seed=1):
    """A store: the top-k of a teacher with -inf entries, id 7 (masked by the student) forced into one top-k,
    and one stored entry with log-prob -inf (zero teacher mass); tail = exact mass outside the stored ids."""
    rs = np.random.RandomState(seed)
    zt = 2.0 * rs.randn(B, T, V) + np.asarray(_bias(TEACHER_MASKED_IDS))
    zt[1, 2, 7] += 20.0
    logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(zt), axis=-1), np.float64)
    ids = np.argsort(-logprobs, axis=-1)[..., :K]
    ids[0, 1, K - 1] = 3  # the teacher masks id 3: a stored -inf
    lp = np.take_along_axis(logprobs, ids, axis=-1)
    in_set = np.zeros_like(logprobs, bool)
    np.put_along_axis(in_set, ids, True, axis=-1)
    tail = np.log(np.sum(np.where(in_set, 0, np.exp(logprobs)), axis=-1))
    assert 7 in ids[1, 2] and lp[0, 1, K - 1] == -np.inf
    return fh.TopkTeacher(jnp.asarray(lp, jnp.float32), jnp.asarray(ids, jnp.int32), jnp.asarray(tail, jnp.float32))


def _unfused_kd(loss, hparams, z, teacher, temperature, t, tail):
    """The divergence on full logits, dispatched as kdjax.distill does."""
    if isinstance(teacher, fh.TopkTeacher):
        topk = (z, teacher.logprobs_btk, teacher.ids_btk, KD_MASK)
        if loss == "taid":
            return losses.taid_topk(*topk, t=t, temperature=temperature, tail=tail,
                                    teacher_tail_logprob_bt=teacher.tail_logprob_bt)
        return losses.topk_kd(*topk, divergence=loss, temperature=temperature, tail=tail,
                              teacher_tail_logprob_bt=teacher.tail_logprob_bt, **hparams)
    if loss == "taid":
        return losses.taid(z, teacher, KD_MASK, t=t, temperature=temperature)
    return losses.LOSSES[loss](z, teacher, KD_MASK, temperature=temperature, **hparams)


def _student_head(w):
    return fh.Head(w, _bias(STUDENT_MASKED_IDS))


def _dense_teacher(teacher):
    return fh.DenseTeacher(teacher[0], fh.Head(teacher[1], _bias(TEACHER_MASKED_IDS)))


@functools.lru_cache(maxsize=None)
def _fused_all(kind, tail):
    """One jitted program for every loss (one compilation instead of seven):
    fn(h, w, teacher, labels, temperature, t) -> [((total, (ce, kd)), (dh, dw)) per loss in LOSS_CASES].
    The weights enter traced, as kdjax.distill's batch-dependent CE weight does (static ones: below)."""

    def fused(loss, hparams, h, w, teacher, labels, temperature, t, weights):
        teacher = _dense_teacher(teacher) if kind == "dense" else teacher
        out = fh.fused_loss(h, _student_head(w), labels, CE_MASK, chunk_size=CHUNK, teacher=teacher,
                            kd_mask_bt=KD_MASK, loss=loss, hparams=hparams, temperature=temperature,
                            taid_t=t if loss == "taid" else None, tail=tail, ce_weight=weights[0],
                            kd_weight=weights[1])
        return out.total, (out.ce, out.kd)

    def run_all(*args):
        args = (*args, jnp.asarray([CE_W, KD_W], jnp.float32))
        return [jax.value_and_grad(functools.partial(fused, loss, hparams), argnums=(0, 1), has_aux=True)(*args)
                for loss, hparams in LOSS_CASES]

    return jax.jit(run_all)


def _unfused(loss, hparams, kind, tail, h, w, teacher, labels, temperature, t):
    """The reference, eager (its primitives compile once for all cases): ((total, (ce, kd)), (dh, dw))."""

    def objective(h, w):
        z = h @ w + _bias(STUDENT_MASKED_IDS)
        signal = teacher
        if kind == "dense":
            signal = jax.lax.stop_gradient(teacher[0] @ teacher[1] + _bias(TEACHER_MASKED_IDS))
        ce = losses.cross_entropy(z, labels, CE_MASK)
        kd = _unfused_kd(loss, hparams, z, signal, temperature, t, tail)
        return CE_W * ce[0] + KD_W * kd[0], (ce, kd)

    return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, w)


def _close(test, got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    test.assertTrue(np.all(np.isfinite(got)), got)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.max(np.abs(want)), 1e-3))


class FusedEqualsUnfusedTest(parameterized.TestCase):

    def _check(self, kind, teacher, tail="bucket"):
        d = _data()
        fused = _fused_all(kind, tail)
        for temperature, t in SCALARS:
            results = fused(d["h_nan"], d["w"], teacher, d["labels"], temperature, t)
            for (loss, hparams), ((total, (ce, kd)), (dh, dw)) in zip(LOSS_CASES, results):
                with self.subTest(loss=loss, temperature=temperature, t=t):
                    (want, (want_ce, want_kd)), (want_dh, want_dw) = _unfused(
                        loss, hparams, kind, tail, d["h_garbage"], d["w"], teacher, d["labels"], temperature, t)
                    _close(self, total, want)
                    for got_pair, want_pair in ((ce, want_ce), (kd, want_kd)):
                        _close(self, got_pair[0], want_pair[0])
                        self.assertEqual(float(got_pair[1]), float(want_pair[1]))
                    _close(self, dh, want_dh)
                    _close(self, dw, want_dw)
                    # Rows masked for both terms get exactly zero gradient, whatever (NaN) they held.
                    dead = (CE_MASK + KD_MASK) == 0
                    self.assertTrue(np.all(np.asarray(dh)[dead] == 0))
                    self.assertEqual(total.dtype, jnp.float32)

    def test_dense_teacher(self):
        d = _data()
        self._check("dense", (d["ht_nan"], d["wt"]))

    @parameterized.parameters(*TAIL_MODES)
    def test_topk_teacher(self, tail, stored):
        teacher = _topk_teacher()
        if not stored:
            teacher = teacher._replace(tail_logprob_bt=None)
        self._check("topk", teacher, tail)

    def test_ce_only(self):
        d = _data()

        def fused(h, w):
            out = fh.fused_loss(h, fh.Head(w, _bias(STUDENT_MASKED_IDS)), d["labels"], CE_MASK, chunk_size=CHUNK)
            self.assertIsNone(out.kd)
            return out.total, out.ce

        def unfused(h, w):
            ce = losses.cross_entropy(h @ w + _bias(STUDENT_MASKED_IDS), d["labels"], CE_MASK)
            return ce[0], ce

        (total, ce), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(d["h_nan"], d["w"])
        (want, want_ce), want_grads = jax.value_and_grad(unfused, argnums=(0, 1), has_aux=True)(
            d["h_garbage"], d["w"])
        _close(self, total, want)
        _close(self, ce[0], total)
        self.assertEqual(float(ce[1]), float(want_ce[1]))
        for g, wg in zip(grads, want_grads):
            _close(self, g, wg)


def _fkl_total(h, w, teacher, labels, *, chunk_size=CHUNK, layout="dv", bias=True):
    head = fh.Head(w, _bias(STUDENT_MASKED_IDS) if bias else None, layout=layout)
    return fh.fused_loss(h, head, labels, CE_MASK, chunk_size=chunk_size, teacher=_dense_teacher(teacher),
                         kd_mask_bt=KD_MASK, loss="fkl", temperature=2.0, ce_weight=CE_W, kd_weight=KD_W).total


class ChunkingAndDtypesTest(parameterized.TestCase):

    @parameterized.parameters(1, 4, 10, 64)
    def test_any_chunk_size(self, chunk_size):
        # 1 (a chunk per token), 4 (pads 2 rows), 10 (= B*T) and 64 (> B*T: one chunk, no padding).
        d = _data()
        teacher = (d["ht_nan"], d["wt"])
        got, got_grads = jax.value_and_grad(functools.partial(_fkl_total, chunk_size=chunk_size), argnums=(0, 1))(
            d["h_nan"], d["w"], teacher, d["labels"])
        (want, _), want_grads = _unfused("fkl", {}, "dense", "bucket", d["h_garbage"], d["w"], teacher,
                                         d["labels"], 2.0, None)
        _close(self, got, want)
        for g, wg in zip(got_grads, want_grads):
            _close(self, g, wg)

    def test_tied_layout_uses_the_table_as_is(self):
        # A tied model passes embed [V, D] with layout "vd": same values and gradients as w = embed.T.
        d = _data()
        teacher = (d["ht_nan"], d["wt"])
        grad = jax.value_and_grad(_fkl_total, argnums=(0, 1))
        want, (want_dh, want_dw) = grad(d["h_nan"], d["w"], teacher, d["labels"], bias=False)
        got, (dh, dembed) = grad(d["h_nan"], d["w"].T, teacher, d["labels"], layout="vd", bias=False)
        self.assertEqual(dembed.shape, (V, D))
        _close(self, got, want)
        _close(self, dh, want_dh)
        _close(self, dembed.T, want_dw)

    def test_bf16_inputs_match_float32(self):
        # bf16 hidden states and weights in, float32 loss out, gradients back in bf16.  The fused logits
        # accumulate in float32, so values match the float32 path on the same (bf16-representable) inputs
        # closely; gradients pass through bf16 matmuls (cotangent rounded to bf16).
        d = _data()
        bf = lambda x: x.astype(jnp.bfloat16)
        teacher = (bf(d["ht_nan"]), bf(d["wt"]))
        grad = jax.jit(jax.value_and_grad(_fkl_total, argnums=(0, 1)))
        got, (dh, dw) = grad(bf(d["h_nan"]), bf(d["w"]), teacher, d["labels"])
        up = lambda x: x.astype(jnp.float32)
        want, (want_dh, want_dw) = grad(up(bf(d["h_nan"])), up(bf(d["w"])), jax.tree.map(up, teacher),
                                        d["labels"])
        self.assertEqual(got.dtype, jnp.float32)
        self.assertEqual((dh.dtype, dw.dtype), (jnp.bfloat16, jnp.bfloat16))
        _close(self, got, want, rtol=1e-5)
        _close(self, dh, want_dh, rtol=2e-2)
        _close(self, dw, want_dw, rtol=2e-2)

    def test_only_total_carries_gradient(self):
        # The teacher (hidden states, unembedding, store) is a constant, and so are the reported (sum, count)s.
        d = _data()
        args = (d["h"], d["w"], (d["ht_nan"], d["wt"]), d["labels"])
        dteacher = jax.grad(lambda ht, wt: _fkl_total(d["h"], d["w"], (ht, wt), d["labels"]), argnums=(0, 1))(
            *args[2])
        for g in dteacher:
            self.assertTrue(np.all(np.asarray(g) == 0))
        store = _topk_teacher()

        def topk_total(logprobs, h):
            out = fh.fused_loss(h, _student_head(d["w"]), d["labels"], CE_MASK, chunk_size=CHUNK,
                                teacher=store._replace(logprobs_btk=logprobs), loss="jsd", hparams={"beta": 0.2},
                                ce_weight=0.0, kd_weight=1.0)
            return out.total, out.kd[0] + out.ce[0]

        dlogprobs, dh = jax.grad(lambda lp, h: topk_total(lp, h)[0], argnums=(0, 1))(store.logprobs_btk, d["h"])
        self.assertTrue(np.all(np.asarray(dlogprobs) == 0))
        self.assertGreater(float(jnp.max(jnp.abs(dh))), 0)  # the student does get one
        dsums = jax.grad(lambda h: topk_total(store.logprobs_btk, h)[1])(d["h"])
        self.assertTrue(np.all(np.asarray(dsums) == 0))


class MetricsTest(parameterized.TestCase):

    def _compare(self, got, want):
        self.assertEqual(sorted(got), sorted(want))
        for name in want:
            with self.subTest(metric=name):
                _close(self, got[name][0], want[name][0])
                self.assertEqual(float(got[name][1]), float(want[name][1]))

    def test_dense_teacher(self):
        d = _data()
        head = _student_head(d["w"])
        got = jax.jit(functools.partial(fh.fused_metrics, chunk_size=CHUNK))(
            d["h_nan"], head, d["labels"], KD_MASK, teacher=_dense_teacher((d["ht_nan"], d["wt"])))
        z = d["h_garbage"] @ d["w"] + _bias(STUDENT_MASKED_IDS)
        zt = d["ht_nan"] @ d["wt"] + _bias(TEACHER_MASKED_IDS)
        # kdjax.distill.make_eval_fn on full logits:
        want = {"ce": losses.cross_entropy(z, d["labels"], KD_MASK), "kl": losses.forward_kl(z, zt, KD_MASK),
                "teacher_ce": losses.cross_entropy(zt, d["labels"], KD_MASK),
                "top1_agreement": losses.top1_agreement(z, zt, KD_MASK),
                "acceptance": losses.acceptance_rate(z, zt, KD_MASK)}
        self._compare(got, want)

    def test_topk_teacher_and_none(self):
        d = _data()
        head = _student_head(d["w"])
        label_lp = jnp.asarray(np.random.RandomState(3).randn(B, T), jnp.float32).at[1, 1].set(jnp.nan)
        store = _topk_teacher()._replace(label_logprob_bt=label_lp)
        got = fh.fused_metrics(d["h_nan"], head, d["labels"], KD_MASK, chunk_size=CHUNK, teacher=store)
        z = d["h_garbage"] @ d["w"] + _bias(STUDENT_MASKED_IDS)
        valid = KD_MASK > 0
        agree = jnp.argmax(z, axis=-1) == store.ids_btk[..., 0]
        want = {"ce": losses.cross_entropy(z, d["labels"], KD_MASK),
                "teacher_ce": (-jnp.sum(jnp.where(valid, label_lp, 0) * KD_MASK), jnp.sum(KD_MASK)),
                "top1_agreement": (jnp.sum(agree * KD_MASK), jnp.sum(KD_MASK)),
                "kl_topk": losses.topk_kd(z, store.logprobs_btk, store.ids_btk, KD_MASK, divergence="fkl",
                                          tail="bucket", teacher_tail_logprob_bt=store.tail_logprob_bt)}
        self._compare(got, want)
        got = fh.fused_metrics(d["h_nan"], head, d["labels"], KD_MASK, chunk_size=CHUNK)
        self._compare(got, {"ce": want["ce"]})


class MemoryTest(parameterized.TestCase):

    def test_no_full_logits_in_forward_or_backward(self):
        # Compiled (not run): the fused online-JSD value-and-gradient keeps less than one [B*T, V] float32
        # buffer of temporaries; the unfused one needs several (which shows the measure can fail).
        b, t, d, v, chunk = 4, 64, 16, 4096, 16
        h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        labels = jax.ShapeDtypeStruct((b, t), jnp.int32)
        mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

        def fused(h, w, ht, wt, labels, mask):
            teacher = fh.DenseTeacher(ht, fh.Head(wt))
            return fh.fused_loss(h, fh.Head(w), labels, mask, chunk_size=chunk, teacher=teacher,
                                 loss="jsd", ce_weight=0.5, kd_weight=0.5).total

        def unfused(h, w, ht, wt, labels, mask):
            z, zt = h @ w, jax.lax.stop_gradient(ht @ wt)
            return 0.5 * losses.cross_entropy(z, labels, mask)[0] + 0.5 * losses.jsd(z, zt, mask)[0]

        def temp_bytes(fn):
            compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, w, h, w, labels, mask).compile()
            return compiled.memory_analysis().temp_size_in_bytes

        btv = b * t * v * 4
        self.assertLess(temp_bytes(fused), btv)
        self.assertGreater(temp_bytes(unfused), 2 * btv)


class BadInputTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("unknown_loss", dict(loss="kl"), ValueError, "unknown loss"),
        ("no_teacher", dict(loss="fkl", teacher=None), ValueError, "needs a teacher"),
        ("bad_tail", dict(loss="fkl", tail="drop"), ValueError, "tail"),
        ("jsd_beta_1", dict(loss="jsd", hparams={"beta": 1.0}), ValueError, "beta=1"),
        ("unknown_hparam", dict(loss="fkl", hparams={"beta": 0.5}), TypeError, "beta"),
        ("taid_without_t", dict(loss="taid"), ValueError, "taid_t"),
        ("ce_with_kd_weight", dict(loss="ce", kd_weight=0.5), ValueError, "kd_weight"),
        ("vector_weight", dict(loss="fkl", kd_weight=jnp.ones(2)), TypeError, "scalar"),
        ("zero_chunk", dict(loss="fkl", chunk_size=0), ValueError, "chunk_size"),
        ("zero_temperature", dict(loss="fkl", temperature=0.0), ValueError, "temperature"),
        ("bad_layout", dict(loss="fkl", layout="vd"), ValueError, "does not match"),
        ("bad_mask", dict(loss="fkl", kd_mask_bt=np.ones((B, T + 1))), ValueError, "kd_mask_bt"),
        ("bad_store", dict(loss="fkl", teacher="topk_short"), ValueError, "top-k teacher"),
        ("bad_teacher_vocab", dict(loss="fkl", teacher="dense_short"), ValueError, "vocabulary"),
    )
    def test_raises(self, kwargs, error, message):
        d = _data()
        kwargs = dict(kwargs)
        layout = kwargs.pop("layout", "dv")
        teacher = kwargs.pop("teacher", "dense")
        teacher = {"dense": _dense_teacher((d["ht_nan"], d["wt"])),
                   "dense_short": fh.DenseTeacher(d["ht_nan"], fh.Head(d["wt"][:, :-1])),
                   "topk_short": fh.TopkTeacher(jnp.zeros((B, T, K)), jnp.zeros((B, T, K - 1), jnp.int32))
                   }.get(teacher, teacher)
        kwargs = {"chunk_size": CHUNK, "teacher": teacher, "kd_weight": 0.5, **kwargs}
        with self.assertRaisesRegex(error, message):
            fh.fused_loss(d["h"], fh.Head(d["w"], layout=layout), d["labels"], CE_MASK, **kwargs)
