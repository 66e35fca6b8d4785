"""`make demo`'s job on the :tiny config: every stage runs, and every number the tables show is the one the
runs' metrics.jsonl hold (recomputed here from those files, not taken from the demo's own code)."""

import json
import math
import os
import re
import statistics

import pytest

from configs import demo as demo_config
from experiments import demo
from kdjax import cli
from kdjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    config = demo_config.get_config("tiny")
    # Three methods (a store, a dense teacher, none) keep the test short; every mode has its own test in
    # lm_distill_test.py.
    config.runs = tuple(r for r in config.runs if r[1:] in (("offline", "ce"), ("offline", "fkl"), ("online", "fkl")))
    cache = str(tmp_path_factory.mktemp("cache"))
    config.teacher.data.cache_dir = config.student.data.cache_dir = cache
    cli.enable_compilation_cache(os.path.join(cache, "jax"))  # seed 2 reuses seed 1's programs
    workdir = tmp_path_factory.mktemp("demo")
    demo.run_demo(config, str(workdir))
    return config, workdir


def final_eval(path):
    return [r for r in read_metrics(path) if "val/perplexity" in r][-1]


def test_every_number_comes_from_the_runs_metrics(ran):
    config, workdir = ran
    results = json.load(open(workdir / "results.json"))
    table = (workdir / "results.md").read_text()
    assert [r["name"] for r in results["runs"]] == [name for name, _, _ in config.runs]
    base = [final_eval(demo.run_dir(str(workdir), config.runs[0][0], s))["val/perplexity"] for s in config.seeds]
    for r in results["runs"]:
        finals = [final_eval(demo.run_dir(str(workdir), r["name"], s)) for s in config.seeds]
        ppl = [f["val/perplexity"] for f in finals]
        assert [r["seeds"][str(s)]["perplexity"] for s in config.seeds] == ppl
        mean, sd = statistics.fmean(ppl), statistics.stdev(ppl)
        assert r["summary"]["perplexity"] == pytest.approx([mean, sd], rel=1e-12)
        # The table row shows exactly these numbers.
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['name']} |"))
        assert f"{mean:.1f} ± {sd:.1f}" in row
        if "val/kl" in finals[0]:
            kl = [f["val/kl"] for f in finals]
            assert f"{statistics.fmean(kl):.3f} ± {statistics.stdev(kl):.3f}" in row
        # Significance: |diff| > 2 SE of the difference (Welch), recomputed here.
        diff = mean - statistics.fmean(base)
        se = math.sqrt(statistics.variance(ppl) / len(ppl) + statistics.variance(base) / len(base))
        if r is not results["runs"][0]:
            assert r["diff"] == pytest.approx(diff) and r["diff_se"] == pytest.approx(se)
            assert r["significant"] == (abs(diff) > 2 * se)
            from scipy import stats

            assert r["p_value"] == pytest.approx(stats.ttest_ind(ppl, base, equal_var=False).pvalue)
            assert ("(significant)" in row) == r["significant"]
    assert results["teacher"]["perplexity"] == pytest.approx(
        statistics.fmean(final_eval(demo.run_dir(str(workdir), n, s))["val/teacher_perplexity"]
                         for n, _, _ in config.runs for s in config.seeds)
    )
    for png in ("results.png", "train_ce.png"):
        assert os.path.getsize(workdir / png) > 1000
    store_manifest = json.load(open(workdir / "store" / "store-train" / "manifest.json"))
    assert results["store"]["total_bytes"] == store_manifest["total_bytes"]


def test_a_second_run_only_retabulates(ran):
    config, workdir = ran
    before = {p: os.path.getmtime(p) for p in workdir.rglob("checkpoints/*")}
    first = json.load(open(workdir / "results.json"))
    demo.run_demo(config, str(workdir))
    assert {p: os.path.getmtime(p) for p in workdir.rglob("checkpoints/*")} == before
    assert json.load(open(workdir / "results.json")) == first


def test_readme_describes_the_rows_the_demo_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## The main job", 1)[1].split("\n## ", 1)[0]
    config = demo_config.get_config()
    for name, _, _ in config.runs:
        assert name in section, name
    assert f"{len(config.seeds)} seeds" in section
    assert re.search(r"2 standard errors", section)
