"""Metric logging: one JSON line per record in `metrics.jsonl` plus TensorBoard event files.

The JSON file is the machine-readable record (plots and results tables read it back); TensorBoard is
for watching a run.  Only process 0 writes, so multi-host runs do not interleave lines.
"""

import json
import os
import time

import jax


class MetricsWriter:
    """`write(step, {"train/loss": 1.2, ...})` appends to W/metrics.jsonl and W/tensorboard/.

    On resume the JSON file is appended to; records past the restored step are dropped first, so the
    file never holds two values of one step from a run that died after logging but before saving.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            # A run killed mid-write can leave a torn last line: it is dropped like any record past the resume.
            kept = [json.dumps(r) + "\n" for r in _parse(open(self.path)) if r["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _parse(lines):
    """Complete JSON records of `lines`; a torn or empty line (a process killed mid-write) is skipped."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out


def read_metrics(workdir: str) -> list[dict]:
    """The records of W/metrics.jsonl, in order (a torn last line from a killed process is skipped)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return _parse(f)
