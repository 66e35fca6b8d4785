"""DistillSpec end to end on the :tiny config, and the properties its evaluation rests on."""

import contextlib
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import distillspec as ds_config
from experiments import distillspec, lm_distill
from kdjax import distill, run, sharding, specdec, steps
from kdjax.data import hf_tokenizer
from kdjax.data.tokenizer import train_bpe
from kdjax.metrics import read_metrics
from kdjax.models import sampling
from kdjax.models.transformer import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache):
    c = ds_config.get_config("tiny")
    c.base.data.cache_dir = c.draft.data.cache_dir = cache
    c.base.checkpoint_every = 2  # a checkpoint half way, to kill the base LM after
    return c


def _overrides(cache):
    return [f"--config.base.data.cache_dir={cache}", f"--config.draft.data.cache_dir={cache}",
            "--config.base.checkpoint_every=2"]


def launch(workdir, cache, *extra):
    """The experiment's command on one CPU device (as the notebook runs it, so that it loads these programs
    from the suite's compilation cache)."""
    cmd = [sys.executable, "-m", "experiments.distillspec", "--config", "configs/distillspec.py:tiny",
           "--workdir", workdir, *_overrides(cache), *extra]
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The :tiny experiment, SIGKILLed during stage 1 (the base LM), then rerun to the end."""
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("ds") / "w")
    proc = launch(workdir, cache, "--config.base.debug_sleep_per_step=0.5")
    ckpts, deadline = os.path.join(workdir, "base", "checkpoints"), time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and "2" in os.listdir(ckpts):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    log = finish(launch(workdir, cache))
    results = json.load(open(os.path.join(workdir, "results.json")))
    return dict(workdir=workdir, cache=cache, config=tiny_config(cache), results=results, log=log,
                killed_at=killed_at)


def test_a_killed_stage_resumes_and_a_rerun_reuses_every_finished_stage(finished):
    w, log = finished["workdir"], finished["log"]
    assert finished["killed_at"] and finished["killed_at"][-1] < 4
    assert f"resumed from step {finished['killed_at'][-1]}" in log
    logged = [r["step"] for r in read_metrics(os.path.join(w, "base")) if "train/loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 4
    trained = ["base", "draft_init", "raw"] + [distillspec.slug(r[0]) for r in finished["config"].runs]
    stage_dirs = trained + ["target"]
    before = {d: open(os.path.join(w, d, "metrics.jsonl")).read() for d in trained}
    before["target"] = sorted(os.listdir(os.path.join(w, "target", "checkpoints")))
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        results = distillspec.run_all(finished["config"], w, command="test")
    assert again.getvalue().count("finished earlier") == len(stage_dirs)
    assert again.getvalue().count("reusing") == 2  # acceptance.json and speed.json
    after = {d: open(os.path.join(w, d, "metrics.jsonl")).read() for d in trained}
    after["target"] = sorted(os.listdir(os.path.join(w, "target", "checkpoints")))
    assert after == before
    assert results["acceptance"] == finished["results"]["acceptance"]


def test_the_distilled_drafts_train_their_rows_method_from_the_cross_entropy_start(finished):
    config, w = finished["config"], finished["workdir"]
    for name, mode, loss, fraction, temperature in config.runs:
        path = os.path.join(w, distillspec.slug(name))
        cfg = distillspec.hostio.read_json(os.path.join(path, "config.json"))
        assert (cfg["mode"], cfg["loss"], cfg["on_policy_fraction"], cfg["sample_temperature"]) == (
            mode, loss, fraction, temperature)
        assert cfg["student"]["init_workdir"] == os.path.join(w, "draft_init")
        records = [r for r in read_metrics(path) if "train/loss" in r]
        assert [r["step"] for r in records] == [1, 2], name
        assert all(np.isfinite(r["train/loss"]) and np.isfinite(r["train/kd"]) for r in records), name
    raw = distillspec.hostio.read_json(os.path.join(w, "raw", "config.json"))
    assert (raw["mode"], raw["loss"], raw["steps"]) == ("offline", "ce", config.draft.steps)


def test_the_sweep_covers_every_data_source_and_divergence_with_valid_stage_configs():
    """DistillSpec's data sources (fixed data, target-generated greedy and sampled, draft-generated, a
    mixture) and divergences (fkl, rkl, jsd, tvd, TVD++) each map to an lm_distill config that its own
    validation accepts; each (mode, loss) trains 2 steps through lm_distill.train in lm_distill_test.py."""
    config = ds_config.get_config("sweep")
    runs = config.runs
    assert {(m, f == 1.0) for _, m, _, f, _ in runs} >= {("online", True), ("teacher_generated", True),
                                                          ("on_policy", True), ("on_policy", False)}
    assert {t for _, m, _, _, t in runs if m == "teacher_generated"} == {0.0, 1.0}  # greedy and sampled target
    assert {loss for _, _, loss, _, _ in runs} == {"fkl", "rkl", "jsd", "tvd", "tvdpp"}
    distillspec.validate(config)
    stages = distillspec.draft_stages(config, "/w", ("/w/target", ""))
    assert [s[0] for s in stages] == ["draft_init", distillspec.RAW] + [r[0] for r in runs]
    for (name, path, c), row in zip(stages[2:], runs):
        assert path == os.path.join("/w", distillspec.slug(name))
        assert (c.mode, c.loss, c.on_policy_fraction, c.sample_temperature) == row[1:]
        assert (c.teacher.workdir, c.student.init_workdir) == ("/w/target", "/w/draft_init")
        with pytest.raises(run.ConfigError) as err:  # nothing but the two directories stages 1 and 1b make
            lm_distill.validate(c)
        assert str(err.value).endswith("(2 problem(s)):\n  - teacher.workdir '/w/target' does not exist\n"
                                       "  - student.init_workdir '/w/draft_init' does not exist"), name


def test_results_tables_and_plots(finished):
    w, r, config = finished["workdir"], finished["results"], finished["config"]
    for name in ("results.md", "results.json", "tau_vs_gamma.png", "speedup_vs_eps.png"):
        assert os.path.getsize(os.path.join(w, name)) > 0, name
    e = config.eval
    names = ["raw"] + [row[0] for row in config.runs]
    assert sorted(r["drafts"]) == sorted(names)  # (results.json's keys are sorted)
    assert [x["draft"] for x in r["acceptance"] if x["lenience"] == 1.0][0] == "raw"  # the baseline first
    exact = [x for x in r["acceptance"] if x["lenience"] == 1.0]
    assert {(x["draft"], x["gamma"], x["temperature"]) for x in exact} == {
        (n, g, t) for n in names for g in e.gammas for t in e.temperatures}
    for x in r["acceptance"]:
        assert 0 <= x["alpha_hat"] <= 1 and 0 <= x["alpha_tf"] <= 1 + 1e-6
        # tau_hat counts the blocks' tokens, so it is 1 + gamma * accepted / proposed exactly.
        np.testing.assert_allclose(x["tau_hat"], 1 + x["gamma"] * x["accepted_over_proposed"], rtol=1e-12)
        assert 1 <= x["tau_hat"] <= x["gamma"] + 1
        if x["temperature"] == 0:
            assert x["same_as_target_greedy"]
            assert x["alpha_hat"] == x["alpha_tested"]  # greedy acceptance is deterministic given the prefix
    for x in r["speed"]:
        if x["temperature"] == 0:
            assert x["same_as_target_greedy"]
    lossy = {x["lenience"] for x in r["acceptance"] if x["gamma"] == e.lossy_gamma and x["temperature"] == 1.0}
    assert lossy == set(e.lenience)
    md = open(os.path.join(w, "results.md")).read()
    assert "## The issue's targets" in md and "c = " in md and "| raw | 0.5 |" in md


def test_eval_only_on_two_work_directories_reproduces_the_experiments_acceptance(finished, tmp_path):
    w, config = finished["workdir"], finished["config"]
    head = distillspec.slug(config.runs[0][0])
    finish(launch(str(tmp_path / "eval"), finished["cache"], "--eval_only",
                  f"--config.target_workdir={os.path.join(w, 'target')}",
                  f"--config.eval.drafts=raw={os.path.join(w, 'raw')},head={os.path.join(w, head)}"))
    out = json.load(open(tmp_path / "eval" / "results.json"))
    assert sorted(out["drafts"]) == ["head", "raw"]
    rename = {"raw": "raw", config.runs[0][0]: "head"}
    want = [{**x, "draft": rename[x["draft"]]} for x in finished["results"]["acceptance"]
            if x["draft"] in rename and x["lenience"] == 1.0]
    assert [x for x in out["acceptance"] if x["lenience"] == 1.0] == want
    assert os.path.exists(tmp_path / "eval" / "results.md")


def test_a_draft_with_another_tokenizer_is_refused_by_name_before_any_compile(finished, tmp_path):
    w, config = finished["workdir"], finished["config"].copy_and_resolve_references()
    other = tmp_path / "other_draft"
    shutil.copytree(os.path.join(w, "raw"), other)
    # Same vocabulary size, another vocabulary: a tokenizer trained on other text.
    texts = [inspect.getsource(m) for m in (contextlib, io, shutil, signal, subprocess)]
    odd = train_bpe(texts, vocab_size=config.base.data.vocab_size)
    hf_tokenizer.save_tokenizer_files(str(other), odd, model_max_length=config.draft.data.seq_len)
    config.target_workdir = os.path.join(w, "target")
    config.eval.drafts = f"raw={os.path.join(w, 'raw')},odd={other}"
    compiled = (distillspec._spec_tally._cache_size(), distillspec._teacher_forced._cache_size(),
                specdec._run._cache_size())
    with pytest.raises(run.ConfigError, match=r"tokenizer mismatch between target .* and draft odd"):
        distillspec.run_all(config, str(tmp_path / "eval"), eval_only=True, command="test")
    assert (distillspec._spec_tally._cache_size(), distillspec._teacher_forced._cache_size(),
            specdec._run._cache_size()) == compiled
    assert not os.path.exists(tmp_path / "eval")


def test_configs_and_bad_input_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown config argument"):
        ds_config.get_config("huge")
    for arg in ("tiny", "sweep", None):
        distillspec.validate(ds_config.get_config(arg))
    c = ds_config.get_config("tiny")
    c.runs = (("a", "on_policy", "tvdpp", 0.5, 1.0), ("raw", "online", "fkl", 1.0, 1.0),
              ("b", "online", "jsd", 1.0, 1.0))
    c.draft.jsd_beta = 1.5
    c.eval.lenience = (1.0, 1.5)
    c.eval.timing_gammas = (4,)
    c.eval.new_tokens = 100
    workdir = tmp_path / "w"
    with pytest.raises(run.ConfigError) as e:
        distillspec.run_all(c, str(workdir))
    message = str(e.value)
    for needle in ("tvdpp", "'raw'", "beta", "eval.lenience", "eval.timing_gammas", "exceeds draft.data.seq_len"):
        assert needle in message, (needle, message)
    c = ds_config.get_config("tiny")
    c.eval.drafts = "raw=/nonexistent"
    with pytest.raises(run.ConfigError) as e:
        distillspec.run_all(c, str(workdir), eval_only=True)
    assert "--eval_only needs the target" in str(e.value) and "raw='/nonexistent'" in str(e.value)
    assert not workdir.exists()


# ---------------------------------------------------------------- the real-size target with the base's predictions


def test_the_embedded_target_computes_the_base_function_at_the_target_size():
    base_cfg = TransformerConfig.llama(vocab_size=32, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2,
                                       head_dim=8, mlp_dim=24, max_len=16, tie_embeddings=True)
    base = nnx.split(Transformer(base_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    base = (base[0], jax.tree.map(lambda x: 3.0 * x, base[1]))  # away from the near-uniform initialisation
    big = ds_config.get_config("tiny").target_model
    big.num_layers, big.embed_dim, big.num_heads, big.num_kv_heads, big.mlp_dim = 5, 40, 8, 4, 64
    cfg = distillspec.target_config(base_cfg, big)
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim) == (5, 40, 8, 8)
    assert cfg.num_params() > 4 * base_cfg.num_params()
    abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = distillspec.embed_params(base[1], abstract[1], norm_scale=float(np.sqrt(16 / 40)))
    tokens = jax.random.randint(jax.random.key(0), (3, 16), 0, 32)
    want = nnx.merge(*base)(tokens)
    got = nnx.merge(abstract[0], params)(tokens)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))
    # The KV-cache path (what speculative sampling runs) too: greedy decoding is identical.
    keys = jax.random.split(jax.random.key(1), 3)
    a = sampling.sample(base[0], base[1], tokens[:, :4], keys, max_new_tokens=10, temperature=0.0)
    b = sampling.sample(abstract[0], params, tokens[:, :4], keys, max_new_tokens=10, temperature=0.0)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # Negative control: without the norm rescaling the function changes.
    wrong = distillspec.embed_params(base[1], abstract[1], norm_scale=1.0)
    assert float(jnp.max(jnp.abs(nnx.merge(abstract[0], wrong)(tokens) - want))) > 1e-2


def test_a_target_that_cannot_hold_the_base_is_refused():
    base_cfg = TransformerConfig.llama(vocab_size=32, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2,
                                       head_dim=8, mlp_dim=24, max_len=16)
    big = ds_config.get_config("tiny").target_model
    for sizes, message in (
        (dict(num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=32), "num_layers"),
        (dict(num_layers=2, embed_dim=32, num_heads=8, num_kv_heads=2, mlp_dim=32), "group size"),
    ):
        for k, v in sizes.items():
            big[k] = v
        with pytest.raises(ValueError, match=message):
            distillspec.target_config(base_cfg, big)
    big.num_heads, big.num_kv_heads = 4, 4  # GPT-2 has as many kv heads as heads
    with pytest.raises(ValueError, match="RMSNorm"):
        distillspec.target_config(TransformerConfig.gpt2(vocab_size=32, num_layers=2, embed_dim=16, num_heads=4,
                                                         head_dim=4, mlp_dim=24, max_len=16), big)


# ---------------------------------------------------------------- the evaluation's statistics on a toy pair


V = 12


def toy_pair(noise):
    """A random target and a draft = the target's weights perturbed by `noise` (so alpha is in between)."""
    cfg = TransformerConfig.llama(vocab_size=V, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, mlp_dim=32, max_len=40)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda x: 6.0 * x, params)  # peakier distributions than at initialisation
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + noise * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return (graphdef, params), (graphdef, jax.tree.unflatten(tree, noisy))


@pytest.mark.parametrize("gamma", [1, 3])
def test_measured_acceptance_agrees_with_the_teacher_forced_prediction(gamma):
    target, draft = toy_pair(0.2)
    prompts = np.asarray(jax.random.randint(jax.random.key(5), (64, 4), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(2), 64)
    opts = specdec.SpecOptions(max_new_tokens=24, gamma=gamma, temperature=1.0)
    tally = distillspec.spec_tally(target, draft, prompts, keys, opts)
    # The tally runs the library's loop body: the same output and counters as speculative_sample.
    ref = specdec.speculative_sample(target, draft, prompts, keys, max_new_tokens=24, gamma=gamma)
    for k in ("tokens", "mask", "target_calls", "accepted_b", "proposed_b"):
        np.testing.assert_array_equal(tally[k], ref[k], err_msg=k)
    assert int(tally["accepted_bl"].sum()) <= int(ref["accepted_b"].sum())  # the window cuts the overshoot
    row, _ = distillspec.measure_acceptance(target, draft, prompts, keys, gamma=gamma, temperature=1.0,
                                            lenience=1.0, new_tokens=24)
    assert 0.3 < row["alpha_hat"] < 0.9 and row["tested"] > 800
    # Each tested draft token is accepted with probability beta(prefix): the difference is a martingale.
    assert abs(row["z"]) < 4, row
    assert abs(row["alpha_hat"] - row["alpha_tested"]) < 4 * row["se"]
    # Negative control: the prediction of another acceptance rule (eps = 0.5) is rejected by the same test.
    beta_wrong, nll = distillspec.teacher_forced(target, draft, tally["tokens"], temperature=1.0, lenience=0.5)
    wrong = distillspec.acceptance_summary(jax.device_get(tally), beta_wrong, nll, prompt_len=4, gamma=gamma)
    assert abs(wrong["z"]) > 6, wrong
    # The summary's teacher-forced mean is specdec.expected_acceptance over the generated window.
    beta, _ = distillspec.teacher_forced(target, draft, tally["tokens"], temperature=1.0)
    logits = [nnx.merge(g, p)(jnp.asarray(tally["tokens"])[:, :-1]) for g, p in (target, draft)]
    window = (jnp.arange(prompts.shape[1] + 24 - 1) >= prompts.shape[1] - 1)[None].repeat(64, 0)
    total, count = specdec.expected_acceptance(logits[0], logits[1], window)
    np.testing.assert_allclose(row["alpha_tf"], float(total / count), rtol=1e-5)


def test_greedy_acceptance_is_exactly_the_teacher_forced_argmax_agreement_at_tested_positions():
    target, draft = toy_pair(0.5)
    prompts = np.asarray(jax.random.randint(jax.random.key(7), (16, 3), 0, V), np.int32)
    keys = jax.random.split(jax.random.key(0), 16)
    row, tokens = distillspec.measure_acceptance(target, draft, prompts, keys, gamma=3, temperature=0.0,
                                                 lenience=1.0, new_tokens=20)
    greedy = sampling.sample(target[0], target[1], prompts, keys, max_new_tokens=20, temperature=0.0)
    np.testing.assert_array_equal(tokens, greedy["tokens"])
    assert row["alpha_hat"] == row["alpha_tested"] and row["se"] == 0 and 0 < row["alpha_hat"] < 1


# ---------------------------------------------------------------- TVD++ on a toy pair


def test_tvdpp_lowers_the_teacher_forced_tvd_of_a_toy_draft():
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    cfg = lambda seed_dim: TransformerConfig.llama(vocab_size=8, num_layers=1, embed_dim=seed_dim, num_heads=2,
                                                   num_kv_heads=1, head_dim=8, mlp_dim=32, max_len=12)
    t_graphdef, t_params = nnx.split(Transformer(cfg(16), rngs=nnx.Rngs(3)), nnx.Param)
    t_params = jax.tree.map(lambda x: 5.0 * x, t_params)
    tx = optax.adam(3e-2)
    spec = steps.train_state_spec(lambda rngs: Transformer(cfg(16), rngs=rngs), tx, seed=0, mesh=mesh,
                                  rules=sharding.DEFAULT_RULES)
    state = spec.init()
    objective = distill.make_loss_fn(mode="on_policy", loss="tvdpp", on_policy_fraction=1.0, prompt_len=2,
                                     teacher_graphdef=t_graphdef)
    step = jax.jit(lambda s, b: steps.train_step(s, b, t_params, graphdef=spec.graphdef, tx=tx, loss_fn=objective))
    prompts = jax.random.randint(jax.random.key(1), (32, 12), 0, 8)
    # Held-out sequences from the target: TVD(p, q) = 1 - sum min(p, q), teacher-forced on them.
    held = sampling.sample(t_graphdef, t_params, prompts[:, :2], jax.random.split(jax.random.key(9), 32),
                           max_new_tokens=10)
    mask = held["mask"][:, 1:]

    def tvd(params):
        inputs = held["tokens"][:, :-1]
        p, q = nnx.merge(t_graphdef, t_params)(inputs), nnx.merge(spec.graphdef, params)(inputs)
        total, count = specdec.expected_acceptance(p, q, mask)
        return 1.0 - float(total / count)

    before = tvd(state.params)
    for _ in range(40):
        state, metrics = step(state, {"tokens": prompts})
        assert np.isfinite(steps.reduce_metrics(metrics)["loss"])
    after = tvd(state.params)
    assert after < 0.8 * before, (before, after)
