"""The package's exception tree, and its root.

Grouped by what callers catch::

    SupervisorError                    root: ``except SupervisorError`` catches all of ours
    ├── ChildStartError                a child failed while starting (the tree rolled back)
    ├── RestartIntensityExceeded       the restart budget was spent; the supervisor gave up
    ├── ConfigError (also ValueError)  bad configuration; names the offending key
    ├── LeaseLost                      a work item's lease is gone; its session must stop
    └── ControlPlaneError              anything the control plane said or failed to say
        ├── TransientError             worth retrying: 5xx, 408, 429, timeouts, connection errors
        │   ├── ControlPlaneUnavailable  could not reach the control plane at all
        │   └── QueueFull              429: the environment's queue is at max_queue_depth
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

Each class lives in the layer that raises it: the root and ``ConfigError`` here,
the tree's errors and ``Shutdown`` in ``supervisor._tree._exceptions``, the
control plane's in ``supervisor.controlplane._exceptions`` and ``LeaseLost`` in
``supervisor._worker._lease``; the package re-exports them all.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SupervisorError"]


class SupervisorError(Exception):
    """Root of every exception this package raises on purpose."""


class ConfigError(SupervisorError, ValueError):
    """Configuration that cannot be used; the message names the key.

    Attributes:
        key: the configuration key (or flag) at fault, when there is one.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
