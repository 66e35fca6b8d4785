"""kdjax.diffusion: schedule identities, conversions, exact samplers on Gaussian data, exact distillation
targets, guidance, label dropout, the stage-1 / stage-2 objectives and request validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import diffusion as d

SHAPES = [(7,), (3, 2), (2, 4, 4, 1)]

# Gaussian data x ~ N(m, diag s^2) per class: E[x | z_t] is closed form, the exact denoiser.
MEANS = np.array([[0.5, -0.3], [-0.6, 0.2]])
STDS = np.array([0.4, 0.8])


def exact_x(z, logsnr_b, labels_b=None):
    """E[x | z_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha m) for class-conditional Gaussians."""
    m = jnp.asarray(MEANS, z.dtype)[0 if labels_b is None else labels_b]
    m = jnp.broadcast_to(m, z.shape)
    a, s = d.alpha_sigma(logsnr_b[:, None].astype(z.dtype))
    v = jnp.asarray(STDS, z.dtype) ** 2
    return m + a * v / (a * a * v + s * s) * (z - a * m)


def plain(x_fn):
    return lambda z, logsnr: (x_fn(z, logsnr), 1)


# ---------------------------------------------------------------- schedule and conversions


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_schedule_identities_and_endpoints(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        t = jnp.linspace(0.0, 1.0, 1001, dtype=dtype)
        logsnr = d.cosine_logsnr(t)
        alpha, sigma = d.alpha_sigma(logsnr)
        assert logsnr.dtype == alpha.dtype == sigma.dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=tol)
        assert np.all(np.diff(np.asarray(logsnr)) < 0)  # strictly decreasing
        np.testing.assert_allclose(logsnr[0], d.LOGSNR_MAX, rtol=1e-4)
        np.testing.assert_allclose(logsnr[-1], d.LOGSNR_MIN, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(alpha**2), np.asarray(jax.nn.sigmoid(logsnr)), rtol=1e-5)
        # The inverse maps back to t.
        np.testing.assert_allclose(d.cosine_t(logsnr), t, atol=1e-5 if dtype == jnp.float32 else 1e-10)
        # sigma ratio from softplus equals the direct one.
        np.testing.assert_allclose(
            d.sigma_ratio(logsnr[600], logsnr[300]), sigma[300] / sigma[600], rtol=1e-5
        )
    other = d.cosine_logsnr(jnp.array([0.0, 1.0]), logsnr_min=-5.0, logsnr_max=8.0)
    np.testing.assert_allclose(other, [8.0, -5.0], rtol=1e-4)
    with pytest.raises(ValueError, match="logsnr_min"):
        d.cosine_logsnr(0.5, logsnr_min=3.0, logsnr_max=2.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_conversions_round_trip_any_shape_and_dtype(shape, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(k1, shape, dtype)
        eps = jax.random.normal(k2, shape, dtype)
        logsnr = jax.random.uniform(k3, shape[:1], dtype, -6.0, 6.0)
        z = d.diffuse(x, eps, logsnr)
        v = d.v_from_x_eps(x, eps, logsnr)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-10, atol=1e-10)
        for got, want in [
            (d.x_from_v(z, v, logsnr), x),
            (d.eps_from_v(z, v, logsnr), eps),
            (d.eps_from_x(z, x, logsnr), eps),
            (d.x_from_eps(z, eps, logsnr), x),
            (d.x_from_output(x, z, logsnr, prediction="x"), x),
            (d.x_from_output(eps, z, logsnr, prediction="eps"), x),
            (d.x_from_output(v, z, logsnr, prediction="v"), x),
        ]:
            assert got.dtype == dtype and got.shape == shape
            np.testing.assert_allclose(got, want, **tol)
    with pytest.raises(ValueError, match="prediction"):
        d.x_from_output(x, z, logsnr, prediction="score")


def test_loss_weights_are_the_eps_and_v_losses():
    with jax.enable_x64(True):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
        x = jax.random.normal(k1, (64, 3, 3), jnp.float64)
        eps = jax.random.normal(k2, x.shape, jnp.float64)
        logsnr = jax.random.uniform(k3, (64,), jnp.float64, -8.0, 8.0)
        z = d.diffuse(x, eps, logsnr)
        x_hat = x + 0.1 * jax.random.normal(k4, x.shape, jnp.float64)
        per = lambda a, b: np.mean(np.asarray(a - b).reshape(64, -1) ** 2, axis=1)
        x_err = per(x_hat, x)
        eps_err = per(d.eps_from_x(z, x_hat, logsnr), eps)
        v_err = per(d.v_from_x_eps(x_hat, d.eps_from_x(z, x_hat, logsnr), logsnr), d.v_from_x_eps(x, eps, logsnr))
        total, count = d.snr_trunc_loss(x_hat, x, logsnr)
        np.testing.assert_allclose(total, np.sum(np.maximum(x_err, eps_err)), rtol=1e-9)
        assert count == 64
        total, count = d.snr_plus_one_loss(x_hat, x, logsnr)
        np.testing.assert_allclose(total, np.sum(v_err), rtol=1e-9)
        mask = (np.arange(64) % 3 == 0).astype(np.float64)
        total, count = d.snr_plus_one_loss(x_hat, x, logsnr, mask)
        np.testing.assert_allclose(total, np.sum(v_err * mask), rtol=1e-9)
        assert count == mask.sum()
        with pytest.raises(ValueError, match="weighting"):
            d.weighted_x_mse(x_hat, x, logsnr, weighting="uniform")


# ---------------------------------------------------------------- DDIM and the distillation target


def test_ddim_step_with_true_x_follows_the_forward_process():
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(2))
        x = jax.random.normal(k1, (5, 4), jnp.float64)
        eps = jax.random.normal(k2, x.shape, jnp.float64)
        lt, ls = jnp.full((5,), -3.0), jnp.full((5,), 2.5)
        z_s = d.ddim_step(d.diffuse(x, eps, lt), x, lt, ls)
        np.testing.assert_allclose(z_s, d.diffuse(x, eps, ls), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_distill_target_lands_on_z_s(shape):
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(3))
        z_t = jax.random.normal(k1, shape, jnp.float64)
        z_s = jax.random.normal(k2, shape, jnp.float64)
        lt, ls = jnp.full(shape[:1], -1.0), jnp.full(shape[:1], 4.0)
        x_tilde = d.distill_target(z_t, z_s, lt, ls)
        np.testing.assert_allclose(d.ddim_step(z_t, x_tilde, lt, ls), z_s, rtol=1e-10, atol=1e-10)
    # float32 in, float32 out.
    assert d.distill_target(np.ones(shape, np.float32), np.ones(shape, np.float32), -1.0, 4.0).dtype == jnp.float32


@pytest.mark.parametrize("n_student", [1, 2, 4, 8])
def test_progressive_target_is_exact(n_student):
    """One student DDIM step with x_tilde == two teacher DDIM steps, at every grid step (the i = 0 branch too),
    so an N-step sampler of the target-predicting student equals the 2N-step teacher sampler."""
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(4), (6, 2), jnp.float64)

        @jax.jit
        def one_vs_two(i_b):
            lt, lm, ls = d.student_grid(i_b, n_student)
            x_tilde = d.progressive_target(exact_x, z, i_b, n_student)
            z_mid = d.ddim_step(z, exact_x(z, lt), lt, lm)
            x2 = exact_x(z_mid, lm)
            return x_tilde, x2, d.ddim_step(z, x_tilde, lt, ls), d.ddim_step(z_mid, x2, lm, ls)

        for i in range(n_student):
            x_tilde, x2, student_z, teacher_z = one_vs_two(jnp.full((6,), i))
            if i == 0:  # the sampler's last step returns x_hat: the target is the teacher's second x_hat
                np.testing.assert_allclose(x_tilde, x2, atol=1e-12)
            else:
                np.testing.assert_allclose(student_z, teacher_z, atol=1e-10)

        def student(z_, logsnr_b):
            i_b = jnp.round(d.cosine_t(logsnr_b) * n_student).astype(jnp.int32) - 1
            return d.progressive_target(exact_x, z_, i_b, n_student), 1

        z1 = jax.random.normal(jax.random.key(5), (6, 2), jnp.float64)
        got, evals = jax.jit(functools.partial(d.ddim_sample, student, num_steps=n_student))(z1)
        want, teacher_evals = jax.jit(functools.partial(d.ddim_sample, plain(exact_x), num_steps=2 * n_student))(z1)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert int(evals) == n_student and int(teacher_evals) == 2 * n_student


# ---------------------------------------------------------------- samplers on Gaussian data


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 256), ("ancestral", 1024)])
def test_samplers_map_noise_to_the_gaussian_data(sampler, num_steps):
    n = 20000
    labels = jnp.arange(n) % 2
    denoise = plain(lambda z, l: exact_x(z, l, labels))
    run = jax.jit(lambda key: d.sample(denoise, key, (n, 2), num_steps=num_steps, sampler=sampler))
    x, evals = run(jax.random.key(6))
    assert int(evals) == num_steps
    x = np.asarray(x)
    for c in range(2):
        xc = x[np.asarray(labels) == c]
        se_mean = STDS / np.sqrt(len(xc))
        se_std = STDS / np.sqrt(2 * len(xc))
        assert np.all(np.abs(xc.mean(0) - MEANS[c]) < 5 * se_mean), (xc.mean(0), MEANS[c])
        # 5 standard errors plus the O(1/N) discretisation bias (measured < 1% at these N).
        assert np.all(np.abs(xc.std(0) - STDS) < 5 * se_std + 0.01 * STDS), (xc.std(0), STDS)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_are_deterministic_by_key(sampler):
    denoise = plain(lambda z, l: exact_x(z, l))
    run = jax.jit(functools.partial(d.sample, denoise, shape=(32, 2), num_steps=8, sampler=sampler, clip=True))
    a, _ = run(jax.random.key(7))
    b, _ = run(jax.random.key(7))
    c, _ = run(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.abs(np.asarray(a)) <= 1.0)  # clip bounds the returned x_hat
    with pytest.raises(ValueError, match="sampler"):
        d.sample(denoise, jax.random.key(0), (2, 2), num_steps=2, sampler="heun")
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(denoise, jax.random.key(0), (2, 2), num_steps=0)


# ---------------------------------------------------------------- guidance


def test_guidance_formula_and_w_zero_is_conditional():
    k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
    xc = jax.random.normal(k1, (5, 3))
    xu = jax.random.normal(k2, (5, 3))
    w = jax.random.uniform(k3, (5,), maxval=4.0)
    np.testing.assert_allclose(d.guide(xc, xu, w), (1 + w[:, None]) * xc - w[:, None] * xu, rtol=1e-6)
    np.testing.assert_array_equal(d.guide(xc, xu, 0.0), xc)


def test_guided_x_is_one_batched_forward_of_cond_and_null():
    calls = []

    def x_fn(z, logsnr, labels):
        calls.append((z.shape[0], np.asarray(labels)))
        return exact_x(z, logsnr, jnp.minimum(labels, 1)) + 0.1 * labels[:, None]

    z = jax.random.normal(jax.random.key(10), (4, 2))
    logsnr = jnp.full((4,), 0.5)
    labels = jnp.array([0, 1, 1, 0])
    w = jnp.array([0.0, 1.0, 2.0, 4.0])
    got = d.guided_x(x_fn, z, logsnr, labels, w, null_class=2)
    assert len(calls) == 1 and calls[0][0] == 8
    np.testing.assert_array_equal(calls[0][1], [0, 1, 1, 0, 2, 2, 2, 2])
    cond = exact_x(z, logsnr, labels) + 0.1 * labels[:, None]
    null = exact_x(z, logsnr, jnp.ones_like(labels)) + 0.2
    np.testing.assert_allclose(got, (1 + w[:, None]) * cond - w[:, None] * null, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], cond[0], rtol=1e-6)  # w = 0: the conditional model

    # A guided denoiser counts 2 evaluations per step.
    traced_fn = lambda z_, l_, c_: exact_x(z_, l_, jnp.minimum(c_, 1))
    guided = lambda z_, l_: (d.guided_x(traced_fn, z_, l_, labels, w, null_class=2), 2)
    _, evals = d.ddim_sample(guided, z, num_steps=3)
    assert int(evals) == 6


def test_label_dropout_happens_at_p_uncond():
    n, p = 200_000, 0.15
    labels = jnp.arange(n) % 7
    out = np.asarray(d.drop_labels(jax.random.key(11), labels, p_uncond=p, null_class=7))
    dropped = out == 7
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert not np.any(np.asarray(d.drop_labels(jax.random.key(0), labels, p_uncond=0.0, null_class=7)) == 7)
    assert np.all(np.asarray(d.drop_labels(jax.random.key(0), labels, p_uncond=1.0, null_class=7)) == 7)
    with pytest.raises(ValueError, match="p_uncond"):
        d.drop_labels(jax.random.key(0), labels, p_uncond=1.5, null_class=7)


# ---------------------------------------------------------------- distillation objectives


def _data(n=16):
    k1, k2 = jax.random.split(jax.random.key(12))
    return jax.random.normal(k1, (n, 2)), jax.random.randint(k2, (n,), 0, 2)


def _teacher_x(z, logsnr, labels):
    # An exact conditional denoiser whose null class (2) is the class-average model.
    cond = exact_x(z, logsnr, jnp.minimum(labels, 1))
    avg = 0.5 * (exact_x(z, logsnr, jnp.zeros_like(labels)) + exact_x(z, logsnr, jnp.ones_like(labels)))
    return jnp.where((labels == 2)[:, None], avg, cond)


def test_stage1_loss_is_zero_when_the_student_is_the_guided_teacher():
    x, labels = _data()
    kw = dict(w_min=0.0, w_max=4.0, null_class=2, weighting="snr_trunc")
    wrapper = lambda z, l, c, w: d.guided_x(_teacher_x, z, l, c, w, null_class=2)
    loss = jax.jit(lambda student: d.guided_distill_loss(student, _teacher_x, x, labels, jax.random.key(13), **kw),
                   static_argnums=0)
    total, count = loss(wrapper)
    assert float(total) == 0.0 and count == 16
    unguided = lambda z, l, c, w: _teacher_x(z, l, c)  # ignores w: wrong for any w > 0
    total, _ = loss(unguided)
    assert float(total) > 0.0


def test_stage2_loss_zero_for_the_target_student_and_halving_rules():
    with jax.enable_x64(True):
        x, labels = _data()
        x = x.astype(jnp.float64)
        n = 4
        teacher = lambda z, l, c, w: d.guided_x(_teacher_x, z, l, c, w, null_class=2)

        def student(z, logsnr, c, w):
            i_b = jnp.round(d.cosine_t(logsnr) * n).astype(jnp.int32) - 1
            return d.progressive_target(lambda z_, l_: teacher(z_, l_, c, w), z, i_b, n)

        kw = dict(num_student_steps=n, w_min=0.0, w_max=4.0, weighting="snr_plus_one")
        loss = jax.jit(
            lambda s_: d.progressive_distill_loss(s_, teacher, x, labels, jax.random.key(14), **kw), static_argnums=0
        )
        total, count = loss(student)
        assert float(total) < 1e-12 and count == 16
        total, _ = loss(teacher)
        assert float(total) > 1e-6  # the teacher's own one-step prediction is not the two-step target
    assert [d.halve_steps(k) for k in (256, 8, 2)] == [128, 4, 1]
    for bad in (6, 12, 1, 0, -4, 4.0):
        with pytest.raises(ValueError, match="power of two"):
            d.halve_steps(bad)


def test_unknown_class_or_w_outside_the_trained_range_is_a_clear_error():
    d.check_request(np.array([0, 9]), 4.0, num_classes=10, w_range=(0.0, 4.0))
    with pytest.raises(ValueError, match="unknown class id 10"):
        d.check_request(np.array([0, 10]), 1.0, num_classes=10, w_range=(0.0, 4.0))
    with pytest.raises(ValueError, match="unknown class id -1"):
        d.check_request(np.array([-1]), num_classes=10)
    with pytest.raises(ValueError, match=r"w=4.5 is outside the range \[0.0, 4.0\]"):
        d.check_request(np.array([1]), [1.0, 4.5], num_classes=10, w_range=(0.0, 4.0))
    with pytest.raises(ValueError, match="integers"):
        d.check_request(np.array([1.5]), num_classes=10)
