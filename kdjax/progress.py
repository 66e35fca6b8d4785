"""Progress on long work: a tqdm bar in a terminal, plain periodic lines in a log file or CI.

    bar = progress_bar(iterable_or_None, total=..., desc=..., unit=...)
    bar.update(n); bar.set_postfix(loss=...); bar.write("a line"); bar.close()

Only process 0 of a multi-host run shows anything.
"""

import sys
import time

import jax
import tqdm


def progress_bar(iterable=None, *, total=None, initial=0, desc="", unit="it", unit_scale=False, every_s=30.0,
                 enabled=True):
    """A progress bar on process 0: tqdm in a terminal; otherwise (a log file, CI) one plain line at most
    every `every_s` seconds, so logs hold readable progress instead of carriage returns.

    Supports what kdjax uses: iteration, `update(n)`, `set_postfix(**kw)`, `write(text)`, `close()`.
    `enabled=False` shows nothing (and still counts).
    """
    enabled = enabled and jax.process_index() == 0
    if enabled and sys.stderr.isatty():
        return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, every_s=every_s,
                        enabled=enabled)


class LineProgress:
    """Periodic progress lines for non-interactive output (see `progress_bar`)."""

    def __init__(self, iterable, *, total, initial, desc, unit, every_s, enabled):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.every_s, self.enabled, self.postfix = every_s, enabled, ""
        self._t0 = self._last = time.perf_counter()
        self._n0 = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._print()

    def _print(self):
        if not self.enabled:
            return
        rate = (self.n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:,.1f} {self.unit}/s){self.postfix}", flush=True)

    def set_postfix(self, **kw):
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, text):
        if self.enabled:
            print(text, flush=True)

    def close(self):
        if self.enabled and self.n != self._n0:
            self._last = time.perf_counter()
            self._print()
            self._n0 = self.n
