"""``WedgeState``: whether this worker's agent runtime is wedged, and why.

One instance per worker (never a module global, so two workers in one process
and two tests in one run never share it). Detectors ``mark`` it; the poller's
circuit breaker and the presence reports read it; the next observed success
``clear``\\ s it.
"""

from __future__ import annotations

import attrs
import trio

__all__ = ["WedgeState"]


@attrs.define(eq=False)
class WedgeState:
    """Sticky wedge flag: the first reason wins until :meth:`clear`.

    Attributes:
        reason: why the runtime was marked wedged (``None`` while healthy).
        since: ``trio.current_time()`` when it was marked, or ``None``.
        marks: how many times it was marked wedged since the worker started.
    """

    reason: str | None = None
    since: float | None = None
    marks: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def is_wedged(self) -> bool:
        return self.reason is not None

    def mark(self, reason: str) -> bool:
        """Mark the runtime wedged; returns ``False`` if it already was (the first reason stays)."""
        if not reason:
            raise ValueError("a wedge needs a reason")
        if self.reason is not None:
            return False
        self.reason = reason
        try:
            self.since = trio.current_time()
        except RuntimeError:  # marked from outside Trio
            self.since = None
        self.marks += 1
        self._notify()
        return True

    def clear(self) -> bool:
        """Healthy again (a success was observed); returns whether it was wedged."""
        if self.reason is None:
            return False
        self.reason = None
        self.since = None
        self._notify()
        return True

    async def wait_changed(self) -> None:
        """Wait for the next ``mark`` or ``clear``."""
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()
