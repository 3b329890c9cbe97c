"""The worker's local HTTP API: ``/health``, ``/metrics``, ``/status``, a page at ``/``.

A Starlette app on Hypercorn's Trio worker, run by the worker as the ``api``
child of its ``services`` supervisor (``config.api_enabled``). It only reads:
nothing here can start, stop or change a session, and its failures stay under
``services`` (ONE_FOR_ONE, restarted with a backoff), away from ``work``.

- ``GET /health``: ``status`` (``ok``, ``degraded`` or ``draining``), ``busy``,
  ``active``, ``queued``, ``capacity``, ``wedged`` and a few details. It answers
  200 when ``status`` is ``ok`` and 503 otherwise, so a load balancer or a
  readiness probe can use the code alone.
- ``GET /metrics``: the worker's figures in the Prometheus text format, from a
  registry of the worker's own (see ``supervisor._metrics``).
- ``GET /status``: the live snapshot as JSON: the supervision tree with states,
  restarts and uptimes, the sessions with their leases, the counters.
- ``GET /``: the same, as a live page (``supervisor._worker._api_dashboard``).

It binds to loopback by default and has no authentication: it exposes no
secret and no control, but prompts' sizes and item ids are still nobody
else's business, so binding it elsewhere is logged as a warning. With port 0
the system picks a free port; the URL is written to ``STATE_DIR/api.json``
(removed on exit) so that ``python -m supervisor status`` can find it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._base._describe import describe_exception
from .._base._exceptions import ConfigError
from ..controlplane._exceptions import ControlPlaneError
from ..controlplane._models import WorkStats
from ._api_dashboard import local_dashboard_routes
from ._config import DEFAULT_AGENT
from ._metrics import CONTENT_TYPE, MeteredWorker, render_metrics, worker_registry

if TYPE_CHECKING:
    from .._tree._events import SupervisorSnapshot
    from ..controlplane._protocol import ControlPlane
    from ._agent import AgentSpec
    from ._session import SessionRecord

__all__ = [
    "API_FILENAME",
    "ApiFile",
    "create_api_app",
    "health_document",
    "read_api_file",
    "serve_local_api",
    "status_document",
]

logger = logging.getLogger("supervisor.api")
# Hypercorn's own "Running on ..." line duplicates ours; keep its warnings and errors.
_hypercorn_log = logging.getLogger("supervisor.api.hypercorn")
_hypercorn_log.setLevel(logging.WARNING)

#: The file in the state directory that names the running worker's API.
API_FILENAME: Final = "api.json"
#: How long ``/health`` and ``/metrics`` wait for the control plane's queue figures.
QUEUE_STATS_TIMEOUT: Final = 2.0
#: Ended sessions ``/status`` still lists (newest first), next to all running ones.
RECENT_SESSIONS: Final = 20


# --- documents ------------------------------------------------------------------------


class ServedWorker(MeteredWorker, Protocol):
    """What the local API reads of a worker (a ``Worker`` is one).

    A Protocol, so that the worker, which starts this API as one of its services,
    is not imported back by it.
    """

    @property
    def control_plane(self) -> ControlPlane: ...

    @property
    def api_url(self) -> str | None: ...

    @property
    def agent_spec(self) -> AgentSpec: ...

    def snapshot(self) -> SupervisorSnapshot: ...

    def sessions(self) -> list[SessionRecord]: ...


async def _queue_stats(worker: ServedWorker) -> tuple[WorkStats | None, str | None]:
    """The control plane's queue figures, or ``None`` and why not (never raises)."""
    try:
        plane = worker.control_plane
    except RuntimeError:
        return None, "the worker is not running"
    with trio.move_on_after(QUEUE_STATS_TIMEOUT):
        try:
            return await plane.stats(), None
        except ControlPlaneError as exc:
            return None, describe_exception(exc)
    return None, f"no answer within {QUEUE_STATS_TIMEOUT:g}s"


async def health_document(worker: ServedWorker) -> dict[str, Any]:
    """``GET /health``'s body.

    ``status`` is ``draining`` once the worker stopped claiming, ``degraded``
    while the agent runtime is wedged or the control plane cannot be asked,
    else ``ok``.
    """
    stats = worker.stats()
    queue, problem = await _queue_stats(worker)
    wedge = worker.wedge
    if stats.draining:
        status = "draining"
    elif wedge.is_wedged or problem is not None:
        status = "degraded"
    else:
        status = "ok"
    return {
        "status": status,
        "busy": stats.busy,
        "active": stats.active,
        "queued": queue.depth if queue is not None else None,
        "capacity": stats.capacity,
        "wedged": wedge.is_wedged,
        "wedge_reason": wedge.reason,
        "draining": stats.draining,
        "worker_id": worker.worker_id,
        "control_plane_error": problem,
    }


def _session_entry(record: SessionRecord, now: float) -> dict[str, Any]:
    running = not record.done.is_set()
    end = now if running or record.ended_at is None else record.ended_at
    lease = record.lease
    outcome = record.outcome
    return {
        "work_id": record.work_id,
        "session_id": record.session_id,
        "running": running,
        "seconds": round(max(0.0, end - record.started_at), 3),
        "prompt_chars": record.prompt_chars,
        "outcome": (
            {
                "status": outcome.status.value,
                "exit_code": outcome.exit_code,
                "reason": outcome.reason,
            }
            if outcome is not None and not running
            else None
        ),
        "lease": (
            {
                "beats": lease.beats,
                "ttl": lease.ttl,
                "seconds_left": round(lease.time_left(), 3) if lease.confirmed else None,
                "failures": lease.failures,
                "stop_requested": lease.stop_reason,
                "lost": lease.lost,
            }
            if lease is not None
            else None
        ),
    }


def _control_plane_text(worker: ServedWorker) -> str:
    url = worker.config.control_plane
    if url is None:
        return f"embedded ({worker.config.state_dir.absolute()})"
    # A URL may carry credentials in its user-info part; they are nobody's business here.
    scheme, sep, rest = url.partition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}{sep}{host}"


def status_document(worker: ServedWorker) -> dict[str, Any]:
    """``GET /status``'s body: everything ``python -m supervisor status`` draws.

    Never holds a secret: no environment key, no fencing token, no session
    credential, no prompt text.
    """
    from .._version import __version__

    now = trio.current_time()
    stats = worker.stats()
    records = worker.sessions()
    running = [r for r in records if not r.done.is_set()]
    ended = [r for r in records if r.done.is_set()][-RECENT_SESSIONS:]
    try:
        tree: dict[str, Any] | None = worker.snapshot().as_dict()
    except RuntimeError:
        tree = None
    return {
        "worker_id": worker.worker_id,
        "pid": os.getpid(),
        "version": __version__,
        "environment_id": worker.config.environment_id,
        "control_plane": _control_plane_text(worker),
        "state_dir": str(worker.config.state_dir.absolute()),
        "api_url": worker.api_url,
        "agent": (
            "the built-in demo agent"
            if worker.config.agent == DEFAULT_AGENT
            else worker.agent_spec.name
        ),
        "stats": {
            "capacity": stats.capacity,
            "active": stats.active,
            "busy": stats.busy,
            "started": stats.started,
            "outcomes": dict(stats.outcomes),
            "lease_losses": stats.lease_losses,
            "restarts": stats.restarts,
            "draining": stats.draining,
        },
        "wedge": {
            "wedged": worker.wedge.is_wedged,
            "reason": worker.wedge.reason,
            "marks": worker.wedge.marks,
        },
        "tree": tree,
        "sessions": [_session_entry(r, now) for r in running]
        + [_session_entry(r, now) for r in reversed(ended)],
    }


# --- the app ----------------------------------------------------------------------------


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 in the package's JSON error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here")
    return _error(
        exc.status_code,
        "not_found" if exc.status_code == 404 else "http_error",
        f"no route for {request.method} {request.url.path}; try /health, /metrics or /status",
    )


def create_api_app(worker: ServedWorker) -> Starlette:
    """The local API for ``worker`` (serve it with any ASGI server running on Trio)."""
    registry, collector = worker_registry(worker)

    async def health(request: Request) -> Response:
        body = await health_document(worker)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        collector.queue, _ = await _queue_stats(worker)
        try:
            payload = render_metrics(registry)
        finally:
            collector.queue = None
        return Response(payload, media_type=CONTENT_TYPE)

    async def status(request: Request) -> Response:
        return JSONResponse(status_document(worker))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            *local_dashboard_routes(
                lambda: status_document(worker), lambda: health_document(worker)
            ),
        ],
        exception_handlers={HTTPException: _http_exception},
    )


# --- the api.json file ------------------------------------------------------------------


@attrs.frozen
class ApiFile:
    """What ``STATE_DIR/api.json`` says about the worker serving there.

    Attributes:
        url: the API's base URL.
        pid: the worker's process id.
        worker_id: the worker's id.
        started_at: wall-clock time the API started listening.
    """

    url: str
    pid: int
    worker_id: str
    started_at: float

    def process_alive(self) -> bool:
        """Whether a process with ``pid`` still exists (a stale file outlives a SIGKILL)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists; it is just not ours to signal
        return True


def read_api_file(state_dir: Path) -> ApiFile | None:
    """The API file of ``state_dir``, or ``None`` when there is none or it is unreadable."""
    try:
        data = json.loads((state_dir / API_FILENAME).read_text(encoding="utf-8"))
        return ApiFile(
            url=str(data["url"]),
            pid=int(data["pid"]),
            worker_id=str(data["worker_id"]),
            started_at=float(data["started_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_api_file(path: Path, info: ApiFile) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(attrs.asdict(info)) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _remove_api_file(path: Path, info: ApiFile) -> None:
    """Remove the file if it still describes this API (another worker may have replaced it)."""
    if read_api_file(path.parent) == info:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- serving ----------------------------------------------------------------------------


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_api_address(host: str, port: int) -> None:
    """Fail early, naming the setting, when the API's address cannot be bound.

    Port 0 always binds (the system picks a port), but the host must still be an
    address of this machine.

    Raises:
        ConfigError: with ``key="api_port"`` (port taken) or ``key="api_host"``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Hypercorn sets SO_REUSEADDR too: probe the way it will bind.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if port and exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise ConfigError(
                f"port {port} on {host} is already in use ({reason}); choose another "
                "--api-port, or 0 to pick a free one",
                key="api_port",
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}", key="api_host") from None
    finally:
        probe.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve_local_api(
    worker: ServedWorker,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_file: Path | None = None,
    on_bound: Callable[[str | None], None] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API until cancelled; ``task_status`` gets the base URL.

    Args:
        worker: the worker to describe.
        host: the address to bind (loopback by default).
        port: the port; 0 picks a free one.
        api_file: where to write the URL once bound (removed again on exit).
        on_bound: called with the URL once bound, and with ``None`` on exit.
        task_status: receives the bound base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        ConfigError: the address cannot be bound (for example the port is in use).
    """
    check_api_address(host, port)
    if not _is_loopback(host):
        logger.warning(
            "the local API listens on %s: it has no authentication, so anyone who can reach "
            "that address can read this worker's status and metrics",
            host,
        )
    app = create_api_app(worker)
    config = HypercornConfig()
    config.bind = [_bind_address(host, port)]
    config.accesslog = None
    config.errorlog = _hypercorn_log
    config.graceful_timeout = 1.0
    info: ApiFile | None = None
    try:
        async with trio.open_nursery() as nursery:
            asgi: Any = app  # Starlette's __call__ is typed with plain mappings, hypercorn's not
            binds: list[str] = await nursery.start(partial(hypercorn_serve, asgi, config))
            url = binds[0]
            if api_file is not None:
                info = ApiFile(url, os.getpid(), worker.worker_id, time.time())
                try:
                    _write_api_file(api_file, info)
                except OSError as exc:
                    info = None
                    logger.warning("could not write %s: %s", api_file, exc.strerror or exc)
            logger.info(
                "local API listening on %s (a live page at /; /health, /metrics, /status)", url
            )
            if on_bound is not None:
                on_bound(url)
            task_status.started(url)
    finally:
        if on_bound is not None:
            on_bound(None)
        if info is not None and api_file is not None:
            _remove_api_file(api_file, info)
