"""``HttpControlPlane``: the ``ControlPlane`` protocol over HTTP, with httpx.

Everything that can go wrong on the wire is translated here, once, into the
package's exceptions, so nothing above this module ever sees ``httpx``:

==========================================  =====================================
what happened                               raised
==========================================  =====================================
no answer: connect/read error, timeout      ``ControlPlaneUnavailable`` (transient)
5xx, 408, 429                               ``TransientError``
400, 413, 415, 422                          ``BadRequest``
401, 403                                    ``Unauthorized`` (after one key re-read)
404 / 409 / 410 / 412                       ``NotFound`` / ``Conflict`` / ``Gone`` /
                                            ``FencingConflict``
any other 4xx, an unexpected status or a    ``FatalError``
malformed answer
==========================================  =====================================

``trio.Cancelled`` is not an ``Exception`` and is never caught here: a
cancelled call aborts its request and the cancellation propagates.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Final, Self, TypeVar
from urllib.parse import quote

import attrs
import httpx
import trio

from .._base._exceptions import ConfigError
from . import _codec as codec
from ._exceptions import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    ControlPlaneUnavailable,
    FatalError,
    FencingConflict,
    Gone,
    NotFound,
    QueueFull,
    TransientError,
    Unauthorized,
)
from ._keys import KeyProvider, as_key_provider, check_key_syntax
from ._models import (
    Delegation,
    DelegationStatus,
    HeartbeatResult,
    Outcome,
    PresenceReport,
    RetryPolicy,
    SessionMessage,
    WorkerRecord,
    WorkItem,
    WorkState,
    WorkStats,
)
from ._store._common import (
    QUEUE_FULL_RETRY_AFTER,
    check_key,
    check_labels,
    check_retry,
    check_schedule,
    check_timeout,
)
from ._text import check_text

__all__ = ["HttpControlPlane", "open_http_control_plane"]

_T = TypeVar("_T")
_E = TypeVar("_E", WorkState, DelegationStatus)

#: Extra seconds a long poll may take beyond ``block_ms`` before it counts as a timeout.
POLL_MARGIN: Final = 5.0

_FATAL_BY_STATUS: Final[Mapping[int, type[ControlPlaneError]]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    412: FencingConflict,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
}


def _segment(value: str, what: str) -> str:
    """Percent-encode one path segment; refuse what no route could match."""
    if not value:
        raise BadRequest(f"{what} must not be empty")
    check_text(value, what)  # quote() would raise UnicodeEncodeError
    if "/" in value:
        raise BadRequest(f"{what} must not contain '/': {value!r}")
    return quote(value, safe="")


def _enum_value(kind: type[_E], value: str, what: str) -> str:
    """The wire value of an enum argument; a value outside the enum is the caller's BadRequest."""
    try:
        return kind(value).value
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise BadRequest(f"{what} must be one of {allowed}, got {value!r}") from None


def _check_base(base_url: str) -> str:
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid control plane URL {base_url!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"the control plane URL must be http(s)://host[:port], got {base_url!r}")
    return str(url).rstrip("/")


def _queue_full(body: object, retry_after_header: str | None) -> QueueFull | None:
    """The `QueueFull` a 429 describes (its body's fields, its ``Retry-After``), if it is one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or error.get("type") != QueueFull.error_type:
        return None
    environment_id, depth, cap = (
        error.get("environment_id"),
        error.get("depth"),
        error.get("max_queue_depth"),
    )
    if not (isinstance(environment_id, str) and isinstance(depth, int) and isinstance(cap, int)):
        return None
    try:
        retry_after = max(1, int((retry_after_header or "").strip()))
    except ValueError:
        retry_after = QUEUE_FULL_RETRY_AFTER
    return QueueFull(environment_id, depth, cap, retry_after)


def _error_for(status: int, message: str, body: object = None) -> ControlPlaneError:
    kind = _FATAL_BY_STATUS.get(status)
    if kind is FencingConflict:
        return FencingConflict(message, status_code=status, current_token=_current_token(body))
    if kind is not None:
        return kind(message, status_code=status)
    if status >= 500 or status in (408, 429):
        return TransientError(message, status_code=status)
    return FatalError(message, status_code=status)


def _error_body(response: httpx.Response) -> object:
    try:
        return codec.loads(response.content, what="error body")
    except BadRequest:
        return None


def _current_token(body: object) -> str | None:
    """The ``current_token`` a 412 names (the holder missed an answer), if any."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            token = error.get("current_token")
            if isinstance(token, str) and token:
                return token
    return None


def _error_message(body: object, response: httpx.Response) -> str:
    """The server's ``{"error": {"message"}}``, else the reason phrase."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            kind = error.get("type")
            prefix = f"{kind}: " if isinstance(kind, str) else ""
            return f"{prefix}{error['message']}"
    return response.reason_phrase or "no reason given"


class HttpControlPlane:
    """A ``ControlPlane`` reached over HTTP (the reference server, or a compatible service).

    One ``httpx.AsyncClient`` is shared by every call (connection reuse). It is
    created here (by ``client_factory`` when given) unless one is injected;
    ``aclose`` closes it only when it was created here. A client created here
    can be replaced by a fresh one with :meth:`reconnect`, which a long-lived
    caller does after repeated transport failures (a pool of dead connections
    after a network change, a proxy that went away).

    Args:
        base_url: the server's root, for example ``http://127.0.0.1:8790``; or several
            replicas of it (a sequence, or one comma-separated string), tried in turn: a
            call that cannot connect to one moves on to the next.
        environment_id: the environment every call addresses.
        key: the environment key, or a ``KeyProvider`` (``FileKey`` re-reads its file after a 401).
        client: an ``httpx.AsyncClient`` to use instead of a private one.
        timeout: seconds allowed per call (connect, read, write); a poll gets
            ``block_ms`` plus ``POLL_MARGIN`` more.
        client_factory: makes the private clients (the first one, and one per
            :meth:`reconnect`); ``httpx.AsyncClient`` when not given. Not
            together with ``client``.

    Raises:
        ConfigError: ``base_url`` is not an http(s) URL, or ``timeout`` is not positive.
        ValueError: both ``client`` and ``client_factory`` were given.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        environment_id: str = "default",
        key: str | KeyProvider,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        if client is not None and client_factory is not None:
            raise ValueError("give an httpx client or a factory of clients, not both")
        given = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self._bases = [_check_base(one.strip()) for one in given if one.strip()]
        if not self._bases:
            raise ConfigError("no control plane URL given")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(key, str) and (problem := check_key_syntax(key)):
            raise ConfigError(problem, key="environment key")
        if not environment_id or "/" in environment_id:
            raise ConfigError(f"invalid environment id {environment_id!r}")
        self._base = self._bases[0]
        self._environment_id = environment_id
        self._prefix = f"/v1/environments/{quote(environment_id, safe='')}"
        self._keys = as_key_provider(key)
        self._timeout = timeout
        self._owns_client = client is None
        self._client_factory = client_factory or httpx.AsyncClient
        self._client = client if client is not None else self._client_factory()
        self._closed = False
        #: Clients replaced by :meth:`reconnect` so far.
        self.reconnects = 0
        #: Moves from one server to the next after a connection error.
        self.failovers = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        base_url: str | Sequence[str],
        *,
        environment_id: str = "default",
        key: str | KeyProvider,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - per-request HTTP timeout, not a deadline
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
    ) -> AsyncIterator[HttpControlPlane]:
        """``async with HttpControlPlane.open(url, key=...) as cp:`` closes it on exit."""
        plane = cls(
            base_url,
            environment_id=environment_id,
            key=key,
            client=client,
            timeout=timeout,
            client_factory=client_factory,
        )
        try:
            yield plane
        finally:
            await plane.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"HttpControlPlane({self._base!r}, environment_id={self._environment_id!r})"

    @property
    def environment_id(self) -> str:
        return self._environment_id

    @property
    def base_url(self) -> str:
        """The server calls go to now (the first URL, until a failover)."""
        return self._base

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every server this client may use, in failover order."""
        return tuple(self._bases)

    def _fail_over(self, failed: str) -> bool:
        """Move on from ``failed`` to the next server; ``False`` when there is only one."""
        if len(self._bases) == 1:
            return False
        if self._base == failed:
            self._base = self._bases[(self._bases.index(failed) + 1) % len(self._bases)]
            self.failovers += 1
        return True

    async def aclose(self) -> None:
        """Close the private client (never an injected one); idempotent, bounded under cancel."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with trio.move_on_after(5, shield=True):
                await self._client.aclose()

    async def reconnect(self) -> bool:
        """Replace the private client by a fresh one; ``False`` for an injected client.

        Calls in flight on the old client may fail with a transport error
        (transient: their callers retry); calls made from now on use the new
        one. The old client is closed in a shielded, bounded scope.
        """
        if self._closed or not self._owns_client:
            await trio.lowlevel.checkpoint()
            return False
        old, self._client = self._client, self._client_factory()
        self.reconnects += 1
        with trio.move_on_after(5, shield=True):
            await old.aclose()
        return True

    # --- transport ---------------------------------------------------------------

    def _key(self) -> str:
        try:
            key = self._keys.current()
        except ConfigError as exc:
            raise Unauthorized(str(exc)) from None
        if problem := check_key_syntax(key):
            raise Unauthorized(problem)
        return key

    def _rotated_key(self, used: str) -> str | None:
        """After a 401: re-read the key; the new key if it differs from ``used``, else ``None``."""
        try:
            self._keys.reload()
            fresh = self._keys.current()
        except ConfigError:
            return None
        if fresh == used or check_key_syntax(fresh):
            return None
        return fresh

    async def _send(
        self,
        method: str,
        what: str,
        path: str,
        key: str,
        params: Mapping[str, str | list[str]] | None,
        content: bytes | None,
        seconds: float,
    ) -> httpx.Response:
        """Send one request, failing over to the next server when one cannot be reached.

        A connection that could not be made carried nothing, so the same request
        goes at once to the next server (each server tried once). A failure after
        the request may have been sent is not repeated here (it may have been
        applied): it is `ControlPlaneUnavailable`, and the next call goes to the
        next server.
        """
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        for _ in range(len(self._bases)):
            base = self._base
            try:
                request = self._client.build_request(
                    method,
                    base + path,
                    params=params,
                    content=content,
                    headers=headers,
                    timeout=httpx.Timeout(seconds),
                )
                return await self._client.send(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if self._fail_over(base):
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise ControlPlaneUnavailable(
                        f"{what}: no answer from {base} within {seconds:g}s ({type(exc).__name__})"
                    ) from exc
                detail = str(exc) or type(exc).__name__
                raise ControlPlaneUnavailable(f"{what}: cannot reach {base}: {detail}") from exc
            except httpx.TimeoutException as exc:
                self._fail_over(base)
                raise ControlPlaneUnavailable(
                    f"{what}: no answer from {base} within {seconds:g}s ({type(exc).__name__})"
                ) from exc
            except httpx.TransportError as exc:
                self._fail_over(base)
                detail = str(exc) or type(exc).__name__
                raise ControlPlaneUnavailable(f"{what}: cannot reach {base}: {detail}") from exc
            except httpx.HTTPError as exc:
                detail = str(exc) or type(exc).__name__
                raise TransientError(f"{what}: HTTP failure talking to {base}: {detail}") from exc
        raise ControlPlaneUnavailable(
            f"{what}: none of the control planes could be reached ({', '.join(self._bases)})"
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | list[str]] | None = None,
        body: codec.JSON | None = None,
        seconds: float | None = None,
        statuses: list[int] | None = None,
    ) -> codec.JSON | None:
        """One request with auth, a 401 key re-read, and status translation.

        Returns:
            The decoded JSON answer, or ``None`` for 204 No Content.
        """
        if self._closed:
            raise RuntimeError("this HttpControlPlane is closed")
        # Refused here as the embedded plane refuses it (httpx would raise
        # UnicodeEncodeError, an exception that must not escape this module).
        check_text(path, "the path")
        check_text(params, "the query")
        check_text(body, "the request body")
        what = f"{method} {self._prefix}{path}"
        url = f"{self._prefix}{path}"
        content = None if body is None else codec.dumps(body)
        limit = self._timeout if seconds is None else seconds
        key = self._key()
        response = await self._send(method, what, url, key, params, content, limit)
        if response.status_code == 401:
            # Once, and only when the key really changed: a rotated key file is
            # picked up, but a wrong key never turns into a retry loop.
            fresh = self._rotated_key(key)
            if fresh is not None:
                response = await self._send(method, what, url, fresh, params, content, limit)
        status = response.status_code
        if statuses is not None:
            statuses.append(status)
        if status == 204:
            return None
        if 200 <= status < 300:
            try:
                return codec.loads(response.content, what="response body")
            except BadRequest as exc:
                raise FatalError(
                    f"{what}: malformed answer from the control plane: {exc.message}",
                    status_code=status,
                ) from None
        body = _error_body(response)
        if status == 429:
            full = _queue_full(body, response.headers.get("Retry-After"))
            if full is not None:
                raise full
        raise _error_for(status, f"{what} -> HTTP {status}: {_error_message(body, response)}", body)

    @staticmethod
    def _decode(what: str, value: codec.JSON | None, decode: Callable[[object], _T]) -> _T:
        """Decode an answer; a malformed one is the server's fault, so it is fatal, not a 400."""
        if value is None:
            raise FatalError(f"{what}: the control plane answered 204 where a body was expected")
        try:
            return decode(value)
        except BadRequest as exc:
            raise FatalError(
                f"{what}: malformed answer from the control plane: {exc.message}"
            ) from None

    def _decode_list(
        self, what: str, value: codec.JSON | None, decode: Callable[[object, str], _T]
    ) -> list[_T]:
        return self._decode(what, value, lambda raw: codec.decode_list(raw, decode))

    # --- work --------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: float | None = None,
        key: str | None = None,
        labels: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the item's, not this call's)
    ) -> WorkItem:
        # Refused here as the server would refuse it (a NaN could not even be sent).
        check_schedule(priority, delay, not_before)
        check_key(key)
        required = check_labels(labels)
        limit = check_timeout(timeout)
        request = codec.SubmitRequest(
            prompt,
            session_id,
            dict(metadata or {}),
            check_retry(retry),
            priority,
            delay,
            not_before,
            key,
            required,
            limit,
        )
        statuses: list[int] = []
        answer = await self._call(
            "POST", "/work", body=codec.encode_submit_request(request), statuses=statuses
        )
        item = self._decode("submit", answer, codec.decode_work_item)
        # 200 instead of 201: the key was used already and this is that item.
        return attrs.evolve(item, duplicate=statuses == [200])

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        params: dict[str, str | list[str]] = {"block_ms": str(block_ms)}
        if worker_id is not None:
            params["worker_id"] = worker_id
        if reclaim_older_than_ms is not None:
            params["reclaim_older_than_ms"] = str(reclaim_older_than_ms)
        wanted = check_labels(labels)
        if wanted:
            params["labels"] = list(wanted)  # labels=gpu&labels=repo:foo
        answer = await self._call(
            "GET",
            "/work/poll",
            params=params,
            seconds=self._timeout + max(block_ms, 0) / 1000 + POLL_MARGIN,
        )
        if answer is None:
            return None
        return self._decode("poll", answer, codec.decode_work_item)

    async def ack(self, work_id: str, *, worker_id: str | None = None) -> WorkItem:
        # Without a worker to name there is no body at all: the poll named the worker.
        body = None if worker_id is None else codec.encode_ack_request(codec.AckRequest(worker_id))
        answer = await self._call("POST", f"/work/{_segment(work_id, 'work_id')}/ack", body=body)
        return self._decode("ack", answer, codec.decode_work_item)

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        params = {"expected_last_heartbeat": expected_last_heartbeat}
        if desired_ttl_seconds is not None:
            params["desired_ttl_seconds"] = repr(float(desired_ttl_seconds))
        answer = await self._call(
            "POST", f"/work/{_segment(work_id, 'work_id')}/heartbeat", params=params
        )
        return self._decode("heartbeat", answer, codec.decode_heartbeat_result)

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        request = codec.StopRequest(force, expected_last_heartbeat, outcome)
        answer = await self._call(
            "POST",
            f"/work/{_segment(work_id, 'work_id')}/stop",
            body=codec.encode_stop_request(request),
        )
        return self._decode("stop", answer, codec.decode_work_item)

    async def requeue(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        request = codec.RequeueRequest(expected_last_heartbeat, outcome)
        answer = await self._call(
            "POST",
            f"/work/{_segment(work_id, 'work_id')}/requeue",
            body=codec.encode_requeue_request(request),
        )
        return self._decode("requeue", answer, codec.decode_work_item)

    async def request_stop(self, work_id: str) -> WorkItem:
        answer = await self._call("POST", f"/work/{_segment(work_id, 'work_id')}/request-stop")
        return self._decode("request_stop", answer, codec.decode_work_item)

    async def retry(self, work_id: str) -> WorkItem:
        answer = await self._call("POST", f"/work/{_segment(work_id, 'work_id')}/retry")
        return self._decode("retry", answer, codec.decode_work_item)

    async def get(self, work_id: str) -> WorkItem:
        answer = await self._call("GET", f"/work/{_segment(work_id, 'work_id')}")
        return self._decode("get", answer, codec.decode_work_item)

    async def list_work(
        self,
        *,
        state: WorkState | None = None,
        limit: int = 100,
        page: int = 0,
        dead: bool = False,
    ) -> Sequence[WorkItem]:
        params = {"limit": str(limit), "page": str(page)}
        if dead:
            params["dead"] = "true"
        if state is not None:
            params["state"] = _enum_value(WorkState, state, "state")
        answer = await self._call("GET", "/work", params=params)
        return self._decode_list("list_work", answer, codec.decode_work_item)

    async def stats(self) -> WorkStats:
        answer = await self._call("GET", "/work/stats")
        return self._decode("stats", answer, codec.decode_work_stats)

    # --- workers -----------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, *, metadata: Mapping[str, object] | None = None
    ) -> WorkerRecord:
        request = codec.RegisterRequest(dict(metadata or {}))
        answer = await self._call(
            "POST",
            f"/workers/{_segment(worker_id, 'worker_id')}/register",
            body=codec.encode_register_request(request),
        )
        return self._decode("register_worker", answer, codec.decode_worker_record)

    async def worker_heartbeat(self, report: PresenceReport) -> WorkerRecord:
        answer = await self._call(
            "POST",
            f"/workers/{_segment(report.worker_id, 'worker_id')}/heartbeat",
            body=codec.encode_presence_report(report),
        )
        return self._decode("worker_heartbeat", answer, codec.decode_worker_record)

    async def get_worker(self, worker_id: str) -> WorkerRecord:
        answer = await self._call("GET", f"/workers/{_segment(worker_id, 'worker_id')}")
        return self._decode("get_worker", answer, codec.decode_worker_record)

    async def list_workers(self) -> Sequence[WorkerRecord]:
        answer = await self._call("GET", "/workers")
        return self._decode_list("list_workers", answer, codec.decode_worker_record)

    async def deregister_worker(self, worker_id: str) -> WorkerRecord:
        answer = await self._call("DELETE", f"/workers/{_segment(worker_id, 'worker_id')}")
        return self._decode("deregister_worker", answer, codec.decode_worker_record)

    # --- delegations and messages ------------------------------------------------

    async def delegate(self, source_id: str, task: str) -> Delegation:
        answer = await self._call(
            "POST",
            f"/sessions/{_segment(source_id, 'source_id')}/delegate",
            body=codec.encode_delegate_request(codec.DelegateRequest(task)),
        )
        return self._decode("delegate", answer, codec.decode_delegation)

    async def list_delegations(
        self,
        worker_id: str,
        *,
        status: DelegationStatus | None = None,
        uncollected: bool = False,
    ) -> Sequence[Delegation]:
        params = (
            {} if status is None else {"status": _enum_value(DelegationStatus, status, "status")}
        )
        if uncollected:
            params["uncollected"] = "true"
        answer = await self._call(
            "GET", f"/workers/{_segment(worker_id, 'worker_id')}/delegations", params=params
        )
        return self._decode_list("list_delegations", answer, codec.decode_delegation)

    async def record_delegation_result(
        self, delegation_id: str, *, status: DelegationStatus, response_preview: str | None = None
    ) -> Delegation:
        checked = DelegationStatus(_enum_value(DelegationStatus, status, "status"))
        request = codec.DelegationResultRequest(checked, response_preview)
        answer = await self._call(
            "POST",
            f"/delegations/{_segment(delegation_id, 'delegation_id')}/result",
            body=codec.encode_delegation_result_request(request),
        )
        return self._decode("record_delegation_result", answer, codec.decode_delegation)

    async def collect_delegation(self, delegation_id: str) -> Delegation:
        answer = await self._call(
            "POST", f"/delegations/{_segment(delegation_id, 'delegation_id')}/collect"
        )
        return self._decode("collect_delegation", answer, codec.decode_delegation)

    async def post_message(self, session_id: str, body: str) -> SessionMessage:
        answer = await self._call(
            "POST",
            f"/sessions/{_segment(session_id, 'session_id')}/messages",
            body=codec.encode_message_request(codec.MessageRequest(body)),
        )
        return self._decode("post_message", answer, codec.decode_session_message)

    async def notify(self, session_id: str, body: str) -> SessionMessage:
        answer = await self._call(
            "POST",
            f"/sessions/{_segment(session_id, 'session_id')}/notify",
            body=codec.encode_message_request(codec.MessageRequest(body)),
        )
        return self._decode("notify", answer, codec.decode_session_message)

    async def list_messages(self, session_id: str) -> Sequence[SessionMessage]:
        answer = await self._call("GET", f"/sessions/{_segment(session_id, 'session_id')}/messages")
        return self._decode_list("list_messages", answer, codec.decode_session_message)


@asynccontextmanager
async def open_http_control_plane(
    base_url: str,
    *,
    environment_id: str = "default",
    key: str | KeyProvider,
    client: httpx.AsyncClient | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - per-request HTTP timeout, not a deadline
    client_factory: Callable[[], httpx.AsyncClient] | None = None,
) -> AsyncIterator[HttpControlPlane]:
    """An ``HttpControlPlane`` closed on exit (the ``open_*`` form of the constructor)."""
    async with HttpControlPlane.open(
        base_url,
        environment_id=environment_id,
        key=key,
        client=client,
        timeout=timeout,
        client_factory=client_factory,
    ) as plane:
        yield plane
