"""The control plane: protocol, models, errors, embedded store, HTTP client and reference server.

The HTTP client and the reference server load on first use, so a program that
uses only the embedded control plane never imports the HTTP libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._base._lazy import lazy_attributes as _lazy_attributes
from ._embedded import (
    EmbeddedControlPlane as EmbeddedControlPlane,
    open_embedded_control_plane as open_embedded_control_plane,
)
from ._exceptions import (
    BadRequest as BadRequest,
    Conflict as Conflict,
    ControlPlaneError as ControlPlaneError,
    ControlPlaneUnavailable as ControlPlaneUnavailable,
    FatalError as FatalError,
    FencingConflict as FencingConflict,
    Gone as Gone,
    NotFound as NotFound,
    QueueFull as QueueFull,
    TransientError as TransientError,
    Unauthorized as Unauthorized,
)
from ._keys import FileKey as FileKey, KeyProvider as KeyProvider, StaticKey as StaticKey
from ._models import (
    NO_HEARTBEAT as NO_HEARTBEAT,
    Attempt as Attempt,
    Delegation as Delegation,
    DelegationStatus as DelegationStatus,
    EnvironmentSettings as EnvironmentSettings,
    HeartbeatResult as HeartbeatResult,
    Outcome as Outcome,
    OutcomeStatus as OutcomeStatus,
    PresenceReport as PresenceReport,
    RetryPolicy as RetryPolicy,
    SessionData as SessionData,
    SessionMessage as SessionMessage,
    WorkerRecord as WorkerRecord,
    WorkerStatus as WorkerStatus,
    WorkItem as WorkItem,
    WorkState as WorkState,
    WorkStats as WorkStats,
)
from ._protocol import ControlPlane as ControlPlane
from ._status import StatusPolicy as StatusPolicy
from ._store import LeasePolicy as LeasePolicy, SQLiteStore as SQLiteStore

if TYPE_CHECKING:
    from ._http import (
        HttpControlPlane as HttpControlPlane,
        open_http_control_plane as open_http_control_plane,
    )
    from ._server import (
        open_control_plane_server as open_control_plane_server,
        serve_control_plane as serve_control_plane,
    )

__all__ = [
    # The protocol every control plane implements, and the records it exchanges.
    "Attempt",
    "ControlPlane",
    "Delegation",
    "DelegationStatus",
    "EnvironmentSettings",
    "HeartbeatResult",
    "NO_HEARTBEAT",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "RetryPolicy",
    "SessionData",
    "SessionMessage",
    "WorkItem",
    "WorkState",
    "WorkStats",
    "WorkerRecord",
    "WorkerStatus",
    # What a call can fail with: transient (retry) or fatal, each fatal one an HTTP status.
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
    # The environment keys a client presents and a server checks.
    "FileKey",
    "KeyProvider",
    "StaticKey",
    # In process: the embedded control plane over a SQLite store, with its policies.
    "EmbeddedControlPlane",
    "LeasePolicy",
    "SQLiteStore",
    "StatusPolicy",
    "open_embedded_control_plane",
    # Over HTTP: the client and the reference server (loaded on first use).
    "HttpControlPlane",
    "open_control_plane_server",
    "open_http_control_plane",
    "serve_control_plane",
]

#: The names loaded on first use (they bring httpx, or hypercorn and starlette).
_LAZY: Final[dict[str, str]] = {
    "HttpControlPlane": "._http",
    "open_http_control_plane": "._http",
    "open_control_plane_server": "._server",
    "serve_control_plane": "._server",
}

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute
    __getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
