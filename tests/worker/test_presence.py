"""Presence (DESIGN §3.6) against the real reference server on 127.0.0.1, port 0.

The store behind the server reads a `ManualClock`, so the worker status
machine (online, degraded, offline) moves exactly when a test says; the
client records every answer on the wire through an httpx event hook.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from supervisor import TransientError, WedgeState
from supervisor._worker._presence import Activity, CountingControlPlane, counting_control_plane
from supervisor.controlplane import (
    Conflict,
    ControlPlane,
    EmbeddedControlPlane,
    FencingConflict,
    FileKey,
    HttpControlPlane,
    NotFound,
    PresenceReport,
    SQLiteStore,
    StatusPolicy,
    Unauthorized,
    WorkerStatus,
    open_control_plane_server,
)
from supervisor.lowlevel import Presence, RequestCounter
from supervisor.testing import ManualClock, ScriptedControlPlane

KEY = "presence-key-0123456789abcdef"
WORKER = "w-presence"
POLICY = StatusPolicy(offline_after=90.0)
WEDGE_LINE = "Error: Control request timeout: initialize"


class FlakyPlane:
    """Serves an embedded plane, failing presence reports on demand (the server answers 503)."""

    def __init__(self, inner: EmbeddedControlPlane) -> None:
        self.inner = inner
        self.fail_reports = 0

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    async def worker_heartbeat(self, report: PresenceReport) -> Any:
        if self.fail_reports:
            self.fail_reports -= 1
            await trio.lowlevel.checkpoint()
            raise TransientError("presence store unavailable", status_code=503)
        return await self.inner.worker_heartbeat(report)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@attrs.define
class Rig:
    """A server over a store with a manual clock, and a client that records the wire."""

    client: HttpControlPlane
    plane: EmbeddedControlPlane
    flaky: FlakyPlane
    clock: ManualClock
    server_key: Path
    client_key: Path
    wire: list[int] = attrs.field(factory=list)
    clients_made: int = 0

    def presence(self, **options: Any) -> Presence:
        options.setdefault("counter", RequestCounter())
        options.setdefault("wedge", WedgeState())
        counter: RequestCounter = options["counter"]
        return Presence(counting_control_plane(self.client, counter), worker_id=WORKER, **options)

    async def status(self) -> WorkerStatus:
        return (await self.plane.get_worker(WORKER)).status


@pytest.fixture
def store_options() -> dict[str, Any]:
    return {"status_policy": POLICY}


@asynccontextmanager
async def open_rig(tmp_path: Path, store: SQLiteStore) -> AsyncIterator[Rig]:
    clock = ManualClock()
    plane = EmbeddedControlPlane(store, clock=clock)
    flaky = FlakyPlane(plane)
    server_key, client_key = tmp_path / "server.key", tmp_path / "client.key"
    server_key.write_text(KEY)
    client_key.write_text(KEY + "\n")
    wire: list[int] = []
    made = [0]

    async def record(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/heartbeat"):
            wire.append(response.status_code)

    def factory() -> httpx.AsyncClient:
        made[0] += 1
        return httpx.AsyncClient(event_hooks={"response": [record]})

    try:
        async with (
            open_control_plane_server(flaky, key_provider=FileKey(server_key, watch=True)) as url,
            HttpControlPlane.open(url, key=FileKey(client_key), client_factory=factory) as client,
        ):
            rig = Rig(client, plane, flaky, clock, server_key, client_key, wire)
            rig.clients_made = made[0]
            yield rig
    finally:
        # The plane's store thread must not outlive the rig (a later test counts threads).
        with trio.CancelScope(shield=True):
            await plane.aclose()


@pytest.fixture
async def rig(tmp_path: Path, store: SQLiteStore) -> AsyncIterator[Rig]:
    async with open_rig(tmp_path, store) as opened:
        yield opened


# --- the report ------------------------------------------------------------------------------


async def test_an_accepted_report_carries_the_whole_body_and_settles_the_counters(
    rig: Rig,
) -> None:
    counter = RequestCounter()
    for _ in range(3):
        counter.succeeded()
    counter.failed(TransientError("poll: no answer within 10s"))
    presence = rig.presence(
        counter=counter,
        activity=lambda: Activity(status="working", active_tasks=2, current_task="work_7"),
        metadata=lambda: {"capabilities": {"agent": "process"}, "capacity": 4, "version": "1.0"},
    )
    record = await presence.report_once()
    assert record is not None
    assert record.status is WorkerStatus.ONLINE
    stored = await rig.plane.get_worker(WORKER)
    assert stored.error_rate == pytest.approx(0.25)
    assert stored.sample_error == "TransientError: poll: no answer within 10s"
    assert (stored.active_tasks, stored.current_task) == (2, "work_7")
    assert stored.runtime_state is None
    assert stored.uptime_seconds >= 0
    assert stored.runtime_metadata == {
        "capabilities": {"agent": "process"},
        "capacity": 4,
        "version": "1.0",
    }
    # what the report covered is forgotten; its own (successful) call stays counted
    assert (counter.requests, counter.errors, counter.sample_error) == (1, 0, None)
    assert rig.wire == [200]


async def test_non_2xx_answers_are_failures_and_keep_the_counters(rig: Rig) -> None:
    """Two 503s: nothing is reset; the accepted report's rate includes both failures."""
    counter = RequestCounter()
    for _ in range(6):
        counter.succeeded()
    presence = rig.presence(counter=counter)
    rig.flaky.fail_reports = 2
    assert await presence.report_once() is None
    assert await presence.report_once() is None
    assert (counter.requests, counter.errors) == (8, 2)
    assert counter.sample_error is not None
    assert "503" in counter.sample_error
    record = await presence.report_once()
    assert record is not None
    assert rig.wire == [503, 503, 200]
    assert record.error_rate == pytest.approx(2 / 8)
    stats = presence.statistics()
    assert (stats.reports, stats.accepted, stats.failures) == (3, 1, 2)


async def test_a_wrong_key_is_a_401_failure_without_a_retry_loop(rig: Rig) -> None:
    counter = RequestCounter()
    presence = rig.presence(counter=counter)
    rig.client_key.write_text("not-the-key-at-all")
    assert await presence.report_once() is None
    assert rig.wire == [401]  # the key file did not change: no retry
    assert counter.errors == 1
    assert counter.sample_error is not None
    assert counter.sample_error.startswith("Unauthorized")
    assert "not-the-key" not in counter.sample_error


async def test_a_rotated_key_is_picked_up_with_exactly_one_retry(rig: Rig) -> None:
    presence = rig.presence()
    assert await presence.report_once() is not None
    rig.server_key.write_text("rotated-key-0987654321")
    rig.client_key.write_text("rotated-key-0987654321\n")
    assert await presence.report_once() is not None
    assert rig.wire == [200, 401, 200]
    assert await presence.report_once() is not None
    assert rig.wire == [200, 401, 200, 200]  # the new key is kept


async def test_a_broken_metadata_provider_still_reports(rig: Rig) -> None:
    calls = 0

    def metadata() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("adapter not importable")
        return {"capabilities": object()}  # not JSON either

    presence = rig.presence(metadata=metadata)
    for _ in range(2):
        record = await presence.report_once()
        assert record is not None
        assert record.runtime_metadata == {}
    assert presence.statistics().metadata_failures == 2
    assert rig.wire == [200, 200]


async def test_a_wedged_worker_reports_it_and_the_control_plane_degrades_it(rig: Rig) -> None:
    wedge = WedgeState()
    counter = RequestCounter()
    presence = rig.presence(wedge=wedge, counter=counter)
    assert (await presence.report_once()) is not None
    assert await rig.status() is WorkerStatus.ONLINE
    wedge.mark(WEDGE_LINE)
    counter.failed(TransientError("something else went wrong"))
    await presence.report_once()
    stored = await rig.plane.get_worker(WORKER)
    assert (stored.status, stored.runtime_state) == (WorkerStatus.DEGRADED, "wedged")
    assert stored.sample_error == WEDGE_LINE  # the wedge reason wins
    wedge.clear()
    await presence.report_once()  # runtime_state cleared, error rate 0 -> online
    stored = await rig.plane.get_worker(WORKER)
    assert (stored.status, stored.runtime_state, stored.error_rate) == (
        WorkerStatus.ONLINE,
        None,
        0.0,
    )


async def test_the_server_marks_the_worker_offline_once_reports_stop(rig: Rig) -> None:
    presence = rig.presence(interval=0.05)
    with trio.move_on_after(0.3):
        await presence.run()
    assert presence.statistics().accepted >= 3
    assert await rig.status() is WorkerStatus.ONLINE
    rig.clock.advance(POLICY.offline_after - 1)
    assert await rig.status() is WorkerStatus.ONLINE
    rig.clock.advance(1)
    assert await rig.status() is WorkerStatus.OFFLINE
    assert await presence.report_once() is not None  # a report brings it back
    assert await rig.status() is WorkerStatus.ONLINE


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_the_client_is_recreated_after_repeated_transport_failures() -> None:
    made: list[httpx.AsyncClient] = []

    def factory() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient())
        return made[-1]

    async with HttpControlPlane.open(_dead_url(), key=KEY, client_factory=factory) as client:
        counter = RequestCounter()
        presence = Presence(
            counting_control_plane(client, counter),
            worker_id=WORKER,
            counter=counter,
            wedge=WedgeState(),
            reconnect_after=3,
        )
        for _ in range(2):
            assert await presence.report_once() is None
        assert len(made) == 1
        assert await presence.report_once() is None
        assert len(made) == 2
        assert made[0].is_closed and not made[1].is_closed
        for _ in range(3):
            await presence.report_once()
        assert len(made) == 3
        assert presence.statistics().reconnects == client.reconnects == 2
        # reconnecting is not a request: only the six reports were counted, all failed
        assert (counter.requests, counter.errors) == (6, 6)


async def test_an_injected_client_is_never_replaced() -> None:
    async with httpx.AsyncClient() as shared:
        client = HttpControlPlane(_dead_url(), key=KEY, client=shared)
        assert await client.reconnect() is False
        await client.aclose()
        assert not shared.is_closed
    with pytest.raises(ValueError, match="not both"):
        HttpControlPlane(_dead_url(), key=KEY, client=shared, client_factory=httpx.AsyncClient)


# --- the counting wrapper --------------------------------------------------------------------


async def test_the_counter_counts_failures_but_not_answers_about_state_or_cancellations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane()
    counter = RequestCounter()
    counted = counting_control_plane(cp, counter)
    await counted.submit("x")
    cp.fail_next("poll", TransientError("503"))
    with pytest.raises(TransientError):
        await counted.poll(worker_id="w")
    for refusal in (Conflict("409"), FencingConflict("412"), NotFound("404")):
        cp.fail_next("ack", refusal)
        with pytest.raises(type(refusal)):
            await counted.ack("work-1", worker_id="w")
    cp.fail_next("stats", Unauthorized("401"))
    with pytest.raises(Unauthorized):
        await counted.stats()
    cp.hang("get")
    with trio.move_on_after(1):
        await counted.get("work-1")
    assert (counter.requests, counter.errors) == (6, 2)
    assert counter.error_rate == pytest.approx(2 / 6)
    assert counter.sample_error == "Unauthorized: 401"
    assert (counter.total_requests, counter.total_errors) == (6, 2)


async def test_the_counting_wrapper_passes_everything_else_through() -> None:
    cp = ScriptedControlPlane(environment_id="env-1")
    wrapper = CountingControlPlane(cp, RequestCounter())
    assert wrapper.environment_id == "env-1"
    assert isinstance(wrapper, ControlPlane)
    assert wrapper.calls is cp.calls  # a plain attribute, untouched
    await wrapper.aclose()
    assert not cp._closed  # the wrapper never closes what it wraps


def test_settling_forgets_only_what_the_report_covered() -> None:
    counter = RequestCounter()
    counter.failed(RuntimeError("a"))
    requests, errors, _ = counter.take()
    counter.failed(RuntimeError("b"))  # while the report was in flight
    counter.settle(requests, errors)
    assert (counter.requests, counter.errors, counter.sample_error) == (1, 1, "RuntimeError: b")


@pytest.mark.parametrize(
    ("options", "match"),
    [({"interval": 0}, "interval"), ({"reconnect_after": 0}, "reconnect_after")],
)
def test_presence_options_are_checked(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Presence(
            ScriptedControlPlane(),
            worker_id=WORKER,
            counter=RequestCounter(),
            wedge=WedgeState(),
            **options,
        )


async def test_a_deregistered_worker_is_reported_once_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cp = ScriptedControlPlane()
    await cp.register_worker(WORKER)
    await cp.deregister_worker(WORKER)
    presence = Presence(
        cp, worker_id=WORKER, counter=RequestCounter(), wedge=WedgeState(), interval=30
    )
    with trio.move_on_after(100):
        await presence.run()
    assert presence.statistics().failures == 4  # t = 0, 30, 60, 90
    assert sum("deregistered" in r.getMessage() for r in caplog.records) == 1


async def test_the_scripted_double_follows_the_status_table(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Hysteresis on recovery and ageing into offline, as the store does it."""
    cp = ScriptedControlPlane()

    async def beat(rate: float, runtime_state: str | None = None) -> WorkerStatus:
        report = PresenceReport(worker_id=WORKER, error_rate=rate, runtime_state=runtime_state)
        return (await cp.worker_heartbeat(report)).status

    assert await beat(0.0) is WorkerStatus.ONLINE
    assert await beat(0.0, "wedged") is WorkerStatus.DEGRADED
    assert await beat(0.2) is WorkerStatus.DEGRADED  # cleared, but not below 0.1 yet
    assert await beat(0.05) is WorkerStatus.ONLINE
    await trio.sleep(cp.status_policy.offline_after)
    assert (await cp.get_worker(WORKER)).status is WorkerStatus.OFFLINE
    assert [w.status for w in await cp.list_workers()] == [WorkerStatus.OFFLINE]
