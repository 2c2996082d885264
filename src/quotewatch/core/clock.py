"""Injected clocks.

Processing code never calls ``time.time()``: the entry point builds a :class:`SystemClock` and
passes it in; tests pass a :class:`FakeClock`. Derived records (features, labels, predictions)
take no clock at all: they are pure functions of their input records.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of time in integer nanoseconds."""

    def now_ns(self) -> int:
        """Wall-clock time, ns since the Unix epoch (used for ``ts_init``)."""
        ...

    def monotonic_ns(self) -> int:
        """A monotonic time in ns, for timeouts, rates and health; never stored in records."""
        ...


class SystemClock:
    """The real clock."""

    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class FakeClock:
    """A clock that only moves when told to; wall and monotonic time move together."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._now_ns = start_ns

    def now_ns(self) -> int:
        return self._now_ns

    def monotonic_ns(self) -> int:
        return self._now_ns

    def advance(self, ns: int) -> None:
        """Move time forward by ``ns`` nanoseconds."""
        if ns < 0:
            raise ValueError("a clock does not go backwards")
        self._now_ns += ns

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns`` (never backwards)."""
        self.advance(now_ns - self._now_ns)
