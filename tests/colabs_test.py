"""Every notebook in colabs/ runs top to bottom (its code cells, in order, in a fresh interpreter)."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    # No Jupyter kernel needed: the cells are plain Python, run as one script so a failing cell fails the test
    # with its traceback.  CACHE_DIR keeps the test's tokenizer cache out of the user's home.
    cells = json.load(open(path))["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    script.write_text(f"CACHE_DIR = {str(tmp_path / 'cache')!r}\n\n{code}\n")
    # One CPU device, as a Colab CPU runtime has (not the suite's 8 fake ones).
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
