"""What the control plane can answer: ``ControlPlaneError`` and its transient/fatal branches."""

from __future__ import annotations

from .._base._exceptions import SupervisorError

__all__ = [
    "BadRequest",
    "Conflict",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "FatalError",
    "FencingConflict",
    "Gone",
    "NotFound",
    "QueueFull",
    "TransientError",
    "Unauthorized",
]


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


class QueueFull(TransientError):
    """The environment's queue is at its ``max_queue_depth``: the submit was refused.

    Nothing was queued. HTTP answers it with 429 and a ``Retry-After`` header;
    the embedded plane raises it as is. Try again after ``retry_after`` seconds
    (workers drain the queue meanwhile).

    Attributes:
        environment_id: the environment whose queue is full.
        depth: the queued items it held when the submit was refused.
        max_queue_depth: its cap.
        retry_after: whole seconds worth waiting before the next try.
    """

    status_code = 429
    error_type = "queue_full"

    def __init__(
        self, environment_id: str, depth: int, max_queue_depth: int, retry_after: int
    ) -> None:
        super().__init__(
            f"queue full: environment {environment_id} holds {depth} queued items "
            f"(max_queue_depth {max_queue_depth}); retry in {retry_after} s"
        )
        self.environment_id = environment_id
        self.depth = depth
        self.max_queue_depth = max_queue_depth
        self.retry_after = retry_after


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
    """The fencing token is stale: the lease has moved on, so this holder lost it.

    Or its holder missed an answer: a heartbeat the server processed but whose
    answer never arrived (a cancelled or timed-out call) leaves the holder one
    token behind. For that case the server names the current token, but only
    when the stale one was issued for the *same* lease (the same attempt of
    the same holder); a token of an earlier lease never learns the current one.

    Attributes:
        current_token: the lease's current token when the stale one belongs to
            the same lease, else ``None``. A secret like any token: never put
            it in a message or a log line.
    """

    status_code = 412
    error_type = "fencing_conflict"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        current_token: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.current_token = current_token
