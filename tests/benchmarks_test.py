"""Smoke tests of the benchmarks at a microscopic size: well-formed, finite, and the same computation.

Speed is never asserted here: timings on a test machine mean nothing.  What is asserted is that the PyTorch
contender computes what kdjax computes (same losses from the same weights, step after step, so the model,
the JSD and the optimizer all agree), which is what makes the benchmark's ratio a fair one.
"""

import math

import jax
import numpy as np
import pytest
import torch  # a test dependency (setup.py extras "test"): missing it is an error, not a silent skip

from benchmarks import memory, mfu, run_all
from benchmarks import step_vs_pytorch as svp

TINY = svp.SIZES["tiny"]


@pytest.fixture(scope="module")
def step_results():
    # Online and offline; at vocab 64 the top-k store keeps k = V entries, where top-k KD equals dense KD,
    # so offline losses must match PyTorch's dense-logit JSD too.
    return [svp.run(TINY, mode=mode, warmup=1, iters=3) for mode in ("online", "offline")]


def test_kdjax_and_pytorch_losses_agree_over_steps(step_results):
    for r in step_results:
        kd, pt = np.array(r["kdjax_losses"]), np.array(r["torch_losses"])
        assert len(kd) == len(pt) == 4
        assert np.all(np.isfinite(kd)) and np.all(kd > 0)
        # Steps after the first see parameters updated by each side's clip + AdamW; agreement there means
        # the optimizers agree as well as the forward passes and the loss.
        np.testing.assert_allclose(kd, pt, rtol=2e-3, atol=1e-6, err_msg=r["mode"])
        assert kd[-1] != kd[0], "the parameters never changed: the optimizer did not step"


def test_step_results_well_formed(step_results):
    for r in step_results:
        for key in ("kdjax_s", "torch_s", "kdjax_tps", "torch_tps", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, key
    table = svp.markdown(TINY, step_results)
    assert table.count("\n| ") == 3  # header + two modes


def test_copy_to_torch_gives_the_same_logits():
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    kd = svp.make_kdjax(TINY, mode="online", total_steps=4)
    model = svp.torch_gpt2(svp.gpt2_config(TINY, "teacher"))
    svp.copy_to_torch(kd["teacher_graphdef"], kd["teacher_params"], model)
    tokens = np.random.RandomState(1).randint(0, TINY["vocab"], (2, TINY["seq_len"])).astype(np.int32)
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(kd["teacher_graphdef"], p)(t))(kd["teacher_params"], tokens))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mfu_result():
    return mfu.run(TINY, matmul_n=64, warmup=1, iters=2)


def dot_flops(jaxpr) -> int:
    """2 * M * N * K summed over every dot_general of a jaxpr, nested jaxprs (jit, scan, custom_vjp) included."""
    from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for sub in jex_core.subjaxprs(jaxpr):  # the direct sub-jaxprs of its equations; recursion goes deeper
        total += dot_flops(sub)
    return total


def test_step_flops_equal_the_dot_products_the_step_runs(mfu_result):
    # An independent count: every matmul in the jitted online KD step's program (student forward and backward,
    # teacher forward), read off its jaxpr.  The formula counts the causal attention over the full T x T square
    # (as the program computes it) and nothing elementwise, so the two must agree exactly.
    kd = svp.make_kdjax(TINY, mode="online", total_steps=4)
    tokens = np.zeros((TINY["batch"], TINY["seq_len"] + 1), np.int32)
    jaxpr = jax.make_jaxpr(kd["step"])(kd["state"], kd["batch_for"](tokens), kd["frozen"]).jaxpr
    assert dot_flops(jaxpr) == svp.step_flops(TINY) > 0
    # And MFU reports against exactly that count.
    r = mfu_result
    assert r["step_flops"] == svp.step_flops(TINY)
    for key in ("peak", "achieved", "mfu", "step_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert "fraction of the matmul peak" in mfu.markdown(TINY, r)


def test_memory_and_page(step_results, mfu_result, tmp_path):
    mem = memory.run(vocabs=(64,), seq_lens=(8,), batch=2, layers=1, dim=32, k=8)
    assert len(mem["rows"]) == 1
    for row in mem["rows"]:
        for kind in memory.KINDS:
            m = row[kind]
            assert all(isinstance(x, int) and x >= 0 for x in m.values()), m
            assert m["peak"] > 0
        # The dense step holds the teacher as well: never smaller than CE-only.
        assert row["dense"]["peak"] >= row["ce"]["peak"]
    mfu_r = mfu_result
    import datetime  # pylint: disable=g-import-not-at-top

    run_all.write_page(
        str(tmp_path),
        size={**TINY, "name": "tiny"},
        step_results=step_results,
        mfu_r=mfu_r,
        mem_r=mem,
        store_page=None,
        started=datetime.datetime.now(datetime.timezone.utc),
        seconds=1.0,
    )
    page = (tmp_path / "benchmarks.md").read_text()
    for section in ("## Targets", "## 1.", "## 2.", "## 3.", "## 4.", "## Closing note"):
        assert section in page
    for png in ("bench_step.png", "bench_mfu.png", "bench_memory.png"):
        assert (tmp_path / png).stat().st_size > 0
        assert png in page
    assert "nan" not in page.lower().replace("nan)", "")


def test_store_summary_parses_the_store_page():
    page = (
        "# Teacher store\n\n| k | log-prob dtype | bytes/token | target | KL | tail |\n|---:|---|---:|---:|---:|---:|\n"
        "| 8 | bfloat16 | 41.4 | 52 | 9e-01 | 0.5 |\n| 32 | bfloat16 | 170.0 | 160 | 5e-01 | 0.4 |\n"
        "| 32 | float32 | 201.4 | 160 | 5e-01 | 0.4 |\n\n- Reading delivers **86x** the tokens/s\n"
    )
    (over, k, bpt, target), read = run_all.store_summary(page)
    assert (k, bpt, target, read) == (32, 170.0, 160.0, 86.0)
    assert over == pytest.approx(170 / 160)
