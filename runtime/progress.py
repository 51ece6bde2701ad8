"""Progress on long work: a tqdm bar on a terminal, and off one (logs, CI, pipes) a plain line on stderr at most
every :data:`LINE_INTERVAL_S` seconds, so a long run is never silent and a short one prints nothing."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

LINE_INTERVAL_S = 10.0


class LineProgress:
    """``update(n)`` like tqdm's; writes "DESC: n/total UNITs (p%), e s elapsed, about r s left" to ``stream`` when
    ``interval`` seconds have passed since the start or the last line, and a last line at the end if it wrote any."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, interval: float = LINE_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.stream, self.interval = max(1, total), desc, unit, stream, interval
        self.n, self.start = 0, time.monotonic()
        self.last, self.lines, self.reported = self.start, 0, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        left = elapsed * (self.total - self.n) / self.n if self.n else float("nan")
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%), "
              f"{elapsed:.0f} s elapsed, about {left:.0f} s left", file=self.stream, flush=True)
        self.last, self.lines, self.reported = now, self.lines + 1, self.n

    def close(self) -> None:
        if self.lines and self.reported != self.n:  # a run long enough to report ends with its last figure, once
            self._line(time.monotonic())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A context manager with ``update(n)``: tqdm when stderr is a terminal, :class:`LineProgress` otherwise,
    nothing when not ``enabled``."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, initial=initial)
    bar = LineProgress(total, desc, unit, sys.stderr)
    bar.n = initial
    return bar


def tracked(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """``items`` one by one, with :func:`progress` advanced by one after each."""
    with progress(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
