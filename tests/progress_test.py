"""Progress output: plain periodic lines (no carriage returns) when stderr is not a terminal."""

from kdjax import progress


def test_non_terminal_progress_is_plain_periodic_lines(capsys, monkeypatch):
    clock = iter(range(0, 1000, 10))  # each call: 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    bar = progress.progress_bar(range(10), total=10, desc="train", unit="step", every_s=30.0)
    assert isinstance(bar, progress.LineProgress)  # pytest captures stderr: not a terminal
    assert list(bar) == list(range(10))
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "\r" not in out and 2 <= len(lines) <= 5, out  # every ~30 s of fake time, plus the last
    assert lines[-1].startswith("train: 10/10 step")


def test_disabled_progress_prints_nothing(capsys):
    bar = progress.progress_bar(total=5, desc="x", enabled=False)
    bar.update(5)
    bar.write("hidden")
    bar.close()
    assert capsys.readouterr().out == ""
