"""The local API served by a real worker over HTTP on loopback (embedded control plane)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from recording_plane import RecordingPlane

from supervisor import AgentContext, ChildStartError, ConfigError, Worker, WorkerConfig, open_worker
from supervisor._worker._api import API_FILENAME, ApiFile, check_api_address, read_api_file
from supervisor.controlplane import OutcomeStatus

pytestmark = pytest.mark.slow

SECRET_KEY = "env-key-never-shown-0123456789"


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {"api_enabled": True, "worker_id": "w-api", "environment_key": SECRET_KEY}


class Gate:
    """An in-process agent that holds each session until released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.running = 0

    async def __call__(self, ctx: AgentContext) -> str:
        self.running += 1
        ctx.emit("holding")
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return f"done {ctx.prompt}"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@asynccontextmanager
async def api_worker(
    config: Callable[..., WorkerConfig], agent: Any, **overrides: Any
) -> AsyncIterator[tuple[Worker, httpx.AsyncClient]]:
    plane = overrides.pop("control_plane", None)
    options: dict[str, Any] = {"agent": agent}
    if plane is not None:
        options["control_plane"] = plane
    async with open_worker(config(**overrides), **options) as worker:
        assert worker.api_url is not None
        async with httpx.AsyncClient(base_url=worker.api_url, timeout=10) as client:
            yield worker, client


async def test_health_reports_load_capacity_and_queue(config: Callable[..., WorkerConfig]) -> None:
    gate = Gate()
    async with api_worker(config, gate) as (worker, client):
        response = await client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert {k: body[k] for k in ("status", "busy", "active", "queued", "capacity")} == {
            "status": "ok",
            "busy": False,
            "active": 0,
            "queued": 0,
            "capacity": 2,
        }
        assert body["wedged"] is False
        ids = [await worker.submit(f"t{n}") for n in range(3)]
        await wait_for(lambda: gate.running == 2)
        body = (await client.get("/health")).json()
        assert (body["busy"], body["active"], body["queued"]) == (True, 2, 1)
        gate.release.set()
        for item_id in ids:
            assert (await worker.wait(item_id)).status is OutcomeStatus.COMPLETED


async def test_health_is_503_degraded_while_wedged_and_ok_once_cleared(
    config: Callable[..., WorkerConfig],
) -> None:
    async with api_worker(config, Gate()) as (worker, client):
        worker.wedge.mark("control request timeout")
        response = await client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert (body["status"], body["wedged"]) == ("degraded", True)
        assert body["wedge_reason"] == "control request timeout"
        worker.wedge.clear()
        response = await client.get("/health")
        assert (response.status_code, response.json()["status"]) == (200, "ok")


async def test_health_says_draining_while_sessions_finish(
    config: Callable[..., WorkerConfig],
) -> None:
    gate = Gate()
    async with api_worker(config, gate) as (worker, client):
        item_id = await worker.submit("long")
        await wait_for(lambda: gate.running == 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.drain)
            await wait_for(lambda: worker.stats().draining)
            response = await client.get("/health")
            assert (response.status_code, response.json()["status"]) == (503, "draining")
            gate.release.set()
        assert (await worker.wait(item_id)).status is OutcomeStatus.COMPLETED


async def test_metrics_parse_and_count_sessions_by_outcome(
    config: Callable[..., WorkerConfig],
) -> None:
    async def agent(ctx: AgentContext) -> str:
        if "fail" in ctx.prompt:
            raise RuntimeError("agent failed on purpose")
        return "fine"

    async with api_worker(config, agent) as (worker, client):
        for prompt in ("a", "b", "fail"):
            await worker.wait(await worker.submit(prompt))
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
    by_outcome = {s.labels["outcome"]: s.value for s in families["supervisor_sessions"].samples}
    assert by_outcome["completed"] == 2
    assert by_outcome["failed"] == 1
    assert families["supervisor_sessions_active"].samples[0].value == 0
    assert families["supervisor_restarts"].type == "counter"
    assert families["supervisor_lease_losses"].samples[0].value == 0
    assert families["supervisor_wedged"].samples[0].value == 0
    latency = families["supervisor_heartbeat_latency_seconds"]
    assert latency.type == "histogram"
    count = next(s.value for s in latency.samples if s.name.endswith("_count"))
    # Every heartbeat call the keepers made (on the embedded plane a session's first
    # lease comes with its claim, so short sessions make none).
    assert count == worker.heartbeat_meter.latency.count
    assert families["supervisor_queue_depth"].samples[0].value == 0


async def test_status_shows_the_tree_sessions_and_leases_without_secrets(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    gate = Gate()
    plane = RecordingPlane(tmp_path / "cp.sqlite3")
    plane.secrets = []
    try:
        async with api_worker(config, gate, control_plane=plane) as (worker, client):
            item_id = await worker.submit("look at me")
            await wait_for(lambda: gate.running == 1)
            url = worker.api_url
            response = await client.get("/status")
            body = response.json()
            gate.release.set()
            await worker.wait(item_id)
            after = (await client.get("/status")).json()
            metrics = (await client.get("/metrics")).text
            health = (await client.get("/health")).text
    finally:
        await plane.aclose()
    assert body["worker_id"] == "w-api"
    assert body["api_url"] == url
    assert [c["id"] for c in body["tree"]["children"]] == ["services", "work"]
    services = body["tree"]["children"][0]["supervisor"]
    assert "api" in [c["id"] for c in services["children"]]
    sessions = body["tree"]["children"][1]["supervisor"]["children"][0]["supervisor"]
    node = next(c for c in sessions["children"] if c["id"] == f"session:{item_id}")
    assert [c["id"] for c in node["supervisor"]["children"]] == ["lease", "runner"]
    assert node["uptime"] >= 0
    (session,) = body["sessions"]
    assert session["work_id"] == item_id and session["running"] is True
    assert session["lease"]["beats"] >= 1 and session["lease"]["seconds_left"] > 0
    assert after["sessions"][0]["outcome"]["status"] == "completed"
    assert plane.secrets, "the store hands out a session credential with each claim"
    for text in (response.text, json.dumps(after), metrics, health):
        assert SECRET_KEY not in text
        assert "look at me" not in text  # prompts stay in the control plane
        for secret in plane.secrets:
            assert secret not in text


async def test_unknown_routes_and_methods_answer_json_errors(
    config: Callable[..., WorkerConfig],
) -> None:
    async with api_worker(config, Gate()) as (_, client):
        missing = await client.get("/nope")
        wrong = await client.post("/health")
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["error"]["type"]) == (405, "method_not_allowed")


async def test_api_file_names_the_url_and_is_removed_on_exit(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with api_worker(config, Gate()) as (worker, _):
        info = read_api_file(state)
        assert info is not None
        assert (info.url, info.worker_id) == (worker.api_url, "w-api")
        assert info.process_alive()
    assert not (state / API_FILENAME).exists()
    assert worker.api_url is None


async def test_api_file_of_another_worker_is_left_alone(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    """Two workers on one state dir: the one stopping first must not remove the other's file."""
    state = tmp_path / "state"
    async with api_worker(config, Gate()):
        other = ApiFile("http://127.0.0.1:1", 1, "someone-else", 0.0)
        (state / API_FILENAME).write_text(json.dumps(attrs.asdict(other)))
    assert read_api_file(state) == other


def taken_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def test_a_taken_port_is_a_config_error_naming_api_port() -> None:
    holder, port = taken_port()
    with holder, pytest.raises(ConfigError, match="already in use") as caught:
        check_api_address("127.0.0.1", port)
    assert caught.value.key == "api_port"


async def test_worker_does_not_start_on_a_taken_port(config: Callable[..., WorkerConfig]) -> None:
    holder, port = taken_port()
    with holder:
        worker = Worker(config(api_port=port), agent=Gate())
        with pytest.raises(ChildStartError) as caught, trio.fail_after(10):
            await worker.run()
    cause: BaseException | None = caught.value
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert isinstance(cause, ConfigError) and cause.key == "api_port"


async def test_an_api_crash_is_restarted_without_touching_sessions(
    config: Callable[..., WorkerConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypercorn.trio import serve as real_serve

    import supervisor._worker._api as api_module

    crash = trio.Event()
    runs = 0

    async def crashing_serve(app: Any, config: Any, **kwargs: Any) -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await real_serve(app, config, **kwargs)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: real_serve(app, config, **kwargs))
            await crash.wait()
            raise RuntimeError("the API fell over")

    monkeypatch.setattr(api_module, "hypercorn_serve", crashing_serve)
    gate = Gate()
    async with open_worker(config(), agent=gate) as worker:
        item_id = await worker.submit("keep going")
        await wait_for(lambda: gate.running == 1)
        first_url = worker.api_url
        crash.set()
        await wait_for(lambda: runs == 2 and worker.api_url is not None)
        assert gate.running == 1  # the session never noticed
        assert worker.stats().restarts == 1
        async with httpx.AsyncClient(base_url=worker.api_url or "", timeout=10) as client:
            assert (await client.get("/health")).status_code == 200
        gate.release.set()
        assert (await worker.wait(item_id)).status is OutcomeStatus.COMPLETED
    assert first_url is not None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_only_loopback_addresses_count_as_private(host: str, loopback: bool) -> None:
    from supervisor._worker._api import _is_loopback

    assert _is_loopback(host) is loopback


async def test_an_api_bound_beyond_loopback_is_warned_about(
    config: Callable[..., WorkerConfig], caplog: pytest.LogCaptureFixture
) -> None:
    """No authentication on the API: binding it where others can reach it is said out loud."""
    async with api_worker(config, Gate(), api_host="0.0.0.0") as (_, client):
        assert (await client.get("/health")).status_code == 200
    assert any("has no authentication" in r.getMessage() for r in caplog.records)


async def test_the_worker_page_draws_its_sessions_and_tree_without_secrets(
    config: Callable[..., WorkerConfig],
) -> None:
    """``/`` is a page shell; its live region shows sessions, health and the tree."""
    gate = Gate()
    async with api_worker(config, gate) as (worker, client):
        item_id = await worker.submit("look at me <script>")
        await wait_for(lambda: gate.running == 1)
        page = await client.get("/")
        fragment = await client.get("/dashboard/local")
        script = await client.get("/dashboard/static/dashboard.js")
        gate.release.set()
        await worker.wait(item_id)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-auth="none"' in page.text and "/dashboard/local" in page.text
    assert script.status_code == 200
    body = fragment.text
    assert fragment.status_code == 200
    assert "<code>w-api</code>" in body and item_id in body
    assert f"session:{item_id}" in body and "<code>lease</code>" in body
    assert "badge-running" in body
    assert SECRET_KEY not in body and "look at me" not in body
