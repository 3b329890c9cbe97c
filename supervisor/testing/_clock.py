"""``ManualClock``: a wall clock that only moves when a test moves it."""

from __future__ import annotations

import math

import attrs

__all__ = ["ManualClock"]


@attrs.define(eq=False)
class ManualClock:
    """A settable stand-in for `time.time`, for code that takes ``clock=``.

    The control-plane store measures leases and worker silence in wall-clock
    seconds that its caller supplies; handing the embedded control plane (or
    the store behind a reference server) one of these makes lease expiry and
    worker ageing happen exactly when a test says so, with no sleeping. It is
    independent of Trio's clock: Trio's ``MockClock`` moves Trio time, this
    moves the time the control plane records.

    Attributes:
        now: the current reading, in POSIX seconds.
    """

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (never backward) and return the new reading."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a manual clock only moves forward, got {seconds!r}")
        self.now += seconds
        return self.now
