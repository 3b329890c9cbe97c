"""``WorkerConfig``: every setting of a worker, validated once, frozen.

Each field matches a ``python -m supervisor run`` flag (``--max-concurrency``
is ``max_concurrency``, and so on). Wrong values raise :class:`ConfigError`
naming the field, at construction, never later at the first session.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .._base._exceptions import ConfigError
from ..controlplane._connect import open_control_plane
from ..controlplane._exceptions import BadRequest
from ..controlplane._protocol import ControlPlane
from ..controlplane._store._common import (
    MAX_ATTEMPTS,
    MAX_BACKOFF,
    MAX_QUEUE_DEPTH,
    MAX_RETENTION,
    check_labels,
    parse_duration,
)
from ..controlplane._store._dburl import is_postgres_url
from ._agent import AgentFunction, is_async_callable, qualified_name
from ._lease import DEADLINE_FRACTION
from ._wedge import DEFAULT_WEDGE_PATTERNS, compile_wedge_patterns

__all__ = ["DEFAULT_AGENT", "AgentSetting", "WorkerConfig", "agent_text"]

#: The built-in demo agent: a tiny subprocess that shows the runner at work.
DEFAULT_AGENT = f"{shlex.quote(sys.executable)} -m supervisor._worker._demo_agent {{prompt}}"

_WORKSPACE_KINDS = ("none", "git")
_LOG_FORMATS = ("text", "json")


def _default_worker_id() -> str:
    host = socket.gethostname().split(".")[0] or "worker"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _check(
    predicate: Callable[[Any], bool], requirement: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not predicate(value):
            raise ConfigError(f"{requirement}, got {value!r}", key=attribute.name)

    return validate


#: The grace an agent gets by default, when the lease leaves room for it.
DEFAULT_AGENT_GRACE = 5.0


def _default_grace(lease_ttl: Any) -> float:
    """5 s, or less when the lease is short: three quarters of ``0.2 x lease_ttl``."""
    if not _positive(lease_ttl):
        return DEFAULT_AGENT_GRACE  # lease_ttl's own validator names the problem
    return min(DEFAULT_AGENT_GRACE, 0.75 * (1 - DEADLINE_FRACTION) * float(lease_ttl))


def _identity(value: Any) -> Any:
    """A numeric user or group given as text is an id, not a name."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _check_identity(key: str, value: Any) -> None:
    """A user or group that exists on this machine, by name or id."""
    if value is None:
        return
    import grp
    import pwd

    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ConfigError(f"expected a name or a numeric id, got {value!r}", key=key)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"expected a name or a numeric id, got {value!r}", key=key)
        return  # a numeric id needs no entry
    lookup = pwd.getpwnam if key == "agent_user" else grp.getgrnam
    try:
        lookup(value)
    except KeyError:
        what = "user" if key == "agent_user" else "group"
        raise ConfigError(f"no such {what} on this machine: {value!r}", key=key) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _optional(predicate: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or predicate(value)


def _path(value: Any) -> Path:
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise ConfigError(f"expected a path, got {value!r}")


def _optional_path(value: Any) -> Path | None:
    return None if value is None or value == "" else _path(value)


def _duration(value: Any) -> Any:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or a number, as seconds."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(str(exc), key="retention") from None
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _whole(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


#: The settings that are the environment's (`EnvironmentSettings`), by their name there.
ENVIRONMENT_FIELDS = {
    "max_queue_depth": "max_queue_depth",
    "retention": "retention",
    "default_max_attempts": "max_attempts",
    "default_backoff": "backoff",
    "default_backoff_max": "backoff_max",
}


def _patterns(value: Any) -> Any:
    # A lone string would otherwise become a tuple of its characters.
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list | tuple) else value


AgentSetting = str | tuple[str, ...] | AgentFunction
"""What ``WorkerConfig.agent`` holds: a command line, the command's arguments, or a callable."""


def _agent_setting(value: Any) -> AgentSetting:
    """The agent setting in its kept form, or a ``ConfigError`` saying what was expected."""
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError("expected a command, got an empty one", key="agent")
        return value
    if isinstance(value, list | tuple):
        wrong = [arg for arg in value if not isinstance(arg, str)]
        if wrong:
            raise ConfigError(
                f"expected the command's arguments as strings, got {wrong[0]!r} in {value!r}",
                key="agent",
            )
        if not value or not value[0].strip():
            raise ConfigError(
                f"expected a command: the first argument names the program, got {value!r}",
                key="agent",
            )
        return tuple(value)
    if callable(value):
        if not is_async_callable(value):
            raise ConfigError(
                f"expected an async callable (async def agent(ctx)), got {value!r}", key="agent"
            )
        function: AgentFunction = value
        return function
    raise ConfigError(
        "expected a command (text, or a list of its arguments) or an async callable, "
        f"got {value!r}",
        key="agent",
    )


def agent_text(value: AgentSetting) -> str:
    """The agent setting as a person reads it (status pages, the start-up banner)."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return shlex.join(value)
    return qualified_name(value)


def _labels(value: Any) -> tuple[str, ...]:
    """Routing labels, sorted and folded; a lone string is one label."""
    if isinstance(value, str):
        value = (value,)
    try:
        return check_labels(tuple(value) if isinstance(value, list) else value)
    except BadRequest as exc:
        raise ConfigError(str(exc), key="labels") from None


def _valid_patterns(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"expected a list of patterns, got {value!r}", key=attribute.name)
    try:
        compile_wedge_patterns(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=attribute.name) from None


def _shown_control_plane(value: str) -> str:
    """The setting as it may be printed: a database password never is."""
    from ..controlplane._store._dburl import is_postgres_url, redact

    return ",".join(redact(u) if is_postgres_url(u) else u for u in value.split(","))


def _check_control_plane(value: str) -> None:
    from ..controlplane._store._dburl import is_postgres_url, redact

    urls = [part.strip() for part in value.split(",")]
    if len(urls) == 1 and is_postgres_url(urls[0]):
        return
    for url in urls:
        if not url.startswith(("http://", "https://")):
            shown = redact(url) if is_postgres_url(url) else repr(url)
            raise ConfigError(
                "expected an http(s):// URL (or several, comma-separated) or one "
                f"postgresql:// URL, got {shown}",
                key="control_plane",
            )


@attrs.frozen(kw_only=True)
class WorkerConfig:
    """A worker's settings.

    Attributes:
        state_dir: where the embedded control plane, logs, workspaces and journals live.
        control_plane: URL of a remote control plane; ``None`` = the embedded one in ``state_dir``.
            Several served replicas are comma-separated ``http(s)://`` URLs (tried in turn);
            a ``postgresql://`` URL is the fleet database itself, used directly.
        environment_id: the environment to claim work from.
        environment_key: the bearer key for a remote control plane (never logged, never
            passed to agents). ``environment_key_file`` is re-read on 401 instead.
        worker_id: this worker's id on the control plane (default: host-pid-random).
        max_concurrency: sessions at once; the poller never claims beyond it.
        agent: the agent, in whichever form is natural where it is written: the
            command's arguments as a list (``["claude", "-p", "{prompt}"]``, nothing is
            split); a command line as text (split like a shell, never run by one); an
            async callable (``async def agent(ctx)``, in-process); or the text
            ``package.module:function`` naming one. ``{prompt}``, ``{work_id}`` and
            ``{session_id}`` are substituted in each argument. A list is kept as a tuple.
        agent_env: names of extra environment variables passed on to agents.
        agent_grace: seconds between SIGTERM and SIGKILL for an agent being stopped.
            It must end before the server's lease expiry: the worker kills an agent
            whose lease deadline (``0.8 x lease_ttl`` after the last good heartbeat
            was sent) passed, so ``0.8 x lease_ttl + agent_grace < lease_ttl``, i.e.
            ``agent_grace < 0.2 x lease_ttl``. A larger value is refused, not
            clamped: the operator asked for a grace the lease cannot give, and a
            silently shorter one would surprise an agent that counts on it. Left
            unset it is 5 s, or ``0.15 x lease_ttl`` when that is less.
        agent_user: run subprocess agents as this user (a name or a uid), so that
            they can read neither the worker's environment and memory nor its key
            file. Needs a worker allowed to switch users (root). Workspaces are
            then owned by that user. ``None``: agents run as the worker's user.
        agent_group: the agents' group with ``agent_user`` (default: its primary group).
        agent_reaper: enforce each agent's lease deadline from a separate reaper
            process too (DESIGN §3.8), so that no agent outlives its lease when the
            worker is killed or frozen. Leave it on; off only reproduces the old
            behaviour (or suits a platform without ``/proc``).
        session_log_max_bytes: the most one session's log may take on disk; beyond
            half of it the log is rotated once (``<log>.1``), so the last half to
            whole of it is kept. ``None``: no cap.
        workspace: ``none`` (a fresh temporary directory) or ``git`` (a local clone of
            ``base_repo``).
        base_repo: the repository ``git`` workspaces clone.
        keep_workspaces: leave workspaces on disk after sessions (for debugging).
        api_host, api_port: the local HTTP API (port 0 picks a free one and writes the URL
            to ``state_dir/api.json``); ``api_enabled=False`` turns it off.
        lease_ttl: the lease ttl to ask the control plane for, in seconds.
        labels: routing labels this worker has (``gpu``, ``repo:foo``): it claims only
            items whose required labels are all among them, and none claims only
            unlabelled items. Reported in presence. In the environment: comma-separated.
        session_timeout: seconds of execution a session may take (never the wait for a
            slot); an item's own ``timeout`` replaces it for that item.
        poll_block_ms: how long one poll may wait on the server for work.
        delegation_poll_interval: seconds between the delegation watcher's polls for
            results of this worker's delegations.
        delegation_cooldown: seconds after a follow-up message to a finished session during
            which it gets no other; results arriving meanwhile are batched into the next one
            (never dropped).
        delegation_lru_size: delegation results (and sessions) the watcher remembers in memory
            to recognise repeats; the rest of its memory is the journal on disk.
        log_format: ``text`` or ``json``.
        drain_timeout: on SIGTERM, seconds running sessions get to finish before cancellation.
        wedge_patterns: agent output that means the agent runtime is wedged: regular
            expressions, searched case-insensitively in every output line (plain text works
            as is). A match cancels that session with outcome ``wedged`` and gives its item
            back. Empty turns output detection off. In the environment: comma-separated.
        wedge_timeout: seconds without any agent output after which a session counts as
            wedged (the silence watchdog); ``None`` (the default) turns it off, because an
            agent that prints only at its end would look wedged.
        probe_interval: while wedged, the worker claims no work but one probe session every
            this many seconds (the first this long after the wedge); a probe that completes
            clears the wedge.
        presence_interval: seconds between the worker's presence reports to the control
            plane (its ``offline_after`` should be about three of them).
        max_queue_depth: the environment's queue cap: a submit beyond it is refused
            (`QueueFull`). ``None`` leaves the environment's stored setting as it is.
        retention: seconds (or ``"7d"``, ``"12h"``...) stopped items, messages and
            settled delegations are kept; the worker's retention sweep purges older ones.
        default_max_attempts, default_backoff, default_backoff_max: the environment's
            default retry policy, for items submitted without one.

            These five are the environment's settings, kept in the control plane's
            database: the worker writes the ones given when it starts (later writes win),
            and only on a plane it owns (embedded or direct PostgreSQL); a served plane
            takes them from ``serve``'s flags.
        retention_sweep_interval: seconds between the worker's retention sweeps (embedded
            and direct PostgreSQL planes only).
    """

    state_dir: Path = attrs.field(default=Path(".supervisor"), converter=_path)
    control_plane: str | None = attrs.field(
        default=None,
        validator=_check(_optional(lambda v: isinstance(v, str)), "expected a URL"),
        repr=lambda v: "None" if v is None else repr(_shown_control_plane(v)),
    )
    environment_id: str = attrs.field(
        default="default",
        validator=_check(
            lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v,
            "expected a non-empty id without '/'",
        ),
    )
    environment_key: str | None = attrs.field(default=None, repr=False)
    environment_key_file: Path | None = attrs.field(default=None, converter=_optional_path)
    worker_id: str = attrs.field(
        factory=_default_worker_id,
        validator=_check(
            lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v,
            "expected a non-empty id without '/'",
        ),
    )
    labels: tuple[str, ...] = attrs.field(default=(), converter=_labels)
    max_concurrency: int = attrs.field(
        default=4,
        validator=_check(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10_000,
            "expected a whole number from 1 to 10000",
        ),
    )
    agent: AgentSetting = attrs.field(default=DEFAULT_AGENT, converter=_agent_setting)
    agent_env: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    agent_user: str | int | None = attrs.field(default=None, converter=_identity)
    agent_group: str | int | None = attrs.field(default=None, converter=_identity)
    agent_reaper: bool = True
    session_log_max_bytes: int | None = attrs.field(
        default=64 * 1024 * 1024,
        validator=_check(
            _optional(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 4096),
            "expected a whole number of bytes >= 4096",
        ),
    )
    workspace: str = attrs.field(
        default="none",
        validator=_check(lambda v: v in _WORKSPACE_KINDS, f"expected one of {_WORKSPACE_KINDS}"),
    )
    base_repo: Path | None = attrs.field(default=None, converter=_optional_path)
    keep_workspaces: bool = False
    api_enabled: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = attrs.field(
        default=0,
        validator=_check(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535,
            "expected a port from 0 to 65535",
        ),
    )
    lease_ttl: float = attrs.field(
        default=60.0, validator=_check(_positive, "expected seconds > 0")
    )
    agent_grace: float = attrs.field(
        default=attrs.Factory(lambda self: _default_grace(self.lease_ttl), takes_self=True),
        validator=_check(_non_negative, "expected seconds >= 0"),
    )
    session_timeout: float | None = attrs.field(
        default=None, validator=_check(_optional(_positive), "expected seconds > 0")
    )
    poll_block_ms: int = attrs.field(
        default=1000,
        validator=_check(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 60_000,
            "expected milliseconds from 0 to 60000",
        ),
    )
    delegation_poll_interval: float = attrs.field(
        default=5.0, validator=_check(_positive, "expected seconds > 0")
    )
    delegation_cooldown: float = attrs.field(
        default=60.0, validator=_check(_non_negative, "expected seconds >= 0")
    )
    delegation_lru_size: int = attrs.field(
        default=10_000,
        validator=_check(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10_000_000,
            "expected a whole number from 1 to 10000000",
        ),
    )
    log_format: str = attrs.field(
        default="text",
        validator=_check(lambda v: v in _LOG_FORMATS, f"expected one of {_LOG_FORMATS}"),
    )
    drain_timeout: float = attrs.field(
        default=30.0, validator=_check(_non_negative, "expected seconds >= 0")
    )

    wedge_patterns: tuple[str, ...] = attrs.field(
        default=DEFAULT_WEDGE_PATTERNS, converter=_patterns, validator=_valid_patterns
    )
    wedge_timeout: float | None = attrs.field(
        default=None, validator=_check(_optional(_positive), "expected seconds > 0")
    )
    probe_interval: float = attrs.field(
        default=60.0, validator=_check(_positive, "expected seconds > 0")
    )
    presence_interval: float = attrs.field(
        default=30.0, validator=_check(_positive, "expected seconds > 0")
    )
    max_queue_depth: int | None = attrs.field(
        default=None,
        validator=_check(
            _optional(_whole(1, MAX_QUEUE_DEPTH)),
            f"expected a whole number from 1 to {MAX_QUEUE_DEPTH}",
        ),
    )
    retention: float | None = attrs.field(
        default=None,
        converter=_duration,
        validator=_check(
            _optional(lambda v: _positive(v) and v <= MAX_RETENTION),
            "expected a duration > 0 (seconds, or 45s, 30m, 12h, 7d, 2w)",
        ),
    )
    default_max_attempts: int | None = attrs.field(
        default=None,
        validator=_check(
            _optional(_whole(1, MAX_ATTEMPTS)), f"expected a whole number from 1 to {MAX_ATTEMPTS}"
        ),
    )
    default_backoff: float | None = attrs.field(
        default=None,
        validator=_check(
            _optional(lambda v: _non_negative(v) and v <= MAX_BACKOFF),
            f"expected seconds from 0 to {MAX_BACKOFF:g}",
        ),
    )
    default_backoff_max: float | None = attrs.field(
        default=None,
        validator=_check(
            _optional(lambda v: _non_negative(v) and v <= MAX_BACKOFF),
            f"expected seconds from 0 to {MAX_BACKOFF:g}",
        ),
    )
    retention_sweep_interval: float = attrs.field(
        default=60.0, validator=_check(_positive, "expected seconds > 0")
    )

    def __attrs_post_init__(self) -> None:
        for name in self.agent_env:
            if not isinstance(name, str) or not name or "=" in name:
                raise ConfigError(
                    f"expected environment variable names, got {name!r}", key="agent_env"
                )
        if not self.agent_grace < (1 - DEADLINE_FRACTION) * self.lease_ttl:
            raise ConfigError(
                f"agent_grace ({self.agent_grace:g}s) must be shorter than 0.2 x lease_ttl "
                f"({(1 - DEADLINE_FRACTION) * self.lease_ttl:g}s for lease_ttl "
                f"{self.lease_ttl:g}s): an agent stopped at its lease deadline (0.8 x lease_ttl) "
                "must be dead before the control plane gives its item to another worker; "
                "lower agent_grace or raise lease_ttl",
                key="agent_grace",
            )
        for name in ("agent_user", "agent_group"):
            _check_identity(name, getattr(self, name))
        if self.agent_group is not None and self.agent_user is None:
            raise ConfigError("agent_group needs agent_user", key="agent_group")
        if self.workspace == "git" and self.base_repo is None:
            raise ConfigError(
                "workspace 'git' needs base_repo (the repository to clone)", key="base_repo"
            )
        if self.control_plane is not None:
            _check_control_plane(self.control_plane)
            given = [name for name in ENVIRONMENT_FIELDS if getattr(self, name) is not None]
            if given and not is_postgres_url(self.control_plane):
                raise ConfigError(
                    "the environment's policies are kept by the server of a served control "
                    "plane: set them with 'serve' (--max-queue-depth, --retention, "
                    "--max-attempts, --backoff, --backoff-max), not on the worker",
                    key=given[0],
                )

    def environment_settings(self) -> dict[str, int | float]:
        """The environment policies given here, by their `EnvironmentSettings` names."""
        return {
            ENVIRONMENT_FIELDS[name]: getattr(self, name)
            for name in ENVIRONMENT_FIELDS
            if getattr(self, name) is not None
        }

    @property
    def embedded(self) -> bool:
        """Whether the worker runs on the embedded control plane in ``state_dir``."""
        return self.control_plane is None

    def open_control_plane(
        self, *, missing_key: str
    ) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
        """The control plane these settings name, to open with ``async with``.

        Args:
            missing_key: the message when a remote plane has no key; the worker and
                the command line name different settings.
        """
        return open_control_plane(
            self.state_dir if self.control_plane is None else self.control_plane,
            environment_id=self.environment_id,
            key=self.environment_key,
            key_file=self.environment_key_file,
            setting="state_dir" if self.embedded else "control_plane",
            missing_key=missing_key,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(a.name for a in attrs.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> WorkerConfig:
        """Build from plain data (a TOML table, parsed environment), naming unknown keys."""
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting; known settings are: {', '.join(sorted(known))}", key=unknown[0]
            )
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
