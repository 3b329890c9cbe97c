"""Text boundaries (issue 15): no string that UTF-8 cannot encode reaches the store or the wire.

A lone surrogate (``"\\udfff"``) is valid in a Python string and in JSON text
(as an escape), but no UTF-8 answer can carry it. Accepted once, it made the
server answer 500 after committing, and every later read of the item or the
worker fail. Every JSON endpoint now refuses it with a 400 before any write,
the embedded plane and the HTTP client refuse it the same way, and an
answer can always be encoded.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.controlplane import (
    NO_HEARTBEAT,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    WorkState,
    _codec as codec,
)
from supervisor.controlplane._embedded import EmbeddedControlPlane
from supervisor.controlplane._exceptions import BadRequest
from supervisor.controlplane._http import HttpControlPlane
from supervisor.controlplane._openapi import API_PREFIX
from supervisor.controlplane._server import open_control_plane_server
from supervisor.controlplane._store import SQLiteStore
from supervisor.controlplane._text import check_text, scrub_text

KEY = "text-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = API_PREFIX.replace("{environment_id}", "default")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "controlplane.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(db_path)
    yield opened
    opened.close()


@pytest.fixture
async def client(store: SQLiteStore) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        open_control_plane_server(store, key_provider=KEY) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH) as raw,
    ):
        yield raw


def dump(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as conn:
        return list(conn.iterdump())


async def live_world(client: httpx.AsyncClient) -> dict[str, str]:
    """An active item with its token, a worker, a delegation: every write has a target."""
    submitted = await client.post(f"{ENV}/work", json={"data": {"prompt": "p"}})
    item = submitted.json()
    polled = await client.get(f"{ENV}/work/poll", params={"worker_id": "w1"})
    assert polled.status_code == 200
    assert (await client.post(f"{ENV}/work/{item['id']}/ack", json={"worker_id": "w1"})).is_success
    beat = await client.post(
        f"{ENV}/work/{item['id']}/heartbeat", params={"expected_last_heartbeat": NO_HEARTBEAT}
    )
    token = beat.json()["last_heartbeat"]
    assert (await client.post(f"{ENV}/workers/w1/register", json={})).is_success
    session = item["data"]["id"]
    delegated = await client.post(f"{ENV}/sessions/{session}/delegate", json={"task": "t"})
    assert delegated.status_code == 201, delegated.text
    return {
        "work": item["id"],
        "token": token,
        "session": session,
        "delegation": delegated.json()["id"],
    }


def raw(body: object) -> str:
    """``body`` as JSON text, each ``@`` turned into the escape of a lone surrogate."""
    return json.dumps(body).replace("@", "\\udfff")


def poisoned_requests(w: dict[str, str]) -> list[tuple[str, str, str]]:
    """(method, path, raw JSON body) for every JSON endpoint, each with one lone surrogate."""
    work, token, session, delegation = w["work"], w["token"], w["session"], w["delegation"]
    outcome = {"status": "completed", "result": "@"}
    return [
        ("POST", "/work", raw({"data": {"prompt": "x@"}})),
        ("POST", "/work", raw({"data": {"prompt": "x"}, "metadata": {"k": "@"}})),
        ("POST", "/work", raw({"data": {"prompt": "x"}, "metadata": {"@": "v"}})),
        ("POST", "/work", raw({"data": {"prompt": "x", "id": "s@"}})),
        ("POST", f"/work/{work}/ack", raw({"worker_id": "w@"})),
        (
            "POST",
            f"/work/{work}/stop",
            raw({"force": True, "expected_last_heartbeat": token, "outcome": outcome}),
        ),
        (
            "POST",
            f"/work/{work}/requeue",
            raw({"expected_last_heartbeat": token, "outcome": outcome}),
        ),
        ("POST", "/workers/w2/register", raw({"metadata": {"k": "@"}})),
        ("POST", "/workers/w1/heartbeat", raw({"worker_id": "w1", "runtime_metadata": {"v": "@"}})),
        ("POST", "/workers/w1/heartbeat", raw({"worker_id": "w1", "sample_error": "@"})),
        ("POST", f"/sessions/{session}/delegate", raw({"task": "t@"})),
        (
            "POST",
            f"/delegations/{delegation}/result",
            raw({"status": "completed", "response_preview": "@"}),
        ),
        ("POST", f"/sessions/{session}/messages", raw({"body": "@"})),
        ("POST", f"/sessions/{session}/notify", raw({"body": "@"})),
    ]


async def test_every_json_endpoint_refuses_a_lone_surrogate_and_writes_nothing(
    client: httpx.AsyncClient, db_path: Path
) -> None:
    world = await live_world(client)
    for method, path, body in poisoned_requests(world):
        before = dump(db_path)
        response = await client.request(
            method,
            f"{ENV}{path}",
            content=body.encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["type"] == "invalid_request"
        assert "lone surrogate" in response.json()["error"]["message"]
        assert dump(db_path) == before, f"{path} wrote something"
    # nothing was poisoned: every listing still answers
    for path in ("/work", "/workers", "/work/stats", f"/work/{world['work']}", "/workers/w1"):
        assert (await client.get(f"{ENV}{path}")).status_code == 200, path
    item = (await client.get(f"{ENV}/work/{world['work']}")).json()
    assert item["state"] == "active"


async def test_a_store_poisoned_before_the_check_still_answers(
    client: httpx.AsyncClient, db_path: Path
) -> None:
    """Written by an older version: the answers carry U+FFFD instead of failing for ever."""
    world = await live_world(client)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE work_items SET metadata = ? WHERE id = ?", ('{"k": "\\udfff"}', world["work"])
        )
    listed = await client.get(f"{ENV}/work")
    assert listed.status_code == 200
    (item,) = [i for i in listed.json()["data"] if i["id"] == world["work"]] or [
        i for i in listed.json() if i["id"] == world["work"]
    ]
    assert item["metadata"] == {"k": "\ufffd"}


@pytest.fixture(params=["embedded", "http"])
async def plane(
    request: pytest.FixtureRequest, store: SQLiteStore
) -> AsyncIterator[EmbeddedControlPlane | HttpControlPlane]:
    if request.param == "embedded":
        async with EmbeddedControlPlane(store) as embedded:
            yield embedded
    else:
        async with (
            open_control_plane_server(store, key_provider=KEY) as url,
            HttpControlPlane.open(url, key=KEY) as http,
        ):
            yield http


async def test_the_planes_refuse_a_lone_surrogate_before_any_write(
    plane: EmbeddedControlPlane | HttpControlPlane, db_path: Path
) -> None:
    """Same answer from the embedded plane and over HTTP: BadRequest, nothing written."""
    item = await plane.submit("p")
    assert await plane.poll(worker_id="w1") is not None
    await plane.ack(item.id, worker_id="w1")
    token = (await plane.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)).last_heartbeat
    before = dump(db_path)
    bad = "\udfff"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: plane.submit(f"x{bad}"),
        lambda: plane.submit("x", metadata={"k": bad}),
        lambda: plane.stop(
            item.id,
            force=True,
            expected_last_heartbeat=token,
            outcome=Outcome(OutcomeStatus.COMPLETED, result=bad),
        ),
        lambda: plane.worker_heartbeat(PresenceReport(worker_id="w1", runtime_metadata={"v": bad})),
        lambda: plane.post_message(item.data.id, bad),
        lambda: plane.notify(item.data.id, bad),
        lambda: plane.delegate(item.data.id, bad),
        lambda: plane.get(bad),
        lambda: plane.heartbeat(item.id, expected_last_heartbeat=bad),
        lambda: plane.poll(worker_id=bad),
    ]
    for call in calls:
        with pytest.raises(BadRequest, match="lone surrogate"):
            await call()
    assert dump(db_path) == before
    assert (await plane.get(item.id)).state is WorkState.ACTIVE
    assert await plane.list_work()
    assert await plane.list_workers() == []


def test_check_and_scrub_are_one_rule() -> None:
    check_text({"a": ["ok", ("fine", {"deep": "é☃😀"})]})
    for poisoned in (
        "\ud800",
        ["x", "\udfff"],
        {"k": {"\udc80": 1}},
        Outcome(OutcomeStatus.FAILED, reason="\ud83d"),
    ):
        with pytest.raises(BadRequest):
            check_text(poisoned)
    assert scrub_text("a\ud800b\udfffc😀") == "a\ufffdb\ufffdc😀"
    assert codec.dumps({"k": "\udfff"}) == '{"k":"\ufffd"}'.encode()
    with pytest.raises(BadRequest, match="lone surrogate"):
        codec.loads(b'{"k": "\\ud800"}')


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("\ud800", "value"),
        (["ok", "\udfff"], r"value\[1\]"),
        ({"a": [{"deep": "\ud83d"}]}, r"value\['a'\]\[0\]\['deep'\]"),
        ({"k": {"\udc80": 1}}, r"a key of value\['k'\]"),
        (Outcome(OutcomeStatus.FAILED, reason="x\ud83d"), r"value\.reason"),
    ],
)
def test_check_text_names_where_the_lone_surrogate_is(value: object, where: str) -> None:
    with pytest.raises(BadRequest, match=f"^{where} is not valid Unicode"):
        check_text(value)
