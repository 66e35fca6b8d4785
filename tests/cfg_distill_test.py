"""CFG distillation: the config parses strictly and bad ones are refused before any write; the objective's
distillation part is exactly KL(student || CFG teacher) on the student's own samples, the diversity term adds
exactly beta x its REINFORCE gradient, the teacher gets no gradient, and accumulation does not change a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cfg_distill as config_lib
from experiments import cfg_distill
from kdjax import distill, guidance, losses, run, steps
from kdjax.models import sampling
from kdjax.models.transformer import Transformer, TransformerConfig

NULL = np.zeros((2,), np.int32)  # the null prefix: P = 2 "EOS" tokens
G, N = 3, 5


# ---------------------------------------------------------------- configs and validation


def test_config_parses_its_argument_strictly():
    assert config_lib.get_config(None).guidance == 3.0 and config_lib.get_config("tiny").student.steps >= 2
    for bad in ("small", "Tiny", "tiny,tiny"):
        with pytest.raises(ValueError, match="unknown config argument"):
            config_lib.get_config(bad)


def test_bad_configs_are_refused_before_anything_is_written(tmp_path):
    c = config_lib.get_config("tiny")
    c.betas = (0.3, 0.5)
    c.num_generations = 2
    c.teacher.p_uncond = 0.0
    c.eval.guidances = (1.0, 5.0)
    c.loss = "kl"
    workdir = tmp_path / "w"
    with pytest.raises(run.ConfigError) as err:
        cfg_distill.run_all(c, str(workdir))
    msg = str(err.value)
    for needle in ("include 0", "num_generations must be >= 3", "p_uncond", "must include guidance=3.0",
                   "loss must be one of"):
        assert needle in msg, (needle, msg)
    assert not workdir.exists()
    c = config_lib.get_config("tiny")
    c.kappas = (0.0, 1.5)
    with pytest.raises(run.ConfigError, match="kappas"):
        cfg_distill.validate(c)


# ---------------------------------------------------------------- the objective


def lm(seed, **kw):
    cfg = TransformerConfig.llama(**{**dict(vocab_size=24, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1,
                                            head_dim=8, mlp_dim=32, max_len=16, tie_embeddings=True), **kw})
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


@pytest.fixture(scope="module")
def models():
    graphdef, teacher = lm(0)
    _, other = lm(1)
    student = jax.tree.map(lambda t, o: t + 0.5 * o, teacher, other)  # near the teacher, not equal
    prompts = {"prompt": np.array([[0, 0], [0, 5], [0, 9], [3, 4]], np.int32), "label": np.arange(4, dtype=np.int32)}
    return graphdef, teacher, student, prompts


def objective(graphdef, *, beta, gamma=3.0, loss="rkl"):
    return guidance.make_objective(teacher_graphdef=graphdef, null_prefix_p=NULL, guidance=gamma, loss=loss,
                                   beta=beta, num_generations=G, max_new_tokens=N, eos_id=None)


def prepared_and_grads(graphdef, obj, student, teacher, prompts):
    """The prepared batch (once, as the train step does) and the loss's (sum, count, grad of sum)."""

    @jax.jit
    def run_it(params, frozen):
        batch, _ = obj.prepare(nnx.merge(graphdef, params), prompts, jax.random.key(3), frozen, {})
        batch = jax.lax.stop_gradient(batch)
        f = lambda p: obj.loss(nnx.merge(graphdef, p), batch, jax.random.key(4), frozen, {})[:2]
        (total, count), vjp = jax.vjp(f, params)
        return batch, total, count, vjp((jnp.ones(()), jnp.zeros(())))[0]

    return run_it(student, teacher)


BETA = 0.7


@pytest.fixture(scope="module")
def runs(models):
    """{beta: (prepared batch, loss sum, count, grad of the sum)} for beta = 0 and BETA (compiled once each)."""
    graphdef, teacher, student, prompts = models
    return {b: prepared_and_grads(graphdef, objective(graphdef, beta=b), student, teacher, prompts) for b in (0.0, BETA)}


def test_distillation_part_is_reverse_kl_to_the_cfg_teacher_on_the_students_own_samples(models, runs):
    graphdef, teacher, student, prompts = models
    batch, total, count, grads = runs[0.0]
    tokens = np.asarray(batch["tokens"])
    # The tokens are the student's own samples: G per prompt, prompt-major, the same draw as sampling.sample.
    np.testing.assert_array_equal(tokens[:, :2], np.repeat(prompts["prompt"], G, axis=0))
    want = jax.jit(lambda p: sampling.sample(graphdef, p, jnp.repeat(prompts["prompt"], G, axis=0),
                                             jax.random.split(jax.random.key(3), 4 * G), max_new_tokens=N))(student)
    np.testing.assert_array_equal(tokens, np.asarray(want["tokens"]))
    np.testing.assert_array_equal(np.asarray(batch["kd_mask"]), np.asarray(want["mask"][:, 1:]))
    assert float(jnp.sum(batch["ce_mask"])) == 0.0  # the student's samples are never hard labels

    def formula(params):  # written out from the definitions, not through kdjax.distill
        inputs, mask = jnp.asarray(tokens[:, :-1]), batch["kd_mask"]
        t = nnx.merge(graphdef, teacher)
        cfg = sampling.cfg_logits(t(inputs), t(inputs.at[:, :2].set(0)), guidance=3.0)
        return losses.reverse_kl(nnx.merge(graphdef, params)(inputs), jax.lax.stop_gradient(cfg), mask)[0]

    want_total, want_grads = jax.jit(jax.value_and_grad(formula))(student)
    np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
    assert float(count) == float(jnp.sum(batch["kd_mask"])) == 4 * G * N  # no EOS: every generated token
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_beta_zero_is_the_distillation_objective_and_beta_adds_its_reinforce_gradient(models, runs):
    graphdef, _, student, _ = models
    obj0 = objective(graphdef, beta=0.0)
    # beta = 0 is kdjax.distill's objective itself (its loss and its prepare), nothing added.
    assert obj0.loss.func is distill.objective_loss and "advantage" not in runs[0.0][0]
    (b0, t0, c0, g0), (bb, tb, cb, gb) = runs[0.0], runs[BETA]
    # beta > 0: the same samples and KD targets, plus beta * the REINFORCE surrogate's gradient.
    np.testing.assert_array_equal(np.asarray(bb["tokens"]), np.asarray(b0["tokens"]))
    assert float(cb) == float(c0)
    adv = np.asarray(bb["advantage"]).reshape(-1, G)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5)
    assert np.abs(adv).max() > 0

    def rl(params):
        tokens = bb["tokens"]
        s, _ = guidance.reinforce_surrogate(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:],
                                            bb["kd_mask"], bb["advantage"])
        return s * bb["rl_scale"][0]

    rl_value, rl_grads = jax.jit(jax.value_and_grad(rl))(student)
    np.testing.assert_allclose(float(tb), float(t0) + BETA * float(rl_value), rtol=1e-5)
    for x0, xb, xr in zip(jax.tree.leaves(g0), jax.tree.leaves(gb), jax.tree.leaves(rl_grads)):
        np.testing.assert_allclose(np.asarray(xb), np.asarray(x0) + BETA * np.asarray(xr), rtol=1e-4, atol=1e-6)


def test_the_teacher_gets_no_gradient_and_gamma_one_teacher_is_a_fixed_point(models):
    graphdef, teacher, student, prompts = models
    obj = objective(graphdef, beta=BETA)
    full = lambda frozen, params: obj(nnx.merge(graphdef, params), prompts, jax.random.key(5), frozen, {})[0]
    g_teacher = jax.jit(jax.grad(full))(teacher, student)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_teacher))
    # gamma = 1 and student == teacher: zero distillation loss and gradient.
    obj1 = objective(graphdef, beta=0.0, gamma=1.0)
    total, count, _ = jax.jit(lambda p: obj1(nnx.merge(graphdef, p), prompts, jax.random.key(6), teacher, {}))(teacher)
    assert float(count) > 0 and abs(float(total)) < 1e-6


def test_the_diversity_term_is_exact_whatever_the_number_of_microbatches(models, runs):
    """rl_scale makes sum / count the same whether a step's rows are scored at once or in microbatches."""
    graphdef, teacher, student, _ = models
    obj = objective(graphdef, beta=BETA)
    batch = runs[BETA][0]

    def mean_and_grads(accum):
        fn = lambda p, mb, rng: (lambda t, c, a: (t, (c, a)))(*obj.loss(nnx.merge(graphdef, p), mb, rng, teacher, {}))
        acc = steps.accumulate_gradients(fn, student, batch, jax.random.key(0), accum)
        return acc.total / acc.count, jax.tree.map(lambda g: g / acc.count, acc.grads)

    (m1, g1), (m3, g3) = jax.jit(lambda: (mean_and_grads(1), mean_and_grads(3)))()
    np.testing.assert_allclose(float(m3), float(m1), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-7)


def test_objective_refuses_what_it_cannot_train(models):
    graphdef = models[0]
    with pytest.raises(ValueError, match=">= 3"):
        guidance.make_objective(teacher_graphdef=graphdef, null_prefix_p=NULL, guidance=3.0, beta=0.1,
                                num_generations=2, max_new_tokens=N)
    with pytest.raises(ValueError, match="not a divergence"):
        guidance.make_objective(teacher_graphdef=graphdef, null_prefix_p=NULL, guidance=3.0, loss="ce",
                                max_new_tokens=N)
    with pytest.raises(ValueError, match="embedding"):
        guidance.make_objective(teacher_graphdef=graphdef, null_prefix_p=NULL, guidance=3.0, beta=0.1,
                                embedding="clip", max_new_tokens=N)


def test_targets_and_markdown_from_rows():
    c = config_lib.get_config("tiny")
    row = lambda model, kind, q, d, f, **kw: dict(model=model, kind=kind, quality=q, diversity=d, forwards_per_token=f,
                                                  **kw)
    rows = [row("teacher_g1", "cfg_teacher", 0.3, 0.5, 1, guidance=1.0), row("teacher_g2", "cfg_teacher", 0.5, 0.4, 2, guidance=2.0),
            row("teacher_g3", "cfg_teacher", 0.6, 0.3, 2, guidance=3.0), row("teacher_g5", "cfg_teacher", 0.62, 0.2, 2, guidance=5.0),
            row("student_b0", "student", 0.55, 0.28, 1, beta=0.0), row("student_b0.5", "student", 0.56, 0.35, 1, beta=0.5),
            row("interp_k0", "interpolation", 0.55, 0.28, 1, kappa=0.0), row("interp_k1", "interpolation", 0.56, 0.35, 1, kappa=1.0)]
    t = cfg_distill.targets(c, rows)
    assert t["quality_student_vs_cfg"]["met"] and t["quality_student_vs_cfg"]["ratio"] == pytest.approx(0.55 / 0.6)
    assert t["diverse_student_vs_cfg"]["met"]
    assert t["interpolation_above_cfg_curve"]["points"] == {"interp_k0": False, "interp_k1": True}
    rows[4]["quality"] = 0.5
    assert not cfg_distill.targets(c, rows)["quality_student_vs_cfg"]["met"]
