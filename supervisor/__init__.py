"""trio-supervisor: a Trio structured-concurrency supervisor for self-hosted agent workers.

The public surface is re-exported here; modules with a leading underscore are private.
"""

from ._agent import (
    AgentContext as AgentContext,
    AgentRunner as AgentRunner,
    AgentSpec as AgentSpec,
    EnvPolicy as EnvPolicy,
)
from ._config import WorkerConfig as WorkerConfig
from ._delegations import DelegationWatcher as DelegationWatcher, WatcherStats as WatcherStats
from ._events import (
    ChildCounts as ChildCounts,
    ChildExit as ChildExit,
    ChildInfo as ChildInfo,
    ChildSnapshot as ChildSnapshot,
    ChildState as ChildState,
    EventKind as EventKind,
    ExitKind as ExitKind,
    SupervisorEvent as SupervisorEvent,
    SupervisorSnapshot as SupervisorSnapshot,
)
from ._exceptions import (
    BadRequest as BadRequest,
    ChildStartError as ChildStartError,
    ConfigError as ConfigError,
    Conflict as Conflict,
    ControlPlaneError as ControlPlaneError,
    ControlPlaneUnavailable as ControlPlaneUnavailable,
    FatalError as FatalError,
    FencingConflict as FencingConflict,
    Gone as Gone,
    LeaseLost as LeaseLost,
    NotFound as NotFound,
    RestartIntensityExceeded as RestartIntensityExceeded,
    Shutdown as Shutdown,
    SupervisorError as SupervisorError,
    TransientError as TransientError,
    Unauthorized as Unauthorized,
)
from ._inbox import Inbox as Inbox, InboxClosed as InboxClosed, InboxEntry as InboxEntry
from ._lease import Lease as Lease, LeaseKeeper as LeaseKeeper
from ._poller import ClaimGate as ClaimGate, Poller as Poller, Slot as Slot
from ._presence import Presence as Presence, RequestCounter as RequestCounter
from ._process import AgentResult as AgentResult, SessionOutput as SessionOutput
from ._session_client import (
    SessionClient as SessionClient,
    SessionCredentials as SessionCredentials,
    open_session_client as open_session_client,
)
from ._spec import (
    AutoShutdown as AutoShutdown,
    Backoff as Backoff,
    ChildSpec as ChildSpec,
    Restart as Restart,
    Strategy as Strategy,
    SupervisorSpec as SupervisorSpec,
)
from ._threaded import (
    ResultTimeout as ResultTimeout,
    ThreadedWorker as ThreadedWorker,
    WorkCancelled as WorkCancelled,
    WorkHandle as WorkHandle,
)
from ._tree import (
    ChildContext as ChildContext,
    Supervisor as Supervisor,
    current_child as current_child,
    open_supervisor as open_supervisor,
)
from ._wedge import (
    WedgeBreaker as WedgeBreaker,
    WedgeDetector as WedgeDetector,
    WedgeState as WedgeState,
)
from ._worker import Worker as Worker, WorkerStats as WorkerStats, open_worker as open_worker
from ._workspace import WorkspaceError as WorkspaceError, WorkspaceManager as WorkspaceManager

__version__ = "0.1.0.dev0"

__all__ = [
    "AgentContext",
    "AgentResult",
    "AgentRunner",
    "AgentSpec",
    "AutoShutdown",
    "Backoff",
    "BadRequest",
    "ChildContext",
    "ChildCounts",
    "ChildExit",
    "ChildInfo",
    "ChildSnapshot",
    "ChildSpec",
    "ChildStartError",
    "ChildState",
    "ClaimGate",
    "ConfigError",
    "Conflict",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "DelegationWatcher",
    "EnvPolicy",
    "EventKind",
    "ExitKind",
    "FatalError",
    "FencingConflict",
    "Gone",
    "Inbox",
    "InboxClosed",
    "InboxEntry",
    "Lease",
    "LeaseKeeper",
    "LeaseLost",
    "NotFound",
    "Poller",
    "Presence",
    "RequestCounter",
    "Restart",
    "RestartIntensityExceeded",
    "ResultTimeout",
    "SessionClient",
    "SessionCredentials",
    "SessionOutput",
    "Shutdown",
    "Slot",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorEvent",
    "SupervisorSnapshot",
    "SupervisorSpec",
    "ThreadedWorker",
    "TransientError",
    "Unauthorized",
    "WatcherStats",
    "WedgeBreaker",
    "WedgeDetector",
    "WedgeState",
    "WorkCancelled",
    "WorkHandle",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "WorkspaceError",
    "WorkspaceManager",
    "current_child",
    "open_session_client",
    "open_supervisor",
    "open_worker",
]
