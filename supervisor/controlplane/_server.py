"""The reference control-plane server: a ``ControlPlane`` per environment, over HTTP.

A Starlette app on Hypercorn's Trio worker, so it runs inside any Trio program
(``await nursery.start(partial(serve_control_plane, store, key_provider=key))``
gives the bound URL; ``open_control_plane_server`` is the context-manager form)
as well as on its own (``python -m supervisor serve``).

What it guarantees at the boundary:

- Every route under ``/v1/environments/{environment_id}`` needs
  ``Authorization: Bearer <key>``, compared with ``hmac.compare_digest``. With
  no key configured the server refuses to start (``ConfigError``), and if the
  key later reads as empty (an emptied key file) it refuses every request.
  ``GET /healthz`` and the dashboard's page shells and static files (``/``,
  ``/dashboard/...``; they hold no data, see ``_dashboard``) are the only
  unauthenticated routes; the dashboard's data needs the key like the API.
- A request that cannot be honoured changes nothing: the body is read (at
  most ``max_body_bytes``, else 413), decoded and validated completely before
  the store is called, and the store's own refusals are atomic.
- Every error, including unknown routes, is ``{"error": {"type", "message"}}``
  with the status and stable type of the matching exception class in
  ``supervisor._exceptions``.
- The key never appears in a log line, an error message or the access log
  (there is no access log: query strings carry fencing tokens).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._base._exceptions import ConfigError
from .._base._groups import collapse_group, raise_saving_context
from . import _codec as codec
from ._dashboard import dashboard_routes
from ._embedded import EmbeddedControlPlane
from ._exceptions import (
    BadRequest,
    ControlPlaneError,
    FencingConflict,
    NotFound,
    QueueFull,
    TransientError,
    Unauthorized,
)
from ._keys import KEY_ENV, KEY_FILE_ENV, KeyProvider, as_key_provider
from ._models import DelegationStatus, WorkState
from ._openapi import API_PREFIX, openapi_document
from ._protocol import ControlPlane
from ._retention import SWEEP_INTERVAL, run_retention_sweep
from ._store import SQLiteStore, Store
from ._store._common import check_labels

__all__ = [
    "DEFAULT_PORT",
    "MAX_BLOCK_MS",
    "MAX_BODY_BYTES",
    "EnvironmentFactory",
    "create_app",
    "open_control_plane_server",
    "serve_control_plane",
]

logger = logging.getLogger("supervisor.controlplane.server")

#: ``python -m supervisor serve``'s default port.
DEFAULT_PORT: Final = 8790
#: Largest request body accepted (bytes); anything larger is a 413.
MAX_BODY_BYTES: Final = 1 << 20
#: Longest long poll a client may ask for.
MAX_BLOCK_MS: Final = 60_000
#: The header a poller may name itself with instead of ``worker_id=``.
WORKER_ID_HEADER: Final = "Anthropic-Worker-ID"
#: Largest page ``GET /work`` returns.
MAX_PAGE_SIZE: Final = 1000
#: At most one re-read of the key file per this many seconds when a presented key
#: does not match: enough to pick up a rotation, too rare to be a file-read amplifier.
_KEY_RELOAD_INTERVAL: Final = 1.0
#: Above the client's connection keep-alive (httpx: 5 s), so the client, not the
#: server, closes idle connections and never reuses one the server just closed.
_KEEP_ALIVE_SECONDS: Final = 30.0

_ENVIRONMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")

EnvironmentFactory = Callable[[str], ControlPlane]
"""Builds the ``ControlPlane`` serving one environment, on that environment's first request."""

_Handler = Callable[[Request, ControlPlane], Awaitable[Response]]


def _embedded_plane(store: Store, environment_id: str) -> ControlPlane:
    # A store that hears commits from every process (PostgreSQL's NOTIFY) wakes its pollers
    # itself: the re-check only has to catch leases that expire meanwhile.
    interval = 2.0 if store.wakes_across_processes else 0.25
    return EmbeddedControlPlane(store, environment_id=environment_id, poll_interval=interval)


# --- responses ---------------------------------------------------------------------


def _json(value: codec.JSON, status: int = 200) -> Response:
    return Response(codec.dumps(value), status_code=status, media_type="application/json")


def _error(
    status: int,
    kind: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    current_token: str | None = None,
    extra: Mapping[str, codec.JSON] | None = None,
) -> Response:
    error: dict[str, codec.JSON] = {"type": kind, "message": message}
    if current_token is not None:
        error["current_token"] = current_token
    if extra:
        error.update(extra)
    return Response(
        codec.dumps({"error": error}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _error_for(exc: ControlPlaneError) -> Response:
    status = exc.status_code
    if status is None:
        status = 503 if isinstance(exc, TransientError) else 500
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    # A stale token of the holder's own lease learns the current one (see _fencing).
    current = exc.current_token if isinstance(exc, FencingConflict) else None
    extra: dict[str, codec.JSON] | None = None
    if isinstance(exc, QueueFull):
        headers = {"Retry-After": str(exc.retry_after)}
        extra = {
            "environment_id": exc.environment_id,
            "depth": exc.depth,
            "max_queue_depth": exc.max_queue_depth,
            "retry_after": exc.retry_after,
        }
    return _error(status, exc.error_type, exc.message, headers, current_token=current, extra=extra)


# --- environments -----------------------------------------------------------------


class _Environments:
    """One ``ControlPlane`` per environment id, created on first use.

    Planes built by a factory belong to the server and are closed when it stops,
    and so does a store the server opened from a path; a single plane or a store
    handed in by the caller stays the caller's to close.
    """

    def __init__(
        self,
        factory: EnvironmentFactory | None,
        single: ControlPlane | None,
        owned_store: Store | None = None,
    ) -> None:
        self._factory = factory
        self._single = single
        self._owned_store = owned_store
        self._planes: dict[str, ControlPlane] = {}
        #: The store behind every plane, when the server has one (it sweeps it).
        self.store: Store | None = owned_store

    @classmethod
    def from_source(cls, source: object) -> _Environments:
        if isinstance(source, Store):
            environments = cls(partial(_embedded_plane, source), None)
            environments.store = source
            return environments
        if isinstance(source, ControlPlane):
            return cls(None, source)
        if isinstance(source, str | os.PathLike):
            store = SQLiteStore(source)
            return cls(partial(_embedded_plane, store), None, owned_store=store)
        if callable(source):
            return cls(source, None)
        raise TypeError(
            "serve a ControlPlane, an environment factory, a store or a database path; "
            f"got {type(source).__name__}"
        )

    def get(self, environment_id: str) -> ControlPlane:
        if not _ENVIRONMENT_ID.fullmatch(environment_id):
            raise NotFound(
                f"unknown environment {environment_id!r}: ids are 1-200 letters, digits, "
                "'.', '_', ':', '@' or '-', starting with a letter or digit"
            )
        if self._single is not None:
            if environment_id != self._single.environment_id:
                raise NotFound(
                    f"unknown environment {environment_id!r}; this server serves "
                    f"{self._single.environment_id!r}"
                )
            return self._single
        plane = self._planes.get(environment_id)
        if plane is None:
            assert self._factory is not None
            plane = self._planes[environment_id] = self._factory(environment_id)
        return plane

    def existing(self, environment_id: str) -> ControlPlane | None:
        """The plane of an environment already in use here, without creating one.

        A request that is not authenticated by the environment key must not be
        able to make the server build (and keep) a plane per invented id.
        """
        if self._single is not None:
            return self._single if environment_id == self._single.environment_id else None
        return self._planes.get(environment_id)

    async def aclose(self) -> None:
        """Close what the server owns; shielded and bounded, so a cancelled server tidies up."""
        planes, self._planes = list(self._planes.values()), {}
        with trio.move_on_after(10, shield=True):
            for plane in planes:
                try:
                    await plane.aclose()
                except Exception:
                    logger.exception("closing the control plane of an environment failed")
        if self._owned_store is not None:
            self._owned_store.close()


# --- request parsing ----------------------------------------------------------------


class _Query:
    """Strict access to query parameters: unknown or repeated ones are errors.

    Only the names in ``repeatable`` may be given more than once (read them with
    `all_of`).
    """

    def __init__(
        self, request: Request, allowed: tuple[str, ...], repeatable: tuple[str, ...] = ()
    ) -> None:
        items = request.query_params.multi_items()
        names = [name for name, _ in items]
        self._lists: dict[str, list[str]] = {name: [] for name in repeatable}
        for name, value in items:
            if name in self._lists:
                self._lists[name].append(value)
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            expected = ", ".join(allowed) if allowed else "none"
            raise BadRequest(
                f"unknown query parameter(s): {', '.join(unknown)} (allowed: {expected})"
            )
        repeated = sorted(
            {name for name in names if names.count(name) > 1 and name not in self._lists}
        )
        if repeated:
            raise BadRequest(f"query parameter(s) given more than once: {', '.join(repeated)}")
        self._values = dict(items)

    def opt_str(self, name: str) -> str | None:
        return self._values.get(name)

    def all_of(self, name: str) -> list[str]:
        """Every value of a repeatable parameter, in order (none: empty)."""
        return list(self._lists.get(name, ()))

    def required_str(self, name: str) -> str:
        value = self._values.get(name)
        if not value:
            raise BadRequest(f"query parameter {name} is required")
        return value

    def opt_int(
        self, name: str, *, default: int | None, minimum: int, maximum: int | None = None
    ) -> int | None:
        raw = self._values.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name} must be an integer, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise BadRequest(f"query parameter {name} must be {bounds}, got {value}")
        return value

    def opt_bool(self, name: str) -> bool:
        raw = self._values.get(name)
        if raw is None or raw == "" or raw.lower() == "false":
            return False
        if raw.lower() == "true":
            return True
        raise BadRequest(f"query parameter {name} must be true or false, got {raw!r}")

    def positive_float(self, name: str) -> float | None:
        raw = self._values.get(name)
        if raw is None or raw == "":
            return None
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name} must be a number, got {raw!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise BadRequest(f"query parameter {name} must be a finite number > 0, got {raw!r}")
        return value


def _poller_id(request: Request, query: _Query) -> str | None:
    """The worker a poll names: ``worker_id=`` or the ``Anthropic-Worker-ID`` header, or none.

    Both may be given only if they agree: a poll must not be bound to one worker
    in the query and another in the header.
    """
    in_query = query.opt_str("worker_id")
    header = request.headers.getlist(WORKER_ID_HEADER)
    if len(header) > 1:
        raise BadRequest(f"the {WORKER_ID_HEADER} header is given more than once")
    in_header = header[0].strip() if header else None
    if in_query == "" or in_header == "":
        raise BadRequest("an empty worker id: name the worker, or leave the field out")
    if in_query is not None and in_header is not None and in_query != in_header:
        raise BadRequest(
            f"worker_id {in_query!r} and the {WORKER_ID_HEADER} header {in_header!r} disagree"
        )
    return in_query if in_query is not None else in_header


async def _read_body(request: Request, limit: int, *, required: bool) -> object:
    """The decoded JSON body, read no further than ``limit`` bytes.

    An absent body is ``{}`` when ``required`` is false (every field optional).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise BadRequest(
                f"request body of {size} bytes exceeds the limit of {limit} bytes", status_code=413
            )
    buffer = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            buffer += chunk
            if len(buffer) > limit:
                raise BadRequest(
                    f"request body exceeds the limit of {limit} bytes", status_code=413
                )
    if not buffer.strip():
        if required:
            raise BadRequest("a JSON request body is required")
        return {}
    return codec.loads(bytes(buffer))


# --- the app --------------------------------------------------------------------------


class _App:
    """Route handlers plus the auth and error policy around them."""

    def __init__(self, environments: _Environments, keys: KeyProvider, max_body_bytes: int) -> None:
        self._environments = environments
        self._keys = keys
        self._limit = max_body_bytes
        self._last_reload = -math.inf

    # --- policy ---

    def _expected_key(self) -> str:
        try:
            return self._keys.current()
        except ConfigError as exc:
            logger.warning("cannot read the environment key; refusing requests: %s", exc)
            return ""

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization")
        if header is None:
            raise Unauthorized("missing 'Authorization: Bearer <environment key>' header")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <environment key>'")
        expected = self._expected_key()
        if not expected:
            raise Unauthorized(
                "the server has no environment key configured; all requests are refused"
            )
        presented = token.encode()
        if hmac.compare_digest(presented, expected.encode()):
            return
        now = time.monotonic()
        if now - self._last_reload >= _KEY_RELOAD_INTERVAL:
            # The key may have been rotated on disk since it was last read.
            self._last_reload = now
            try:
                if self._keys.reload():
                    logger.info("the environment key changed on disk; using the new key")
            except ConfigError as exc:
                logger.warning("cannot re-read the environment key: %s", exc)
            fresh = self._expected_key()
            if fresh and hmac.compare_digest(presented, fresh.encode()):
                return
        raise Unauthorized("invalid environment key")

    async def _authenticate_session(self, request: Request) -> None:
        """The environment key, or the credential of the session named in the path.

        The session credential is what the worker that claimed the session hands
        to its agent, so the agent can delegate and exchange messages without
        holding the environment key. It is accepted only on the routes of its own
        session, only while that claim is live, and only by a control plane that
        can check it (``verify_session_secret``); anywhere else it is just a wrong
        key.
        """
        try:
            self._authenticate(request)
        except Unauthorized:
            header = request.headers.get("authorization") or ""
            scheme, _, token = header.partition(" ")
            token = token.strip()
            plane = self._environments.existing(request.path_params["environment_id"])
            verify = getattr(plane, "verify_session_secret", None)
            if scheme.lower() != "bearer" or not token or verify is None:
                raise
            if not await verify(request.path_params["session_id"], token):
                raise Unauthorized(
                    "invalid environment key, or not a live credential of this session"
                ) from None

    def endpoint(
        self, handler: _Handler, *, session_scoped: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                if session_scoped:
                    await self._authenticate_session(request)
                else:
                    self._authenticate(request)
                plane = self._environments.get(request.path_params["environment_id"])
                return await handler(request, plane)
            except ControlPlaneError as exc:
                return _error_for(exc)
            except Exception:
                # Cancellation is a BaseException and passes through untouched.
                logger.exception("unexpected error serving %s %s", request.method, request.url.path)
                return _error(500, "internal", "internal server error; see the server log")

        run.__name__ = handler.__name__
        return run

    async def body(self, request: Request, *, required: bool = True) -> object:
        return await _read_body(request, self._limit, required=required)

    # --- unauthenticated and framework routes ---

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except ControlPlaneError as exc:
            return _error_for(exc)
        return _json(openapi_document())

    # --- work ---

    async def submit(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_submit_request(await self.body(request))
        item = await plane.submit(
            body.prompt,
            session_id=body.session_id,
            metadata=body.metadata,
            retry=body.retry,
            priority=body.priority,
            delay=body.delay,
            not_before=body.not_before,
            key=body.key,
            labels=body.labels,
            timeout=body.timeout,
        )
        return _json(codec.encode_work_item(item), 200 if item.duplicate else 201)

    async def poll(self, request: Request, plane: ControlPlane) -> Response:
        query = _Query(
            request, ("worker_id", "block_ms", "reclaim_older_than_ms", "labels"), ("labels",)
        )
        worker_id = _poller_id(request, query)
        block_ms = query.opt_int("block_ms", default=0, minimum=0, maximum=MAX_BLOCK_MS)
        reclaim = query.opt_int("reclaim_older_than_ms", default=None, minimum=0)
        # Checked before the poll can wait: a bad label is a 400 at once, not after block_ms.
        labels = check_labels(query.all_of("labels"))
        item = await plane.poll(
            worker_id=worker_id,
            block_ms=block_ms or 0,
            reclaim_older_than_ms=reclaim,
            labels=labels,
        )
        if item is None:
            return Response(status_code=204)
        return _json(codec.encode_work_item(item))

    async def ack(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_ack_request(await self.body(request, required=False))
        item = await plane.ack(request.path_params["work_id"], worker_id=body.worker_id)
        return _json(codec.encode_work_item(item))

    async def heartbeat(self, request: Request, plane: ControlPlane) -> Response:
        query = _Query(request, ("expected_last_heartbeat", "desired_ttl_seconds"))
        token = query.required_str("expected_last_heartbeat")
        ttl = query.positive_float("desired_ttl_seconds")
        result = await plane.heartbeat(
            request.path_params["work_id"], expected_last_heartbeat=token, desired_ttl_seconds=ttl
        )
        return _json(codec.encode_heartbeat_result(result))

    async def stop(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_stop_request(await self.body(request, required=False))
        item = await plane.stop(
            request.path_params["work_id"],
            force=body.force,
            expected_last_heartbeat=body.expected_last_heartbeat,
            outcome=body.outcome,
        )
        return _json(codec.encode_work_item(item))

    async def requeue(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_requeue_request(await self.body(request))
        item = await plane.requeue(
            request.path_params["work_id"],
            expected_last_heartbeat=body.expected_last_heartbeat,
            outcome=body.outcome,
        )
        return _json(codec.encode_work_item(item))

    async def request_stop(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        item = await plane.request_stop(request.path_params["work_id"])
        return _json(codec.encode_work_item(item))

    async def retry(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        item = await plane.retry(request.path_params["work_id"])
        return _json(codec.encode_work_item(item))

    async def get_work(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        item = await plane.get(request.path_params["work_id"])
        return _json(codec.encode_work_item(item))

    async def list_work(self, request: Request, plane: ControlPlane) -> Response:
        query = _Query(request, ("state", "limit", "page", "dead"))
        raw_dead = query.opt_str("dead")
        if raw_dead not in (None, "", "true", "false"):
            raise BadRequest("query parameter dead must be true or false")
        raw_state = query.opt_str("state")
        state = None
        if raw_state:
            try:
                state = WorkState(raw_state)
            except ValueError:
                allowed = ", ".join(member.value for member in WorkState)
                raise BadRequest(f"query parameter state must be one of {allowed}") from None
        limit = query.opt_int("limit", default=100, minimum=1, maximum=MAX_PAGE_SIZE) or 100
        page = query.opt_int("page", default=0, minimum=0) or 0
        items = await plane.list_work(state=state, limit=limit, page=page, dead=raw_dead == "true")
        return _json(codec.encode_list(items, codec.encode_work_item))

    async def stats(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        return _json(codec.encode_work_stats(await plane.stats()))

    # --- workers ---

    async def register_worker(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_register_request(await self.body(request, required=False))
        record = await plane.register_worker(
            request.path_params["worker_id"], metadata=body.metadata
        )
        return _json(codec.encode_worker_record(record))

    async def worker_heartbeat(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        report = codec.decode_presence_report(
            await self.body(request), worker_id=request.path_params["worker_id"]
        )
        return _json(codec.encode_worker_record(await plane.worker_heartbeat(report)))

    async def list_workers(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        records = await plane.list_workers()
        return _json(codec.encode_list(records, codec.encode_worker_record))

    async def get_worker(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        record = await plane.get_worker(request.path_params["worker_id"])
        return _json(codec.encode_worker_record(record))

    async def deregister_worker(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        record = await plane.deregister_worker(request.path_params["worker_id"])
        return _json(codec.encode_worker_record(record))

    # --- delegations and messages ---

    async def delegate(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_delegate_request(await self.body(request))
        delegation = await plane.delegate(request.path_params["session_id"], body.task)
        return _json(codec.encode_delegation(delegation), 201)

    async def list_delegations(self, request: Request, plane: ControlPlane) -> Response:
        query = _Query(request, ("status", "uncollected"))
        raw = query.opt_str("status")
        status = None
        if raw:
            try:
                status = DelegationStatus(raw)
            except ValueError:
                allowed = ", ".join(member.value for member in DelegationStatus)
                raise BadRequest(f"query parameter status must be one of {allowed}") from None
        uncollected = query.opt_bool("uncollected")
        delegations = await plane.list_delegations(
            request.path_params["worker_id"], status=status, uncollected=uncollected
        )
        return _json(codec.encode_list(delegations, codec.encode_delegation))

    async def collect_delegation(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        delegation = await plane.collect_delegation(request.path_params["delegation_id"])
        return _json(codec.encode_delegation(delegation))

    async def delegation_result(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_delegation_result_request(await self.body(request))
        delegation = await plane.record_delegation_result(
            request.path_params["delegation_id"],
            status=body.status,
            response_preview=body.response_preview,
        )
        return _json(codec.encode_delegation(delegation))

    async def post_message(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_message_request(await self.body(request))
        message = await plane.post_message(request.path_params["session_id"], body.body)
        return _json(codec.encode_session_message(message), 201)

    async def notify(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        body = codec.decode_message_request(await self.body(request))
        message = await plane.notify(request.path_params["session_id"], body.body)
        return _json(codec.encode_session_message(message), 201)

    async def list_messages(self, request: Request, plane: ControlPlane) -> Response:
        _Query(request, ())
        messages = await plane.list_messages(request.path_params["session_id"])
        return _json(codec.encode_list(messages, codec.encode_session_message))

    def routes(self) -> list[Route]:
        """The route table; order matters where a literal segment shadows a parameter."""
        table: list[tuple[str, str, _Handler]] = [
            ("POST", "/work", self.submit),
            ("GET", "/work", self.list_work),
            ("GET", "/work/poll", self.poll),
            ("GET", "/work/stats", self.stats),
            ("GET", "/work/{work_id}", self.get_work),
            ("POST", "/work/{work_id}/ack", self.ack),
            ("POST", "/work/{work_id}/heartbeat", self.heartbeat),
            ("POST", "/work/{work_id}/stop", self.stop),
            ("POST", "/work/{work_id}/requeue", self.requeue),
            ("POST", "/work/{work_id}/request-stop", self.request_stop),
            ("POST", "/work/{work_id}/retry", self.retry),
            ("GET", "/workers", self.list_workers),
            ("GET", "/workers/{worker_id}", self.get_worker),
            ("DELETE", "/workers/{worker_id}", self.deregister_worker),
            ("POST", "/workers/{worker_id}/register", self.register_worker),
            ("POST", "/workers/{worker_id}/heartbeat", self.worker_heartbeat),
            ("GET", "/workers/{worker_id}/delegations", self.list_delegations),
            ("POST", "/sessions/{session_id}/delegate", self.delegate),
            ("POST", "/delegations/{delegation_id}/result", self.delegation_result),
            ("POST", "/delegations/{delegation_id}/collect", self.collect_delegation),
            ("POST", "/sessions/{session_id}/messages", self.post_message),
            ("GET", "/sessions/{session_id}/messages", self.list_messages),
            ("POST", "/sessions/{session_id}/notify", self.notify),
        ]
        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        # The routes a session's own credential may call (see _authenticate_session).
        session_scoped = {self.delegate, self.post_message, self.list_messages}
        routes.extend(
            Route(
                f"{API_PREFIX}{path}",
                self.endpoint(handler, session_scoped=handler in session_scoped),
                methods=[method],
            )
            for method, path, handler in table
        )
        return routes


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, in the same JSON error shape as everything else."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error(404, NotFound.error_type, f"no route for {request.method} {request.url.path}")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return _error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}"
            + (f" (allowed: {allowed})" if allowed else ""),
            {"Allow": allowed} if allowed else None,
        )
    return _error(exc.status_code, BadRequest.error_type, str(exc.detail))


def create_app(
    factory_or_store: object,
    *,
    key_provider: str | KeyProvider,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The ASGI app alone (``serve_control_plane`` runs it); useful to mount or test in-process.

    Args:
        factory_or_store: what serves the requests: a ``ControlPlane`` (one environment,
            its own; never closed here), an ``EnvironmentFactory`` (``environment_id ->
            ControlPlane``), or a store or database path for ``EmbeddedControlPlane``.
        key_provider: the environment key, or a provider. Pass ``FileKey(path, watch=True)``
            so that a key rotated on disk takes effect (and the old one stops working) on the
            next request; any provider is also reloaded, at most once a second, when a
            presented key does not match.
        max_body_bytes: the largest request body accepted.

    Raises:
        ConfigError: no key is configured (refusing every request is never a useful server).
    """
    app, _ = _build(factory_or_store, as_key_provider(key_provider), max_body_bytes)
    return app


def _build(
    source: object, keys: KeyProvider, max_body_bytes: int
) -> tuple[Starlette, _Environments]:
    require_key(keys)
    if max_body_bytes <= 0:
        raise ConfigError(f"max_body_bytes must be positive, got {max_body_bytes}")
    environments = _Environments.from_source(source)
    handlers = _App(environments, keys, max_body_bytes)
    routes = [*handlers.routes(), *dashboard_routes(handlers.endpoint)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    return app, environments


def require_key(keys: KeyProvider) -> None:
    key = keys.current()  # a ConfigError here (unreadable file) is the clear message we want
    if not key:
        raise ConfigError(
            "no environment key configured: the control plane refuses to start without one "
            f"(set {KEY_ENV} or {KEY_FILE_ENV})",
            key=KEY_ENV,
        )


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_bindable(host: str, port: int) -> None:
    """Fail early, with a clear message and no leaked socket, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}", key="--port") from None
    finally:
        probe.close()


async def serve_control_plane(
    factory_or_store: object,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    key_provider: str | KeyProvider,
    max_body_bytes: int = MAX_BODY_BYTES,
    environment_settings: Mapping[str, int | float | None] | None = None,
    retention_sweep_interval: float | None = SWEEP_INTERVAL,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a control plane over HTTP until cancelled.

    ``url = await nursery.start(partial(serve_control_plane, store, key_provider=key))``
    returns once the socket listens, with the base URL actually bound (``port=0``
    picks a free port). Cancelling the nursery stops the server at once: open
    requests are cut (clients see a connection error, which they treat as transient).

    Args:
        factory_or_store: see ``create_app``.
        host: the address to bind.
        port: the port to bind; 0 picks a free one.
        key_provider: the environment key or a ``KeyProvider``; required and non-empty.
        max_body_bytes: the largest request body accepted (413 above).
        environment_settings: policies (`EnvironmentSettings` field names to values) written,
            as the server starts, to every environment the store already has and to
            ``default``, and given to every environment created later through this server.
            Fields not named keep their stored values. Needs a store (or a path).
        retention_sweep_interval: seconds between retention sweeps of the store (see
            `run_retention_sweep`); ``None`` turns the sweep off. Only with a store.
        task_status: receives the bound base URL, for example ``http://127.0.0.1:41234``.

    Raises:
        ConfigError: no key, the address cannot be bound (for example the port is in
            use), or environment settings that are out of range or given without a store.
    """
    app, environments = _build(factory_or_store, as_key_provider(key_provider), max_body_bytes)
    try:
        if port:
            _check_bindable(host, port)
        store = environments.store
        if environment_settings:
            if store is None:
                raise ConfigError(
                    "environment settings need a store to keep them in: serve a store or "
                    "a database path"
                )
            await trio.to_thread.run_sync(apply_environment_settings, store, environment_settings)
        config = HypercornConfig()
        config.bind = [_bind_address(host, port)]
        config.accesslog = None
        config.errorlog = logging.getLogger("supervisor.controlplane.hypercorn")
        config.keep_alive_timeout = _KEEP_ALIVE_SECONDS
        config.graceful_timeout = 1.0
        async with trio.open_nursery() as nursery:
            # Starlette's __call__ is typed with plain mappings, hypercorn's with TypedDicts.
            asgi: Any = app
            binds: list[str] = await nursery.start(partial(hypercorn_serve, asgi, config))
            url = binds[0]
            if store is not None and retention_sweep_interval is not None:
                await nursery.start(
                    partial(
                        run_retention_sweep,
                        partial(_purge_batch, store),
                        interval=retention_sweep_interval,
                    )
                )
            logger.info("reference control plane listening on %s", url)
            task_status.started(url)
    finally:
        await environments.aclose()


async def _purge_batch(store: Store, limit: int) -> int:
    return await trio.to_thread.run_sync(partial(store.purge_expired, now=time.time(), limit=limit))


def apply_environment_settings(store: Store, settings: Mapping[str, int | float | None]) -> None:
    """Write ``settings`` to every environment of ``store`` (and ``default``), and make them
    the settings of environments created from now on through this store object.

    Raises:
        ConfigError: a setting is unknown or out of range.
    """
    import attrs

    from ._store._common import check_settings

    try:
        checked = check_settings(settings)
    except BadRequest as exc:
        raise ConfigError(exc.message) from None
    changes: dict[str, Any] = dict(checked)
    store.environment_defaults = attrs.evolve(store.environment_defaults, **changes)
    now = time.time()
    for environment_id in {"default", *store.list_environments()}:
        store.configure_environment(environment_id, checked, now=now)


@asynccontextmanager
async def open_control_plane_server(
    factory_or_store: object,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    key_provider: str | KeyProvider,
    max_body_bytes: int = MAX_BODY_BYTES,
    environment_settings: Mapping[str, int | float | None] | None = None,
    retention_sweep_interval: float | None = SWEEP_INTERVAL,
) -> AsyncIterator[str]:
    """Run the server for the duration of the block; yields its base URL.

    The ``open_*`` form of ``serve_control_plane``, for tests and tools that
    need a control plane on loopback for a while::

        async with open_control_plane_server(store, key_provider=key) as url:
            async with HttpControlPlane.open(url, key=key) as cp:
                ...
    """
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(
                    serve_control_plane,
                    factory_or_store,
                    host=host,
                    port=port,
                    key_provider=key_provider,
                    max_body_bytes=max_body_bytes,
                    environment_settings=environment_settings,
                    retention_sweep_interval=retention_sweep_interval,
                )
            )
            try:
                yield url
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: the server task ends only by
        # cancellation, so a group holding one exception carries the caller's own
        # (or a startup ConfigError). Hand it back as itself, as a plain call would.
        raise_saving_context(collapse_group(group))
