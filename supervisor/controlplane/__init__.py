"""The control plane: protocol, models, embedded store, HTTP client and reference server."""

from ._embedded import (
    EmbeddedControlPlane as EmbeddedControlPlane,
    open_embedded_control_plane as open_embedded_control_plane,
)
from ._http import (
    HttpControlPlane as HttpControlPlane,
    open_http_control_plane as open_http_control_plane,
)
from ._keys import FileKey as FileKey, KeyProvider as KeyProvider, StaticKey as StaticKey
from ._models import (
    NO_HEARTBEAT as NO_HEARTBEAT,
    Delegation as Delegation,
    DelegationStatus as DelegationStatus,
    HeartbeatResult as HeartbeatResult,
    Outcome as Outcome,
    OutcomeStatus as OutcomeStatus,
    PresenceReport as PresenceReport,
    SessionData as SessionData,
    SessionMessage as SessionMessage,
    WorkerRecord as WorkerRecord,
    WorkerStatus as WorkerStatus,
    WorkItem as WorkItem,
    WorkState as WorkState,
    WorkStats as WorkStats,
)
from ._protocol import ControlPlane as ControlPlane
from ._server import (
    open_control_plane_server as open_control_plane_server,
    serve_control_plane as serve_control_plane,
)
from ._status import StatusPolicy as StatusPolicy
from ._store import LeasePolicy as LeasePolicy, SQLiteStore as SQLiteStore

__all__ = [
    "ControlPlane",
    "Delegation",
    "DelegationStatus",
    "EmbeddedControlPlane",
    "FileKey",
    "HeartbeatResult",
    "HttpControlPlane",
    "KeyProvider",
    "LeasePolicy",
    "NO_HEARTBEAT",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "SQLiteStore",
    "SessionData",
    "SessionMessage",
    "StaticKey",
    "StatusPolicy",
    "WorkItem",
    "WorkState",
    "WorkStats",
    "WorkerRecord",
    "WorkerStatus",
    "open_control_plane_server",
    "open_embedded_control_plane",
    "open_http_control_plane",
    "serve_control_plane",
]
