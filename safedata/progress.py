"""Progress of long loops: a tqdm bar on a terminal, periodic log lines in a job's log file.

A SLURM log (stderr not a terminal) would otherwise fill with a bar's carriage-return redraws; there
each bar logs one line every SAFEDATA_PROGRESS_SECONDS seconds (default 30) and one when it ends.
Use `progress(...)` wherever tqdm would be used: same arguments (iterable, total, desc, unit,
initial, disable), same `update(n)`, iteration and `with` block.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("safedata.progress")

INTERVAL_ENV = "SAFEDATA_PROGRESS_SECONDS"


def interactive() -> bool:
    """True when progress goes to a terminal (draw a bar), False in a batch job or a pipe (log lines)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
             **tqdm_kwargs):
    """A tqdm bar when interactive, else a LogProgress with the same interface."""
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    dynamic_ncols=True, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)


class LogProgress:
    """Logs `desc: n/total unit (p%), rate, elapsed, eta` at most every `interval` seconds and at the end."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, disable=False, interval=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.disable = total, desc or "progress", unit, disable
        self.n = self.start_n = initial
        self.interval = float(os.environ.get(INTERVAL_ENV, 30)) if interval is None else interval
        self.started = self.last = time.monotonic()
        self.closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {elapsed:.0f}s")
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"eta {(self.total - self.n) / rate:.0f}s")
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            log.info(self.line())

    def close(self) -> None:
        if not self.closed and not self.disable and (self.total is None or self.total > 0):
            log.info(self.line())
        self.closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
