"""trio-supervisor: a Trio structured-concurrency supervisor for self-hosted agent workers.

This module holds what an application embedding the supervision tree or the
worker uses day to day. The worker's machinery (poller, lease keeper,
presence, wedge detection, workspaces, the agent runner) is in
`supervisor.lowlevel`, as Trio keeps its own in ``trio.lowlevel``; the control
plane's protocol, models, stores and HTTP-status errors are in
`supervisor.controlplane`; fakes for tests are in `supervisor.testing`. Modules
with a leading underscore are private.

The tree's names load with the package (they need only Trio and attrs). The
worker's and the control plane's load on first use, so an application that
only runs a tree never imports the HTTP client, the server or the metrics
libraries the worker brings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ._base._exceptions import ConfigError as ConfigError, SupervisorError as SupervisorError
from ._base._lazy import lazy_attributes as _lazy_attributes
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

if TYPE_CHECKING:
    from ._worker._agent import (
        AgentContext as AgentContext,
        AgentSpec as AgentSpec,
        EnvPolicy as EnvPolicy,
    )
    from ._worker._config import WorkerConfig as WorkerConfig
    from ._worker._inbox import Inbox as Inbox, InboxClosed as InboxClosed, InboxEntry as InboxEntry
    from ._worker._lease import LeaseLost as LeaseLost
    from ._worker._metrics import WorkerStats as WorkerStats
    from ._worker._threaded import (
        ResultTimeout as ResultTimeout,
        ThreadedWorker as ThreadedWorker,
        WorkCancelled as WorkCancelled,
        WorkHandle as WorkHandle,
    )
    from ._worker._wedge import WedgeState as WedgeState
    from ._worker._worker import Worker as Worker, open_worker as open_worker
    from ._worker._workspace import WorkspaceError as WorkspaceError
    from .controlplane._exceptions import (
        ControlPlaneError as ControlPlaneError,
        ControlPlaneUnavailable as ControlPlaneUnavailable,
        FatalError as FatalError,
        QueueFull as QueueFull,
        TransientError as TransientError,
    )
    from .controlplane._session_client import (
        SessionClient as SessionClient,
        SessionCredentials as SessionCredentials,
        open_session_client as open_session_client,
    )

__all__ = [
    # The base: every error the package raises on purpose derives from SupervisorError.
    "ConfigError",
    "SupervisorError",
    # The supervision tree: specs, the supervisor, its snapshots, events and errors.
    "AutoShutdown",
    "Backoff",
    "ChildContext",
    "ChildCounts",
    "ChildExit",
    "ChildInfo",
    "ChildSnapshot",
    "ChildSpec",
    "ChildStartError",
    "ChildState",
    "EventKind",
    "ExitKind",
    "Restart",
    "RestartIntensityExceeded",
    "Shutdown",
    "Strategy",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorSnapshot",
    "SupervisorSpec",
    "current_child",
    "open_supervisor",
    # The worker: configuration, the Trio and threaded facades, what an agent is given.
    "AgentContext",
    "AgentSpec",
    "EnvPolicy",
    "Inbox",
    "InboxClosed",
    "InboxEntry",
    "LeaseLost",
    "ResultTimeout",
    "ThreadedWorker",
    "WedgeState",
    "WorkCancelled",
    "WorkHandle",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "WorkspaceError",
    "open_worker",
    # The control plane, as an embedder meets it: the errors worth catching, and
    # the client an agent uses to delegate (the rest is in supervisor.controlplane).
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "FatalError",
    "QueueFull",
    "SessionClient",
    "SessionCredentials",
    "TransientError",
    "open_session_client",
]

#: The names loaded on first use, by the module that defines them.
_LAZY: Final[dict[str, str]] = {
    **dict.fromkeys(("AgentContext", "AgentSpec", "EnvPolicy"), "._worker._agent"),
    "WorkerConfig": "._worker._config",
    **dict.fromkeys(("Inbox", "InboxClosed", "InboxEntry"), "._worker._inbox"),
    "LeaseLost": "._worker._lease",
    **dict.fromkeys(
        ("ResultTimeout", "ThreadedWorker", "WorkCancelled", "WorkHandle"), "._worker._threaded"
    ),
    "WedgeState": "._worker._wedge",
    "WorkerStats": "._worker._metrics",
    **dict.fromkeys(("Worker", "open_worker"), "._worker._worker"),
    "WorkspaceError": "._worker._workspace",
    **dict.fromkeys(
        (
            "ControlPlaneError",
            "ControlPlaneUnavailable",
            "FatalError",
            "QueueFull",
            "TransientError",
        ),
        ".controlplane._exceptions",
    ),
    **dict.fromkeys(
        ("SessionClient", "SessionCredentials", "open_session_client"),
        ".controlplane._session_client",
    ),
}

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute
    __getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
