"""trio-supervisor: a Trio structured-concurrency supervisor for self-hosted agent workers.

The public surface is re-exported here; modules with a leading underscore are private.
"""

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

__version__ = "0.1.0.dev0"

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
