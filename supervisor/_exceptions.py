"""The package's exception tree.

Grouped by what callers catch::

    SupervisorError                    root: ``except SupervisorError`` catches all of ours
    ├── ChildStartError                a child failed while starting (the tree rolled back)
    ├── RestartIntensityExceeded       the restart budget was spent; the supervisor gave up
    ├── ConfigError (also ValueError)  bad configuration; names the offending key
    ├── LeaseLost                      a work item's lease is gone; its session must stop
    └── ControlPlaneError              anything the control plane said or failed to say
        ├── TransientError             worth retrying: 5xx, 408, 429, timeouts, connection errors
        │   └── ControlPlaneUnavailable  could not reach the control plane at all
        └── FatalError                 retrying the same call will not help (other 4xx)
            ├── BadRequest             400 / 413 / 415 / 422: the request itself was malformed
            ├── Unauthorized           401 / 403: the key is missing, wrong or revoked
            ├── NotFound               404: unknown environment, item, worker or delegation
            ├── Gone                   410: the resource was removed for good
            ├── Conflict               409: the call does not fit the current state
            └── FencingConflict        412: a stale fencing token (another holder has the lease)

``Shutdown`` is deliberately *not* part of the tree: it is not an error but the
way a supervised child says "I am stopping on purpose" (OTP's ``shutdown``
exit reason), so that ``except SupervisorError`` never catches it by accident.

No ``httpx`` or ``sqlite3`` exception escapes the control-plane layer: they are
translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._events import ChildExit

__all__ = [
    "BadRequest",
    "ChildStartError",
    "ConfigError",
    "Conflict",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "FatalError",
    "FencingConflict",
    "Gone",
    "LeaseLost",
    "NotFound",
    "RestartIntensityExceeded",
    "Shutdown",
    "SupervisorError",
    "TransientError",
    "Unauthorized",
]


class SupervisorError(Exception):
    """Root of every exception this package raises on purpose."""


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


class ConfigError(SupervisorError, ValueError):
    """Configuration that cannot be used; the message names the key.

    Attributes:
        key: the configuration key (or flag) at fault, when there is one.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class LeaseLost(SupervisorError):
    """The lease on a work item is gone, so its session must stop now.

    Attributes:
        work_id: the work item whose lease was lost.
        reason: a short human-readable cause (``"fencing conflict"``, ``"deadline passed"``, ...).
    """

    def __init__(self, work_id: str, reason: str) -> None:
        super().__init__(f"lease on work item {work_id!r} lost: {reason}")
        self.work_id = work_id
        self.reason = reason


class ControlPlaneError(SupervisorError):
    """The control plane refused a call, or could not be asked.

    Attributes:
        status_code: the HTTP status it maps to (``None`` when no answer came).
        error_type: the stable error type from the ``{"error": {"type": ...}}`` body.
    """

    status_code: int | None = None
    error_type: str = "control_plane_error"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.message = message


class TransientError(ControlPlaneError):
    """Worth retrying later: 5xx, 408, 429, timeouts, connection errors."""

    error_type = "transient"


class ControlPlaneUnavailable(TransientError):
    """No answer at all: connection refused or reset, DNS failure, timeout."""

    error_type = "unavailable"


class FatalError(ControlPlaneError):
    """Retrying the same call will not help."""

    error_type = "fatal"


class BadRequest(FatalError):
    """The request itself was malformed (bad JSON, wrong types, too large)."""

    status_code = 400
    error_type = "invalid_request"


class Unauthorized(FatalError):
    """The key is missing, wrong or revoked."""

    status_code = 401
    error_type = "unauthorized"


class NotFound(FatalError):
    """Unknown environment, work item, worker or delegation."""

    status_code = 404
    error_type = "not_found"


class Gone(FatalError):
    """The resource was removed for good (for example a deregistered worker)."""

    status_code = 410
    error_type = "gone"


class Conflict(FatalError):
    """The call does not fit the resource's current state (for example a second ack)."""

    status_code = 409
    error_type = "conflict"


class FencingConflict(FatalError):
    """The fencing token is stale: the lease has moved on, so this holder lost it."""

    status_code = 412
    error_type = "fencing_conflict"
