"""The supervision tree's errors, and ``Shutdown`` (a clean stop, not an error)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._base._exceptions import SupervisorError

if TYPE_CHECKING:
    from ._events import ChildExit

__all__ = ["ChildStartError", "RestartIntensityExceeded", "Shutdown"]


class Shutdown(Exception):
    """Raised by a supervised child to stop cleanly.

    Counts as a clean exit (OTP's ``shutdown`` reason): a ``PERMANENT`` child
    is restarted, ``TRANSIENT`` and ``TEMPORARY`` children are not.
    """


class ChildStartError(SupervisorError):
    """A child raised (or ended) before it signalled that it had started.

    The children already running were terminated in reverse start order
    before this was raised; ``__cause__`` is the child's own exception.
    """

    def __init__(self, supervisor: str, child_id: str, message: str) -> None:
        super().__init__(f"{supervisor}: child {child_id!r} failed to start: {message}")
        self.supervisor = supervisor
        self.child_id = child_id


class RestartIntensityExceeded(SupervisorError):
    """More restarts than ``intensity`` happened within ``period`` seconds.

    Attributes:
        supervisor: the name of the supervisor that gave up.
        history: the recent exits that counted against the budget, oldest first.

    ``__cause__`` is the last failure (``None`` when the last exit was a clean
    return of a permanent child).
    """

    def __init__(
        self, supervisor: str, intensity: int, period: float, history: Sequence[ChildExit]
    ):
        recent = ", ".join(f"{e.child_id}:{e.kind.value}" for e in history[-5:])
        super().__init__(
            f"supervisor {supervisor!r} exceeded its restart intensity "
            f"({intensity} restarts in {period:g}s); recent exits: {recent or 'none'}"
        )
        self.supervisor = supervisor
        self.intensity = intensity
        self.period = period
        self.history: tuple[ChildExit, ...] = tuple(history)
