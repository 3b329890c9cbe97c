"""The reference server on 127.0.0.1 (port 0) over a real SQLite file: auth, bad input, routes."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from starlette.routing import Route

from supervisor import ConfigError, ControlPlaneUnavailable, TransientError
from supervisor.controlplane import (
    ControlPlane,
    EmbeddedControlPlane,
    FileKey,
    HttpControlPlane,
    NotFound,
    PresenceReport,
    SQLiteStore,
    WorkItem,
    WorkState,
    open_control_plane_server,
    serve_control_plane,
)
from supervisor.controlplane._dashboard import DASHBOARD_PREFIX
from supervisor.controlplane._openapi import API_PREFIX
from supervisor.controlplane._server import create_app

KEY = "server-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = f"{API_PREFIX.replace('{environment_id}', 'default')}"


@pytest.fixture
async def url(store: SQLiteStore) -> AsyncIterator[str]:
    async with open_control_plane_server(store, key_provider=KEY) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as raw:
        yield raw


def dump(store_path: Path) -> list[str]:
    """Every row of every table, read through a separate connection: the ground truth."""
    with sqlite3.connect(store_path) as conn:
        return list(conn.iterdump())


def assert_error(response: httpx.Response, status: int, kind: str, message: str = "") -> None:
    """The JSON error shape, exactly: {"error": {"type", "message"}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert message in body["error"]["message"]


async def seed(client: httpx.AsyncClient) -> dict[str, Any]:
    """One queued item, one claimed-and-acked item, and one registered worker."""
    queued = (await client.post(f"{ENV}/work", json={"data": {"prompt": "waiting"}})).json()
    taken = (await client.post(f"{ENV}/work", json={"data": {"prompt": "taken"}})).json()
    polled = await client.get(f"{ENV}/work/poll", params={"worker_id": "w1"})
    assert polled.json()["id"] == queued["id"]
    polled = await client.get(f"{ENV}/work/poll", params={"worker_id": "w1"})
    assert polled.json()["id"] == taken["id"]
    acked = await client.post(f"{ENV}/work/{taken['id']}/ack", json={"worker_id": "w1"})
    assert acked.status_code == 200
    registered = await client.post(f"{ENV}/workers/w1/register", json={"metadata": {"v": 1}})
    assert registered.status_code == 200
    return {"queued": queued["id"], "taken": taken["id"]}


# --- auth ------------------------------------------------------------------------------


async def test_healthz_needs_no_key(url: str) -> None:
    """/healthz answers without a key (for load balancers and probes)."""
    async with httpx.AsyncClient() as raw:
        response = await raw.get(f"{url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing 'Authorization"),
        ({"Authorization": "Bearer not-the-key"}, "invalid environment key"),
        ({"Authorization": f"Basic {KEY}"}, "must be 'Bearer"),
        ({"Authorization": "Bearer"}, "must be 'Bearer"),
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
async def test_requests_without_the_right_key_are_401(
    url: str, store_path: Path, headers: dict[str, str], message: str
) -> None:
    """Missing, wrong or malformed credentials: 401 in the JSON error form, nothing stored."""
    before = dump(store_path)
    async with httpx.AsyncClient(base_url=url, headers=headers) as raw:
        for response in (
            await raw.post(f"{ENV}/work", json={"data": {"prompt": "x"}}),
            await raw.get(f"{ENV}/work/poll", params={"worker_id": "w"}),
            await raw.get("/openapi.json"),
        ):
            assert_error(response, 401, "unauthorized", message)
            assert response.headers["www-authenticate"] == "Bearer"
    assert dump(store_path) == before


async def test_the_key_check_is_a_constant_time_comparison_of_bytes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is checked by ``hmac.compare_digest`` on bytes, and its answer decides.

    A plain ``==`` passes every other auth test (it gives the same answers);
    only the timing differs. Here a spy records each comparison: the presented
    and the configured key must both go through it, as bytes, and when the spy
    answers "different" even the right key is refused.
    """
    import hmac as hmac_module

    real = hmac_module.compare_digest
    seen: list[tuple[object, object]] = []
    verdict: list[bool | None] = [None]

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b) if verdict[0] is None else verdict[0]

    monkeypatch.setattr(hmac_module, "compare_digest", spy)
    async with httpx.AsyncClient(base_url=url) as raw:
        right = await raw.get(f"{ENV}/work", headers=AUTH)
        wrong = await raw.get(f"{ENV}/work", headers={"Authorization": "Bearer not-the-key-0000"})
        verdict[0] = False
        refused = await raw.get(f"{ENV}/work", headers=AUTH)
    assert right.status_code == 200
    assert wrong.status_code == 401
    assert refused.status_code == 401, "the comparison's answer decides, not another check"
    pairs = {(a, b) for a, b in seen if isinstance(a, bytes) and isinstance(b, bytes)}
    assert (KEY.encode(), KEY.encode()) in pairs
    assert (b"not-the-key-0000", KEY.encode()) in pairs


@pytest.mark.parametrize("configured", ["", "   \n"], ids=["empty", "whitespace-file"])
async def test_server_refuses_to_start_without_a_key(
    store: SQLiteStore, tmp_path: Path, configured: str
) -> None:
    """An empty key (given directly or read from a key file) stops the server from starting."""
    key_file = tmp_path / "key"
    key_file.write_text(configured)
    for provider in (configured.strip(), FileKey(key_file)):
        with pytest.raises(ConfigError, match="no environment key configured"):
            async with open_control_plane_server(store, key_provider=provider):
                pytest.fail("the server started without a key")  # pragma: no cover
        with pytest.raises(ConfigError, match="no environment key configured"):
            create_app(store, key_provider=provider)


async def test_unreadable_key_file_refuses_to_start(store: SQLiteStore, tmp_path: Path) -> None:
    """A key file that cannot be read is a ConfigError naming the file, not a crash."""
    with pytest.raises(ConfigError, match="cannot read the environment key file"):
        async with open_control_plane_server(store, key_provider=FileKey(tmp_path / "absent")):
            pytest.fail("the server started without a readable key")  # pragma: no cover


async def test_key_emptied_at_runtime_refuses_every_request(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """If the key file is emptied while serving, the server refuses requests instead of
    accepting any key."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    async with (
        open_control_plane_server(store, key_provider=FileKey(key_file)) as base,
        httpx.AsyncClient(base_url=base, headers=AUTH) as raw,
    ):
        assert (await raw.get(f"{ENV}/work/stats")).status_code == 200
        key_file.write_text("")
        for presented in ({"Authorization": "Bearer x"}, AUTH):
            response = await raw.get(f"{ENV}/work/stats", headers=presented)
            assert_error(response, 401, "unauthorized")


async def test_server_watching_its_key_file_drops_the_old_key_at_once(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """With a watched key file, a rotation on disk takes effect on the very next request:
    the new key works and the old one is refused."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    async with (
        open_control_plane_server(store, key_provider=FileKey(key_file, watch=True)) as base,
        httpx.AsyncClient(base_url=base) as raw,
    ):
        assert (await raw.get(f"{ENV}/work/stats", headers=AUTH)).status_code == 200
        key_file.write_text("the-next-key\n")
        old = await raw.get(f"{ENV}/work/stats", headers=AUTH)
        assert_error(old, 401, "unauthorized", "invalid environment key")
        new = await raw.get(f"{ENV}/work/stats", headers={"Authorization": "Bearer the-next-key"})
        assert new.status_code == 200


async def test_the_key_is_never_logged(
    url: str, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the configured key nor a presented wrong key appears in any log record."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-that-must-not-leak"
    await seed(client)
    await client.get(f"{ENV}/work", headers={"Authorization": f"Bearer {wrong}"})
    await client.get(f"{ENV}/nowhere")
    text = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert KEY not in text
    assert wrong not in text


# --- bad input changes nothing ------------------------------------------------------------

OVERSIZED = b'{"data": {"prompt": "' + b"x" * (1 << 20) + b'"}}'


async def _chunks() -> AsyncIterator[bytes]:
    for _ in range(20):
        yield b"x" * (64 * 1024)


BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str, str]] = [
    # (id, method, path, httpx kwargs, status, type, message fragment)
    ("malformed-json", "POST", "/work", {"content": b"{nope"}, 400, "invalid_request", "JSON"),
    ("not-utf8", "POST", "/work", {"content": b"\xff\xfe"}, 400, "invalid_request", "UTF-8"),
    ("nan", "POST", "/work", {"content": b'{"data": NaN}'}, 400, "invalid_request", "NaN"),
    ("array-body", "POST", "/work", {"json": []}, 400, "invalid_request", "JSON object"),
    ("empty-body", "POST", "/work", {}, 400, "invalid_request", "body is required"),
    (
        "prompt-not-string",
        "POST",
        "/work",
        {"json": {"data": {"prompt": 5}}},
        400,
        "invalid_request",
        "data.prompt must be a string",
    ),
    (
        "metadata-not-strings",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "metadata": {"k": 1}}},
        400,
        "invalid_request",
        "metadata.k",
    ),
    (
        "unknown-field",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "urgency": 1}},
        400,
        "invalid_request",
        "unknown field(s): urgency",
    ),
    (
        "priority-not-int",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "priority": "high"}},
        400,
        "invalid_request",
        "priority",
    ),
    (
        "priority-out-of-range",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "priority": 10**9}},
        400,
        "invalid_request",
        "priority",
    ),
    (
        "delay-negative",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "delay_seconds": -5}},
        400,
        "invalid_request",
        "delay_seconds",
    ),
    (
        "labels-not-a-list",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "labels": "gpu"}},
        400,
        "invalid_request",
        "labels must be an array of strings",
    ),
    (
        "labels-not-strings",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "labels": ["gpu", 3]}},
        400,
        "invalid_request",
        "labels[1]",
    ),
    (
        "label-bad-characters",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "labels": ["gpu", "a b"]}},
        400,
        "invalid_request",
        "bad label 'a b'",
    ),
    (
        "label-empty",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "labels": [""]}},
        400,
        "invalid_request",
        "bad label ''",
    ),
    (
        "labels-too-many",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "labels": [f"l{n}" for n in range(33)]}},
        400,
        "invalid_request",
        "at most 32 labels",
    ),
    (
        "timeout-zero",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "timeout_seconds": 0}},
        400,
        "invalid_request",
        "timeout",
    ),
    (
        "timeout-over-a-week",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "timeout_seconds": 604801}},
        400,
        "invalid_request",
        "timeout",
    ),
    (
        "timeout-not-a-number",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "timeout_seconds": "60"}},
        400,
        "invalid_request",
        "timeout_seconds",
    ),
    (
        "poll-label-bad-characters",
        "GET",
        "/work/poll?worker_id=w9&labels=gpu&labels=a%20b",
        {},
        400,
        "invalid_request",
        "bad label 'a b'",
    ),
    (
        "poll-label-empty",
        "GET",
        "/work/poll?worker_id=w9&labels=",
        {},
        400,
        "invalid_request",
        "bad label ''",
    ),
    (
        "not-before-not-a-time",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "not_before": "soon"}},
        400,
        "invalid_request",
        "not_before",
    ),
    (
        "retry-zero-attempts",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "retry": {"max_attempts": 0}}},
        400,
        "invalid_request",
        "retry.max_attempts",
    ),
    (
        "retry-unknown-field",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "retry": {"tries": 2}}},
        400,
        "invalid_request",
        "retry.tries",
    ),
    (
        "retry-codes-not-ints",
        "POST",
        "/work",
        {"json": {"data": {"prompt": "p"}, "retry": {"non_retryable_exit_codes": ["1"]}}},
        400,
        "invalid_request",
        "retry.non_retryable_exit_codes",
    ),
    (
        "dead-not-bool",
        "GET",
        "/work?dead=yes",
        {},
        400,
        "invalid_request",
        "dead",
    ),
    (
        "stop-force-not-bool",
        "POST",
        "/work/{taken}/stop",
        {"json": {"force": "yes"}},
        400,
        "invalid_request",
        "force",
    ),
    (
        "stop-bad-outcome",
        "POST",
        "/work/{taken}/stop",
        {"json": {"outcome": {"status": "splendid"}}},
        400,
        "invalid_request",
        "outcome.status",
    ),
    (
        "ack-empty-worker",
        "POST",
        "/work/{queued}/ack",
        {"json": {"worker_id": ""}},
        400,
        "invalid_request",
        "worker_id",
    ),
    (
        "heartbeat-no-token",
        "POST",
        "/work/{taken}/heartbeat",
        {},
        400,
        "invalid_request",
        "expected_last_heartbeat",
    ),
    (
        "heartbeat-bad-ttl",
        "POST",
        "/work/{taken}/heartbeat",
        {"params": {"expected_last_heartbeat": "NO_HEARTBEAT", "desired_ttl_seconds": "-1"}},
        400,
        "invalid_request",
        "desired_ttl_seconds",
    ),
    (
        "poll-block-not-int",
        "GET",
        "/work/poll",
        {"params": {"worker_id": "w2", "block_ms": "soon"}},
        400,
        "invalid_request",
        "block_ms",
    ),
    (
        "poll-block-too-long",
        "GET",
        "/work/poll",
        {"params": {"worker_id": "w2", "block_ms": "9999999"}},
        400,
        "invalid_request",
        "block_ms",
    ),
    (
        "poll-empty-worker",
        "GET",
        "/work/poll",
        {"params": {"worker_id": ""}},
        400,
        "invalid_request",
        "empty worker id",
    ),
    (
        "poll-worker-ids-disagree",
        "GET",
        "/work/poll",
        {"params": {"worker_id": "w2"}, "headers": {"Anthropic-Worker-ID": "w3"}},
        400,
        "invalid_request",
        "disagree",
    ),
    (
        "unknown-query-parameter",
        "GET",
        "/work",
        {"params": {"limit": "5", "colour": "red"}},
        400,
        "invalid_request",
        "colour",
    ),
    (
        "repeated-query-parameter",
        "GET",
        "/work",
        {"params": [("limit", "5"), ("limit", "6")]},
        400,
        "invalid_request",
        "more than once",
    ),
    ("bad-state", "GET", "/work", {"params": {"state": "asleep"}}, 400, "invalid_request", "state"),
    ("limit-zero", "GET", "/work", {"params": {"limit": "0"}}, 400, "invalid_request", "limit"),
    (
        "presence-wrong-type",
        "POST",
        "/workers/w1/heartbeat",
        {"json": {"error_rate": "high"}},
        400,
        "invalid_request",
        "error_rate",
    ),
    (
        "presence-other-worker",
        "POST",
        "/workers/w1/heartbeat",
        {"json": {"worker_id": "w9"}},
        400,
        "invalid_request",
        "does not match",
    ),
    (
        "delegation-bad-status",
        "POST",
        "/delegations/d1/result",
        {"json": {"status": "done"}},
        400,
        "invalid_request",
        "status",
    ),
    (
        "unknown-work-id",
        "POST",
        "/work/work_nope/ack",
        {"json": {"worker_id": "w1"}},
        404,
        "not_found",
        "work_nope",
    ),
    (
        "unknown-work-heartbeat",
        "POST",
        "/work/work_nope/heartbeat",
        {"params": {"expected_last_heartbeat": "NO_HEARTBEAT"}},
        404,
        "not_found",
        "work_nope",
    ),
    ("unknown-work-get", "GET", "/work/work_nope", {}, 404, "not_found", "work_nope"),
    ("unknown-worker", "GET", "/workers/w404", {}, 404, "not_found", "w404"),
    ("unknown-worker-delete", "DELETE", "/workers/w404", {}, 404, "not_found", "w404"),
    (
        "unknown-delegation",
        "POST",
        "/delegations/d404/result",
        {"json": {"status": "completed"}},
        404,
        "not_found",
        "d404",
    ),
    (
        "unknown-session-delegate",
        "POST",
        "/sessions/s404/delegate",
        {"json": {"task": "t"}},
        404,
        "not_found",
        "s404",
    ),
    ("oversized", "POST", "/work", {"content": OVERSIZED}, 413, "invalid_request", "limit"),
    ("oversized-chunked", "POST", "/work", {"content": _chunks}, 413, "invalid_request", "limit"),
    ("unknown-route", "GET", "/teapot", {}, 404, "not_found", "no route"),
    ("wrong-method", "DELETE", "/work", {}, 405, "method_not_allowed", "not allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "kind", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_requests_get_a_json_4xx_and_change_nothing(
    client: httpx.AsyncClient,
    store_path: Path,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    kind: str,
    message: str,
) -> None:
    """Each class of bad request answers the right 4xx with a clear message; the store is
    byte-for-byte what it was."""
    ids = await seed(client)
    before = dump(store_path)
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}
    response = await client.request(method, ENV + path.format(**ids), **kwargs)
    assert_error(response, status, kind, message)
    assert dump(store_path) == before


@pytest.mark.parametrize(
    "path",
    ["/nowhere", "/v1/environments", "/v1/environments/default", "/v1/environments/default/x"],
)
async def test_unknown_routes_are_json_404s(client: httpx.AsyncClient, path: str) -> None:
    """Paths that match no route answer 404 in the JSON error form, not an HTML page."""
    assert_error(await client.get(path), 404, "not_found", "no route")


@pytest.mark.parametrize("environment", ["-leading-dash", "a" * 201, "sp ace"])
async def test_invalid_environment_ids_are_404_and_change_nothing(
    client: httpx.AsyncClient, store_path: Path, environment: str
) -> None:
    """An environment id that could never exist is a 404 naming it; nothing is created."""
    before = dump(store_path)
    response = await client.post(
        f"/v1/environments/{environment}/work", json={"data": {"prompt": "p"}}
    )
    assert_error(response, 404, "not_found", "unknown environment")
    assert dump(store_path) == before


async def test_reads_in_a_never_used_environment_create_nothing(
    client: httpx.AsyncClient, store_path: Path
) -> None:
    """A new environment reads as empty (and its unknown ids as 404) without being created:
    environments come into being on first write, not on a look."""
    before = dump(store_path)
    base = "/v1/environments/never-used"
    stats = await client.get(f"{base}/work/stats")
    assert stats.status_code == 200
    assert stats.json()["depth"] == 0
    assert (await client.get(f"{base}/work")).json() == {"data": []}
    assert_error(await client.get(f"{base}/work/work_x"), 404, "not_found")
    assert_error(await client.get(f"{base}/workers/w_x"), 404, "not_found")
    assert dump(store_path) == before


async def test_single_plane_server_knows_only_its_environment(
    store_path: Path, store: SQLiteStore
) -> None:
    """Serving one ControlPlane, any other environment id is a 404 naming the served one."""
    async with (
        EmbeddedControlPlane(store, environment_id="prod") as plane,
        open_control_plane_server(plane, key_provider=KEY) as base,
        HttpControlPlane.open(base, key=KEY, environment_id="prod") as prod,
        HttpControlPlane.open(base, key=KEY, environment_id="default") as other,
    ):
        item = await prod.submit("p")
        assert (await prod.get(item.id)).id == item.id
        with pytest.raises(NotFound, match="this server serves 'prod'"):
            await other.stats()


async def test_environments_are_isolated(url: str) -> None:
    """Items submitted in one environment are invisible from another (created on first use)."""
    async with (
        HttpControlPlane.open(url, key=KEY, environment_id="alpha") as alpha,
        HttpControlPlane.open(url, key=KEY, environment_id="beta") as beta,
    ):
        item = await alpha.submit("only alpha")
        assert await beta.poll(worker_id="w") is None
        with pytest.raises(NotFound):
            await beta.get(item.id)
        claimed = await alpha.poll(worker_id="w")
        assert claimed is not None
        assert claimed.id == item.id
        assert claimed.environment_id == "alpha"


# --- the store's own failures -----------------------------------------------------------------


class _Failing(EmbeddedControlPlane):
    """A real embedded plane whose stats call fails the way the test says."""

    failure: Exception = RuntimeError("disk on fire")

    async def stats(self) -> Any:
        await trio.lowlevel.checkpoint()
        raise self.failure


@pytest.mark.parametrize(
    ("failure", "status", "kind"),
    [
        (RuntimeError("secret internals"), 500, "internal"),
        (TransientError("database is locked"), 503, "transient"),
    ],
)
async def test_plane_failures_become_json_5xx(
    store: SQLiteStore,
    failure: Exception,
    status: int,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception is a 500 that hides its details (logged instead); a
    TransientError is a 503, which the client treats as worth retrying."""

    def factory(environment_id: str) -> ControlPlane:
        plane = _Failing(store, environment_id=environment_id)
        plane.failure = failure
        return plane

    async with (
        open_control_plane_server(factory, key_provider=KEY) as base,
        httpx.AsyncClient(base_url=base, headers=AUTH) as raw,
    ):
        response = await raw.get(f"{ENV}/work/stats")
        assert (await raw.get(f"{ENV}/work")).status_code == 200  # other routes unaffected
    assert_error(response, status, kind)
    if status == 500:
        assert "secret internals" not in response.text
        assert "secret internals" in caplog.text


# --- OpenAPI -------------------------------------------------------------------------------------


def _mounted_routes(store: SQLiteStore) -> set[tuple[str, str]]:
    """The API's routes; the dashboard's HTML pages and fragments are not part of the API."""
    app = create_app(store, key_provider=KEY)
    mounted = set()
    for route in app.routes:
        assert isinstance(route, Route)
        if route.path == "/" or route.path.startswith(DASHBOARD_PREFIX + "/"):
            continue
        for method in route.methods or ():
            if method != "HEAD":
                mounted.add((method.lower(), route.path))
    return mounted


async def test_openapi_describes_exactly_the_mounted_routes(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    """/openapi.json (served, with auth) lists every route the app mounts, and no other."""
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "delete", "patch"}
    }
    mounted = _mounted_routes(store)
    assert mounted == documented
    # Every reference resolves to a schema the document defines.
    schemas = document["components"]["schemas"]
    text = response.text
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas


def test_the_brief_routes_are_all_mounted(store: SQLiteStore) -> None:
    """The routes of DESIGN.md section 4 (plus register and deregister) are all there."""
    expected = {
        ("post", "/work"),
        ("get", "/work/poll"),
        ("post", "/work/{work_id}/ack"),
        ("post", "/work/{work_id}/heartbeat"),
        ("post", "/work/{work_id}/stop"),
        ("post", "/work/{work_id}/request-stop"),
        ("get", "/work/{work_id}"),
        ("get", "/work"),
        ("get", "/work/stats"),
        ("post", "/workers/{worker_id}/register"),
        ("post", "/workers/{worker_id}/heartbeat"),
        ("get", "/workers"),
        ("get", "/workers/{worker_id}"),
        ("delete", "/workers/{worker_id}"),
        ("post", "/sessions/{session_id}/delegate"),
        ("get", "/workers/{worker_id}/delegations"),
        ("post", "/delegations/{delegation_id}/result"),
        ("post", "/sessions/{session_id}/messages"),
        ("post", "/sessions/{session_id}/notify"),
        ("get", "/sessions/{session_id}/messages"),
    }
    mounted = _mounted_routes(store)
    assert {(method, API_PREFIX + path) for method, path in expected} <= mounted
    assert {("get", "/healthz"), ("get", "/openapi.json")} <= mounted


# --- concurrency, lifecycle ----------------------------------------------------------------


async def test_four_claimers_through_the_server_get_each_item_exactly_once(
    url: str, store: SQLiteStore
) -> None:
    """500 items, 4 concurrent pollers over HTTP: every item is handed out once, none twice."""
    submitted = {
        store.submit("default", f"item {n}", now=1_700_000_000.0 + n).id for n in range(500)
    }
    claims: dict[str, list[str]] = {}

    async def claimer(name: str, cp: HttpControlPlane) -> None:
        while (item := await cp.poll(worker_id=name)) is not None:
            claims.setdefault(item.id, []).append(name)
            await cp.ack(item.id, worker_id=name)

    async with HttpControlPlane.open(url, key=KEY) as cp, trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(claimer, f"w{n}", cp)
    assert set(claims) == submitted
    assert all(len(takers) == 1 for takers in claims.values())
    assert len({takers[0] for takers in claims.values()}) > 1  # they really ran concurrently
    states = {item.state for item in store.list_work("default", now=1_700_000_600.0, limit=1000)}
    assert states == {WorkState.STARTING}


async def test_server_stops_promptly_when_cancelled_mid_long_poll(store: SQLiteStore) -> None:
    """Cancelling the server's nursery ends it at once, even with a 60 s long poll in flight;
    the waiting client gets a transient error, not a hang."""
    outcome: list[object] = []

    async def long_poll(base: str) -> None:
        async with HttpControlPlane.open(base, key=KEY) as cp:
            try:
                outcome.append(await cp.poll(worker_id="w", block_ms=60_000))
            except ControlPlaneUnavailable as exc:
                outcome.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as server_nursery:
                base = await server_nursery.start(
                    partial(serve_control_plane, store, key_provider=KEY)
                )
                outer.start_soon(long_poll, base)
                await trio.sleep(0.2)  # let the poll reach the server
                started = trio.current_time()
                server_nursery.cancel_scope.cancel()
            assert trio.current_time() - started < 2.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], ControlPlaneUnavailable)


async def test_port_in_use_is_a_config_error(store: SQLiteStore, url: str) -> None:
    """Binding a port another server holds fails with a ConfigError saying so."""
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        async with open_control_plane_server(store, key_provider=KEY, port=port):
            pytest.fail("bound a port already in use")  # pragma: no cover


async def test_poll_answers_204_when_empty_and_200_with_the_secret(
    client: httpx.AsyncClient,
) -> None:
    """An empty queue is 204 with no body; a claim is 200 carrying the session secret once."""
    empty = await client.get(f"{ENV}/work/poll", params={"worker_id": "w", "block_ms": "0"})
    assert empty.status_code == 204
    assert empty.content == b""
    await client.post(f"{ENV}/work", json={"data": {"prompt": "p"}})
    claimed = await client.get(f"{ENV}/work/poll", params={"worker_id": "w"})
    assert claimed.status_code == 200
    assert claimed.json()["secret"]
    fetched = await client.get(f"{ENV}/work/{claimed.json()['id']}")
    assert "secret" not in fetched.json()


async def test_http_and_embedded_views_agree(url: str, store: SQLiteStore) -> None:
    """An item read over HTTP equals the same item read from the store (times exact)."""
    async with HttpControlPlane.open(url, key=KEY) as cp:
        item = await cp.submit("compare me", metadata={"k": "v"})
        await cp.register_worker("w1")
        record = await cp.worker_heartbeat(PresenceReport("w1", active_tasks=1))
        direct: WorkItem = store.get("default", item.id, now=record.last_heartbeat_at or 0.0)
        assert direct == item
        assert store.get_worker("default", "w1", now=record.last_heartbeat_at or 0.0) == record


# --- who polls and who acks (DESIGN §4: worker_id, the header, or neither) --------------


async def _submit(client: httpx.AsyncClient) -> str:
    response = await client.post(f"{ENV}/work", json={"data": {"prompt": "p"}})
    assert response.status_code == 201
    item_id: str = response.json()["id"]
    return item_id


async def test_a_poll_named_by_the_header_binds_an_ack_with_no_body(
    client: httpx.AsyncClient,
) -> None:
    """``Anthropic-Worker-ID`` names the poller; the ack then needs no body at all."""
    item_id = await _submit(client)
    polled = await client.get(f"{ENV}/work/poll", headers={"Anthropic-Worker-ID": "w-head"})
    assert (polled.status_code, polled.json()["id"]) == (200, item_id)
    acked = await client.post(f"{ENV}/work/{item_id}/ack")
    assert acked.status_code == 200, acked.text
    assert (acked.json()["state"], acked.json()["worker_id"]) == ("starting", "w-head")
    stats = (await client.get(f"{ENV}/work/stats")).json()
    assert stats["workers_polling"] == 1


async def test_a_query_poll_and_an_empty_ack_body_bind_the_poller(
    client: httpx.AsyncClient,
) -> None:
    """``worker_id=`` in the query and an ack with an empty body (or ``{}``) bind the poller."""
    first, second = await _submit(client), await _submit(client)
    for item_id, body in ((first, b""), (second, b"{}")):
        polled = await client.get(f"{ENV}/work/poll", params={"worker_id": "w-q"})
        assert polled.json()["id"] == item_id
        acked = await client.post(
            f"{ENV}/work/{item_id}/ack",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert acked.status_code == 200, acked.text
        assert acked.json()["worker_id"] == "w-q"


async def test_an_anonymous_poll_is_bound_to_the_worker_the_ack_names(
    client: httpx.AsyncClient,
) -> None:
    """A poll that names nobody is bound at ack, to the worker the ack names."""
    item_id = await _submit(client)
    polled = await client.get(f"{ENV}/work/poll")
    assert (polled.status_code, polled.json()["id"]) == (200, item_id)
    assert polled.json()["secret"]
    acked = await client.post(f"{ENV}/work/{item_id}/ack", json={"worker_id": "w-late"})
    assert (acked.json()["state"], acked.json()["worker_id"]) == ("starting", "w-late")
    stats = (await client.get(f"{ENV}/work/stats")).json()
    assert stats["workers_polling"] == 0  # an anonymous poller is no worker


async def test_an_anonymous_poll_and_ack_leave_the_item_unbound_but_leased(
    client: httpx.AsyncClient,
) -> None:
    """Neither naming a worker: the item starts with no worker, and its lease works."""
    item_id = await _submit(client)
    assert (await client.get(f"{ENV}/work/poll")).status_code == 200
    acked = await client.post(f"{ENV}/work/{item_id}/ack")
    assert acked.status_code == 200, acked.text
    assert (acked.json()["state"], acked.json()["worker_id"]) == ("starting", None)
    beat = await client.post(
        f"{ENV}/work/{item_id}/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"}
    )
    assert (beat.status_code, beat.json()["state"]) == (200, "active")


async def test_an_ack_naming_another_worker_than_the_poll_is_refused(
    client: httpx.AsyncClient, store_path: Path
) -> None:
    """The worker the poll named holds the item: an ack in another's name is a 409, and
    an ack of an item never handed out is one too; neither changes anything."""
    item_id = await _submit(client)
    never_polled = await client.post(f"{ENV}/work/{item_id}/ack")
    assert_error(never_polled, 409, "conflict", "poll for it first")
    await client.get(f"{ENV}/work/poll", headers={"Anthropic-Worker-ID": "w-a"})
    before = dump(store_path)
    other = await client.post(f"{ENV}/work/{item_id}/ack", json={"worker_id": "w-b"})
    assert_error(other, 409, "conflict", "another worker")
    assert dump(store_path) == before
    same = await client.post(f"{ENV}/work/{item_id}/ack", json={"worker_id": "w-a"})
    assert same.json()["worker_id"] == "w-a"


async def test_the_http_client_polls_and_acks_anonymously(url: str) -> None:
    """``HttpControlPlane.poll()`` without a worker sends none; ``ack()`` then sends no body."""
    async with HttpControlPlane.open(url, key=KEY) as cp:
        item = await cp.submit("anonymous")
        polled = await cp.poll()
        assert polled is not None and polled.id == item.id
        acked = await cp.ack(item.id)
        assert (acked.state, acked.worker_id) == (WorkState.STARTING, None)
        second = await cp.submit("named at ack")
        assert (await cp.poll()) is not None
        assert (await cp.ack(second.id, worker_id="w-c")).worker_id == "w-c"


async def test_a_submit_with_a_used_key_answers_200_with_the_first_item_not_201(
    client: httpx.AsyncClient,
) -> None:
    body = {"data": {"prompt": "p"}, "key": "deploy-42"}
    created = await client.post(ENV + "/work", json=body)
    assert created.status_code == 201
    again = await client.post(ENV + "/work", json={**body, "data": {"prompt": "other"}})
    assert again.status_code == 200
    assert again.json()["id"] == created.json()["id"]
    assert again.json()["key"] == "deploy-42"
    listed = await client.get(ENV + "/work")
    assert [item["id"] for item in listed.json()["data"]] == [created.json()["id"]]


async def test_openapi_describes_the_queue_full_answer_of_submit(
    client: httpx.AsyncClient,
) -> None:
    """A submit past max_queue_depth: 429, its Retry-After header and the error's figures."""
    document = (await client.get("/openapi.json")).json()
    submit = next(
        operations["post"]
        for path, operations in document["paths"].items()
        if path.endswith("/work") and "post" in operations
    )
    full = submit["responses"]["429"]
    assert full["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
    assert full["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert {"environment_id", "depth", "max_queue_depth", "retry_after"} <= set(error["properties"])
    assert "queue_full" in error["properties"]["type"]["description"]


async def test_labels_and_timeout_on_the_wire_and_a_repeated_labels_query_parameter(
    client: httpx.AsyncClient,
) -> None:
    body = {"data": {"prompt": "p"}, "labels": ["repo:foo", "gpu", "gpu"], "timeout_seconds": 45}
    created = await client.post(ENV + "/work", json=body)
    assert created.status_code == 201
    assert (created.json()["labels"], created.json()["timeout_seconds"]) == (
        ["gpu", "repo:foo"],
        45.0,
    )
    plain = await client.get(ENV + "/work/poll", params={"worker_id": "plain"})
    assert plain.status_code == 204
    partial = await client.get(ENV + "/work/poll?worker_id=half&labels=gpu")
    assert partial.status_code == 204
    claimed = await client.get(ENV + "/work/poll?worker_id=both&labels=gpu&labels=repo:foo")
    assert claimed.status_code == 200
    assert claimed.json()["id"] == created.json()["id"]
    assert claimed.json()["timeout_seconds"] == 45.0
    # Other parameters stay single: a repeated worker_id is still refused.
    twice = await client.get(ENV + "/work/poll?worker_id=a&worker_id=b")
    assert_error(twice, 400, "invalid_request", "worker_id")


async def test_the_openapi_document_describes_labels_and_timeout(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    submit = schemas["SubmitRequest"]["properties"]
    assert submit["labels"]["type"] == "array"
    assert submit["labels"]["maxItems"] == 32
    assert submit["labels"]["items"]["pattern"] == "^[A-Za-z0-9:._/-]{1,100}$"
    assert submit["timeout_seconds"]["maximum"] == 604800
    item = schemas["WorkItem"]["properties"]
    assert {"labels", "timeout_seconds"} <= set(item)
    poll = document["paths"][API_PREFIX + "/work/poll"]["get"]
    (labels,) = [p for p in poll["parameters"] if p["name"] == "labels"]
    assert (labels["in"], labels["explode"], labels["schema"]["type"]) == ("query", True, "array")
