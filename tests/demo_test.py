"""`make demo`'s job on the :tiny config: every stage runs and the results table lists every run."""

import os

from configs import demo as demo_config
from experiments import demo


def test_demo_writes_a_results_table(tmp_path):
    config = demo_config.get_config("tiny")
    config.teacher.data.cache_dir = str(tmp_path / "cache")  # shared by teacher and students (same ConfigDict)
    demo.run_demo(config, str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [name for name, _, _ in config.runs]
    assert all("nan" not in r for r in rows)
    for png in ("results.png", "train_ce.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert os.path.exists(tmp_path / "store" / "store-train" / "manifest.json")
