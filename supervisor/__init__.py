"""trio-supervisor: a Trio structured-concurrency supervisor for self-hosted agent workers.

The public surface is re-exported here; modules with a leading underscore are private.
"""

from ._base._exceptions import ConfigError as ConfigError, SupervisorError as SupervisorError
from ._tree._events import (
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
from ._tree._exceptions import (
    ChildStartError as ChildStartError,
    RestartIntensityExceeded as RestartIntensityExceeded,
    Shutdown as Shutdown,
)
from ._tree._spec import (
    AutoShutdown as AutoShutdown,
    Backoff as Backoff,
    ChildSpec as ChildSpec,
    Restart as Restart,
    Strategy as Strategy,
    SupervisorSpec as SupervisorSpec,
)
from ._tree._supervisor import (
    ChildContext as ChildContext,
    Supervisor as Supervisor,
    current_child as current_child,
    open_supervisor as open_supervisor,
)
from ._version import __version__ as __version__
from ._worker._agent import (
    AgentContext as AgentContext,
    AgentRunner as AgentRunner,
    AgentSpec as AgentSpec,
    EnvPolicy as EnvPolicy,
)
from ._worker._config import WorkerConfig as WorkerConfig
from ._worker._delegations import (
    DelegationWatcher as DelegationWatcher,
    WatcherStats as WatcherStats,
)
from ._worker._inbox import Inbox as Inbox, InboxClosed as InboxClosed, InboxEntry as InboxEntry
from ._worker._lease import Lease as Lease, LeaseKeeper as LeaseKeeper, LeaseLost as LeaseLost
from ._worker._poller import ClaimGate as ClaimGate, Poller as Poller, Slot as Slot
from ._worker._presence import Presence as Presence, RequestCounter as RequestCounter
from ._worker._process import AgentResult as AgentResult, SessionOutput as SessionOutput
from ._worker._threaded import (
    ResultTimeout as ResultTimeout,
    ThreadedWorker as ThreadedWorker,
    WorkCancelled as WorkCancelled,
    WorkHandle as WorkHandle,
)
from ._worker._wedge import (
    WedgeBreaker as WedgeBreaker,
    WedgeDetector as WedgeDetector,
    WedgeState as WedgeState,
)
from ._worker._worker import (
    Worker as Worker,
    WorkerStats as WorkerStats,
    open_worker as open_worker,
)
from ._worker._workspace import (
    WorkspaceError as WorkspaceError,
    WorkspaceManager as WorkspaceManager,
)
from .controlplane._exceptions import (
    BadRequest as BadRequest,
    Conflict as Conflict,
    ControlPlaneError as ControlPlaneError,
    ControlPlaneUnavailable as ControlPlaneUnavailable,
    FatalError as FatalError,
    FencingConflict as FencingConflict,
    Gone as Gone,
    NotFound as NotFound,
    TransientError as TransientError,
    Unauthorized as Unauthorized,
)
from .controlplane._session_client import (
    SessionClient as SessionClient,
    SessionCredentials as SessionCredentials,
    open_session_client as open_session_client,
)

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
