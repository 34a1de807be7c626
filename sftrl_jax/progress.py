"""Progress of long loops: a tqdm bar on a terminal (or in a notebook), one plain line per interval
otherwise, so a log file or a scheduler's output holds a few progress lines, not a redraw per step.

    bar = progress.bar(total=100, initial=0, desc="sft", unit="step")   # None when enabled=False
    bar.update(1); bar.set_postfix(loss="1.2345"); bar.close()
    for i in progress.iterate(range(n), desc="pretrain corpus", unit="ex", enabled=n >= 1000): ...

A plain line reads `sft: 40/100 (40%), 0:01:23 elapsed, 2.1 step/s, loss=1.2345`; one comes
at most every `SFTRL_PROGRESS_INTERVAL` seconds (default 30; 0 = every update) and one at the end.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_INTERVAL = 30.0


def bar(
    *,
    total: int | None,
    desc: str,
    unit: str,
    initial: int = 0,
    enabled: bool = True,
    file: TextIO | None = None,
    interval: float | None = None,
):
    """A progress bar (tqdm) on an interactive stream, else a `LineProgress`; None when not enabled."""
    if not enabled:
        return None
    file = sys.stderr if file is None else file
    if interactive(file):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=file)
    return LineProgress(total=total, initial=initial, desc=desc, unit=unit, file=file, interval=interval)


def iterate(iterable: Iterable, *, desc: str, unit: str, total: int | None = None, enabled: bool = True) -> Iterator:
    """`iterable`'s items, with a `bar` advancing by one per item."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    b = bar(total=total, desc=desc, unit=unit, enabled=enabled)
    if b is None:
        yield from iterable
        return
    try:
        for item in iterable:
            yield item
            b.update(1)
    finally:
        b.close()


def interactive(file: Any) -> bool:
    """A terminal, or a Jupyter kernel's stream (where tqdm.auto draws a widget)."""
    try:
        if file.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules and type(file).__module__.startswith("ipykernel")


def _interval() -> float:
    try:
        return max(float(os.environ.get("SFTRL_PROGRESS_INTERVAL", DEFAULT_INTERVAL)), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL


class LineProgress:
    """tqdm's `update` / `set_postfix` / `close`, written as a plain line per interval."""

    def __init__(self, *, total, initial=0, desc="", unit="it", file=None, interval=None):
        self.total, self.n, self.desc, self.unit = total, int(initial), desc, unit
        self.file = sys.stderr if file is None else file
        self.interval = _interval() if interval is None else float(interval)
        self.postfix: dict[str, Any] = {}
        self._start_n = self.n
        self._t0 = self._last = time.monotonic()
        self._printed_n: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed_n != self.n:
            self._print()

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.desc}: {self.n}{of}{pct}",
            f"{datetime.timedelta(seconds=round(elapsed))} elapsed",
            f"{rate:.3g} {self.unit}/s",
        ]
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return ", ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self._printed_n, self._last = self.n, time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
