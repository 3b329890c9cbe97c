"""HttpControlPlane against real servers on loopback: error translation, key rotation, lifecycle."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from supervisor import (
    ConfigError,
    ControlPlaneError,
    ControlPlaneUnavailable,
    FatalError,
    TransientError,
)
from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    Conflict,
    DelegationStatus,
    FencingConflict,
    FileKey,
    Gone,
    HttpControlPlane,
    NotFound,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    SQLiteStore,
    StaticKey,
    Unauthorized,
    WorkerStatus,
    WorkState,
    open_control_plane_server,
    open_http_control_plane,
)

KEY = "client-test-key-0123456789abcdef"


@pytest.fixture
async def url(store: SQLiteStore) -> AsyncIterator[str]:
    async with open_control_plane_server(store, key_provider=KEY) as base:
        yield base


class Scripted:
    """A tiny Starlette app that answers whatever the test scripts, and counts requests."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.delay = 0.0
        self.requests: list[str] = []

    async def answer(self, request: Request) -> Response:
        self.requests.append(f"{request.method} {request.scope['path']}")
        if self.delay:
            await trio.sleep(self.delay)
        return Response(self.body, status_code=self.status, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{path:path}", self.answer, methods=["GET", "POST", "DELETE"])]
        )


@asynccontextmanager
async def serve_app(app: Starlette) -> AsyncIterator[str]:
    """Any ASGI app on Hypercorn's Trio worker, on 127.0.0.1 with a free port."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = None
    config.accesslog = None
    asgi: Any = app
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, asgi, config))
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    script = Scripted()
    async with serve_app(script.app()) as base:
        yield script, base


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- translation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
        (408, TransientError),
        (429, TransientError),
        (400, BadRequest),
        (413, BadRequest),
        (415, BadRequest),
        (422, BadRequest),
        (401, Unauthorized),
        (403, Unauthorized),
        (404, NotFound),
        (409, Conflict),
        (410, Gone),
        (412, FencingConflict),
        (418, FatalError),
    ],
)
async def test_http_statuses_become_package_exceptions(
    scripted: tuple[Scripted, str], status: int, expected: type[ControlPlaneError]
) -> None:
    """Every status maps to one exception class (transient: 5xx/408/429; fatal: other 4xx),
    carrying the status and the server's own message."""
    script, base = scripted
    script.status = status
    script.body = b'{"error": {"type": "scripted", "message": "as scripted"}}'
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with pytest.raises(expected) as caught:
            await cp.stats()
    assert type(caught.value) is expected
    assert caught.value.status_code == status
    assert "as scripted" in str(caught.value)
    assert not isinstance(caught.value, ControlPlaneUnavailable)  # an answer did come
    assert isinstance(caught.value, TransientError) == (status >= 500 or status in (408, 429))


async def test_error_without_a_json_body_still_translates(scripted: tuple[Scripted, str]) -> None:
    """A proxy's HTML 503 page is still a TransientError (with the reason phrase)."""
    script, base = scripted
    script.status = 503
    script.body = b"<html>busy</html>"
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with pytest.raises(TransientError, match="HTTP 503"):
            await cp.stats()


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (200, b"<html>", "malformed answer"),
        (200, b'{"depth": "many"}', "depth must be an integer"),
        (204, b"", "204 where a body was expected"),
    ],
)
async def test_malformed_answers_are_fatal(
    scripted: tuple[Scripted, str], status: int, body: bytes, message: str
) -> None:
    """A 2xx the client cannot decode is a FatalError (an incompatible server), never a
    BadRequest blaming the caller."""
    script, base = scripted
    script.status, script.body = status, body
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with pytest.raises(FatalError, match=message) as caught:
            await cp.stats()
    assert not isinstance(caught.value, BadRequest)


async def test_no_server_is_control_plane_unavailable() -> None:
    """Nothing listening: ControlPlaneUnavailable (transient), with no httpx type escaping."""
    async with HttpControlPlane.open(f"http://127.0.0.1:{free_port()}", key=KEY) as cp:
        with pytest.raises(ControlPlaneUnavailable, match="cannot reach") as caught:
            await cp.poll(worker_id="w")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_slow_answer_times_out_as_unavailable(
    scripted: tuple[Scripted, str], autojump_clock: trio.testing.MockClock
) -> None:
    """An answer slower than the per-call timeout is ControlPlaneUnavailable."""
    script, base = scripted
    script.delay = 30.0
    async with HttpControlPlane.open(base, key=KEY, timeout=2.0) as cp:
        started = trio.current_time()
        with pytest.raises(ControlPlaneUnavailable, match="within 2s"):
            await cp.stats()
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.5)


async def test_long_poll_gets_block_ms_on_top_of_the_timeout(
    scripted: tuple[Scripted, str], autojump_clock: trio.testing.MockClock
) -> None:
    """A poll may take block_ms longer than other calls before it counts as a timeout."""
    script, base = scripted
    script.delay = 20.0
    script.status, script.body = 204, b""
    async with HttpControlPlane.open(base, key=KEY, timeout=2.0) as cp:
        assert await cp.poll(worker_id="w", block_ms=30_000) is None
        with pytest.raises(ControlPlaneUnavailable):
            await cp.poll(worker_id="w", block_ms=5_000)


async def test_cancelled_call_propagates_and_the_client_stays_usable(
    scripted: tuple[Scripted, str], autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a call in flight is never swallowed or turned into an error; the next call
    works."""
    script, base = scripted
    script.delay = 3600.0
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with trio.move_on_after(1.0) as scope:
            await cp.poll(worker_id="w", block_ms=60_000)
            pytest.fail("the poll was not cancelled")  # pragma: no cover
        assert scope.cancelled_caught
        script.delay = 0.0
        script.body = b'{"depth": 0, "pending": 0, "oldest_queued_at": null, "workers_polling": 0}'
        assert (await cp.stats()).depth == 0


# --- keys -----------------------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request: httpx.Request) -> None:
        self.count += 1


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    server_file, client_file = tmp_path / "server.key", tmp_path / "client.key"
    server_file.write_text(KEY + "\n")
    client_file.write_text(KEY + "\n")
    return server_file, client_file


@asynccontextmanager
async def rotating_setup(
    store: SQLiteStore, key_files: tuple[Path, Path]
) -> AsyncIterator[tuple[HttpControlPlane, Counter]]:
    server_file, client_file = key_files
    counter = Counter()
    async with (
        open_control_plane_server(store, key_provider=FileKey(server_file, watch=True)) as base,
        httpx.AsyncClient(event_hooks={"request": [counter]}) as raw,
        HttpControlPlane.open(base, key=FileKey(client_file), client=raw) as cp,
    ):
        await cp.stats()  # both sides have read their key files
        counter.count = 0
        yield cp, counter


async def test_rotated_key_is_reread_and_the_call_retried_once(
    store: SQLiteStore, key_files: tuple[Path, Path]
) -> None:
    """Server key rotated and the client's key file updated: the 401 triggers one re-read and
    exactly one retry, which succeeds."""
    server_file, client_file = key_files
    async with rotating_setup(store, key_files) as (cp, counter):
        server_file.write_text("rotated-key-42")
        client_file.write_text("rotated-key-42\n")
        stats = await cp.stats()
        assert stats.depth == 0
        assert counter.count == 2
        counter.count = 0
        await cp.stats()  # the new key sticks: no 401, no retry
        assert counter.count == 1


async def test_unchanged_key_file_means_no_retry(
    store: SQLiteStore, key_files: tuple[Path, Path]
) -> None:
    """Server key rotated but the client's file still holds the old key: Unauthorized after a
    single request (re-reading found nothing new, so there is nothing to retry)."""
    server_file, _ = key_files
    async with rotating_setup(store, key_files) as (cp, counter):
        server_file.write_text("rotated-key-42")
        with pytest.raises(Unauthorized, match="invalid environment key"):
            await cp.stats()
        assert counter.count == 1


async def test_retry_happens_at_most_once(store: SQLiteStore, key_files: tuple[Path, Path]) -> None:
    """A re-read key that is still wrong gets one retry, then Unauthorized: never a loop."""
    server_file, client_file = key_files
    async with rotating_setup(store, key_files) as (cp, counter):
        server_file.write_text("rotated-key-42")
        client_file.write_text("still-wrong-key")
        with pytest.raises(Unauthorized):
            await cp.stats()
        assert counter.count == 2


async def test_static_key_is_never_retried(url: str) -> None:
    """A plain string key cannot change, so a 401 is final at once."""
    counter = Counter()
    async with (
        httpx.AsyncClient(event_hooks={"request": [counter]}) as raw,
        HttpControlPlane.open(url, key="wrong-static-key", client=raw) as cp,
    ):
        with pytest.raises(Unauthorized):
            await cp.stats()
    assert counter.count == 1


async def test_the_key_appears_in_no_message_or_repr(url: str, tmp_path: Path) -> None:
    """Errors, reprs of the client and of key providers never show a key."""
    wrong = "wrong-key-never-shown"
    key_file = tmp_path / "k"
    key_file.write_text(wrong)
    async with HttpControlPlane.open(url, key=FileKey(key_file)) as cp:
        with pytest.raises(Unauthorized) as caught:
            await cp.stats()
        shown = [str(caught.value), repr(caught.value), repr(cp), repr(FileKey(key_file))]
        shown.append(repr(StaticKey(wrong)))
    for text in shown:
        assert wrong not in text
        assert KEY not in text


@pytest.mark.parametrize("bad", ["two words", "new\nline", "tab\there", "naïve"])
async def test_unsendable_keys_are_refused_before_sending(
    scripted: tuple[Scripted, str], tmp_path: Path, bad: str
) -> None:
    """A key that cannot travel in a header is refused up front, without quoting it (HTTP
    libraries echo bad header values in their errors)."""
    script, base = scripted
    with pytest.raises(ConfigError) as at_construction:
        HttpControlPlane(base, key=bad)
    assert bad not in str(at_construction.value)
    key_file = tmp_path / "k"
    key_file.write_text(bad)
    async with HttpControlPlane.open(base, key=FileKey(key_file)) as cp:
        with pytest.raises(Unauthorized, match="printable ASCII") as at_call:
            await cp.stats()
    assert bad not in str(at_call.value)
    assert script.requests == []


async def test_unreadable_key_file_is_unauthorized(scripted: tuple[Scripted, str]) -> None:
    """A missing key file is an Unauthorized naming the file, raised before any request."""
    script, base = scripted
    async with HttpControlPlane.open(base, key=FileKey("/nonexistent/key")) as cp:
        with pytest.raises(Unauthorized, match="cannot read the environment key file"):
            await cp.stats()
    assert script.requests == []


# --- lifecycle and arguments --------------------------------------------------------------


async def test_injected_client_is_left_open(scripted: tuple[Scripted, str]) -> None:
    """aclose closes only a client it created; an injected one stays usable by its owner."""
    _, base = scripted
    async with httpx.AsyncClient() as raw:
        cp = HttpControlPlane(base, key=KEY, client=raw)
        await cp.aclose()
        await cp.aclose()  # idempotent
        assert not raw.is_closed
        assert (await raw.get(f"{base}/still-open")).status_code == 200


async def test_owned_client_is_closed_and_calls_after_close_raise(
    scripted: tuple[Scripted, str],
) -> None:
    """open_http_control_plane closes its client on exit; using it afterwards is an error."""
    script, base = scripted
    script.body = b'{"depth": 1, "pending": 0, "oldest_queued_at": null, "workers_polling": 0}'
    async with open_http_control_plane(base, key=KEY) as cp:
        assert (await cp.stats()).depth == 1
    with pytest.raises(RuntimeError, match="closed"):
        await cp.get("anything")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://example.org"}, "http"),
        ({"base_url": "not a url"}, "http"),
        ({"timeout": 0}, "timeout"),
        ({"key": ""}, "empty"),
        ({"environment_id": "a/b"}, "environment"),
    ],
)
def test_bad_construction_arguments_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    """Unusable URLs, timeouts, keys and environment ids fail at construction, clearly."""
    arguments: dict[str, Any] = {"base_url": "http://127.0.0.1:1", "key": KEY, **kwargs}
    with pytest.raises(ConfigError, match=message):
        HttpControlPlane(arguments.pop("base_url"), **arguments)


async def test_ids_that_no_route_can_address_are_refused_locally(
    scripted: tuple[Scripted, str],
) -> None:
    """An id with '/' (or an empty one) is a BadRequest before anything is sent."""
    script, base = scripted
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with pytest.raises(BadRequest, match="work_id must not contain '/'"):
            await cp.get("a/b")
        with pytest.raises(BadRequest, match="worker_id must not be empty"):
            await cp.get_worker("")
    assert script.requests == []


async def test_ids_are_percent_encoded(scripted: tuple[Scripted, str]) -> None:
    """Characters with a meaning in URLs ('?', '#', '%', ' ') reach the server intact."""
    script, base = scripted
    script.status = 404
    async with HttpControlPlane.open(base, key=KEY) as cp:
        with pytest.raises(NotFound):
            await cp.get("odd id?#%")
    assert script.requests == ["GET /v1/environments/default/work/odd id?#%"]


# --- every protocol call, end to end ------------------------------------------------------


async def test_every_protocol_method_works_over_http(url: str) -> None:
    """One pass through every ControlPlane method against the reference server."""
    async with HttpControlPlane.open(url, key=KEY) as cp:
        assert cp.environment_id == "default"
        item = await cp.submit("hello", session_id="sess-1", metadata={"team": "a"})
        assert item.state is WorkState.QUEUED
        assert item.data.id == "sess-1"
        claimed = await cp.poll(worker_id="w1", block_ms=0, reclaim_older_than_ms=1000)
        assert claimed is not None
        assert claimed.secret
        assert (await cp.ack(item.id, worker_id="w1")).state is WorkState.STARTING
        beat = await cp.heartbeat(
            item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=30.5
        )
        assert beat.state is WorkState.ACTIVE
        assert beat.ttl_seconds == 30.5
        with pytest.raises(FencingConflict):
            await cp.heartbeat(item.id, expected_last_heartbeat="stale-token")
        await cp.register_worker("w1", metadata={"capacity": 2})
        online = await cp.worker_heartbeat(PresenceReport("w1", active_tasks=1))
        assert online.status is WorkerStatus.ONLINE
        assert [w.worker_id for w in await cp.list_workers()] == ["w1"]
        assert (await cp.get_worker("w1")).active_tasks == 1
        delegation = await cp.delegate("sess-1", "look something up")
        assert delegation.status is DelegationStatus.PENDING
        assert [d.id for d in await cp.list_delegations("w1")] == [delegation.id]
        assert await cp.list_delegations("w1", status=DelegationStatus.COMPLETED) == []
        done = await cp.record_delegation_result(
            delegation.id, status=DelegationStatus.COMPLETED, response_preview="found it"
        )
        assert done.response_preview == "found it"
        message = await cp.post_message("sess-1", "how is it going?")
        note = await cp.notify("sess-1", "delegation done")
        assert [m.id for m in await cp.list_messages("sess-1")] == [message.id, note.id]
        assert (await cp.request_stop(item.id)).state is WorkState.STOPPING
        stopped = await cp.stop(
            item.id,
            force=True,
            expected_last_heartbeat=beat.last_heartbeat,
            outcome=Outcome(OutcomeStatus.COMPLETED, exit_code=0, result="ok", duration=1.5),
        )
        assert stopped.state is WorkState.STOPPED
        assert stopped.outcome == Outcome(
            OutcomeStatus.COMPLETED, exit_code=0, result="ok", duration=1.5
        )
        with pytest.raises(Conflict):
            await cp.stop(item.id, expected_last_heartbeat=beat.last_heartbeat)
        assert (await cp.get(item.id)).outcome == stopped.outcome
        assert [i.id for i in await cp.list_work(state=WorkState.STOPPED)] == [item.id]
        assert len(await cp.list_work(limit=1, page=1)) == 1
        stats = await cp.stats()
        assert stats.depth == 1  # the delegated item waits in the queue
        assert (await cp.deregister_worker("w1")).status is WorkerStatus.REMOVED
        with pytest.raises(Gone):
            await cp.worker_heartbeat(PresenceReport("w1"))
