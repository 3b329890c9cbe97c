"""A wedged worker end to end (DESIGN §3.5, §3.6 and the status table of §4).

The worker runs on the embedded control plane over a real SQLite file whose
clock follows Trio's, so the whole story (wedge, requeue, degraded, the
paused poller, the probe, recovery) runs under ``autojump_clock`` in
milliseconds; one test repeats the heart of it with a real agent subprocess
in real time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from supervisor import AgentContext, TransientError, Worker, WorkerConfig
from supervisor._cli._main import main
from supervisor.controlplane import (
    ControlPlane,
    EmbeddedControlPlane,
    OutcomeStatus,
    PresenceReport,
    SQLiteStore,
    WorkerRecord,
    WorkerStatus,
    WorkItem,
    WorkState,
)
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.controlplane._protocol import LeasedClaim
from supervisor.testing import run_inline

AGENTS = Path(__file__).resolve().parents[1] / "agents"
WEDGE_LINE = "Error: Control request timeout: initialize"
PROBE_INTERVAL = 60.0
PRESENCE_INTERVAL = 10.0
EPOCH = 1_700_000_000.0


@attrs.define
class Report:
    at: float
    report: PresenceReport
    answer: WorkerRecord | None


class Recorder:
    """The worker's control plane: the real embedded one, watched and, on demand, failing."""

    def __init__(self, inner: EmbeddedControlPlane) -> None:
        self.inner = inner
        self.polls: list[float] = []
        self.claims: list[tuple[float, str]] = []
        self.reports: list[Report] = []
        self.fail_polls = 0
        self.fail_reports = False

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    async def poll(self, **kwargs: Any) -> WorkItem | None:
        self.polls.append(trio.current_time())
        if self.fail_polls:
            self.fail_polls -= 1
            await trio.lowlevel.checkpoint()
            raise TransientError("control plane unavailable", status_code=503)
        item = await self.inner.poll(**kwargs)
        if item is not None:
            self.claims.append((trio.current_time(), item.id))
        return item

    async def claim(self, **kwargs: Any) -> list[WorkItem]:
        self.polls.append(trio.current_time())
        if self.fail_polls:
            self.fail_polls -= 1
            await trio.lowlevel.checkpoint()
            raise TransientError("control plane unavailable", status_code=503)
        items: list[WorkItem] = await self.inner.claim(**kwargs)
        self.claims += [(trio.current_time(), item.id) for item in items]
        return items

    async def claim_leased(self, **kwargs: Any) -> list[LeasedClaim]:
        self.polls.append(trio.current_time())
        if self.fail_polls:
            self.fail_polls -= 1
            await trio.lowlevel.checkpoint()
            raise TransientError("control plane unavailable", status_code=503)
        claims: list[LeasedClaim] = await self.inner.claim_leased(**kwargs)
        self.claims += [(trio.current_time(), claim.item.id) for claim in claims]
        return claims

    async def worker_heartbeat(self, report: PresenceReport) -> WorkerRecord:
        if self.fail_reports:
            self.reports.append(Report(trio.current_time(), report, None))
            await trio.lowlevel.checkpoint()
            raise TransientError("presence unavailable", status_code=503)
        record = await self.inner.worker_heartbeat(report)
        self.reports.append(Report(trio.current_time(), report, record))
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reports_after(self, t: float) -> list[Report]:
        return [r for r in self.reports if r.at > t]


class DirWorkspaces:
    """Plain directories made in the Trio thread (no worker threads under the mock clock)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @asynccontextmanager
    async def open(self, session_id: str) -> AsyncIterator[Path]:
        await trio.lowlevel.checkpoint()
        path = self.root / session_id
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            path.rmdir()


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {
        "poll_block_ms": 1000,
        "lease_ttl": 30.0,
        "probe_interval": PROBE_INTERVAL,
        "presence_interval": PRESENCE_INTERVAL,
    }


@asynccontextmanager
async def mock_clock_worker(
    config: Callable[..., WorkerConfig],
    tmp_path: Path,
    agent: Callable[[AgentContext], Any],
    **overrides: Any,
) -> AsyncIterator[tuple[Worker, Recorder]]:
    """A worker under the mock clock: inline store calls, in-process agent, plain dirs."""
    inner = EmbeddedControlPlane(
        tmp_path / "cp.sqlite3",
        threaded=False,
        clock=lambda: EPOCH + trio.current_time(),
        poll_interval=0.05,
    )
    plane = Recorder(inner)
    worker = Worker(
        config(**overrides),
        control_plane=cast(ControlPlane, plane),
        agent=agent,
        workspaces=DirWorkspaces(tmp_path / "ws"),
        offload=run_inline,  # a thread would let the mock clock jump while it works
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            yield worker, plane
            nursery.cancel_scope.cancel()
    finally:
        await inner.aclose()


async def wait_until(predicate: Callable[[], bool], *, step: float = 0.1) -> float:
    """Wait (in Trio time) until ``predicate()``; returns when it became true."""
    with trio.fail_after(3600):
        while not predicate():
            await trio.sleep(step)
    return trio.current_time()


async def test_a_wedged_agent_degrades_the_worker_until_a_probe_succeeds(
    config: Callable[..., WorkerConfig], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The whole story of issue 5, on the mock clock.

    The agent prints the wedge line on its first attempt and then hangs; the
    session ends ``wedged``, its item goes back to the queue, the next
    presence report says ``runtime_state: wedged`` with the reason, the
    control plane shows ``degraded``, and the poller makes no claim for
    ``probe_interval``. Meanwhile the control plane flakes (polls and
    presence reports fail). The probe (the same item, second attempt)
    completes, which clears the wedge; the first accepted report after that
    has ``runtime_state`` cleared but carries the failures (an error rate of
    at least 0.1), so the worker stays degraded; the next one's rate is below
    0.1 and the worker is ``online`` again.
    """
    attempts: Counter[str] = Counter()

    async def agent(ctx: AgentContext) -> str:
        attempts[ctx.prompt] += 1
        ctx.emit("starting")
        if ctx.prompt == "wedge once" and attempts[ctx.prompt] == 1:
            ctx.emit(WEDGE_LINE)
            await trio.sleep_forever()
        await trio.sleep(2)
        return f"done: {ctx.prompt}"

    async with mock_clock_worker(config, tmp_path, agent) as (worker, plane):
        await wait_until(lambda: any(r.answer is not None for r in plane.reports))
        assert plane.reports[0].answer is not None
        assert plane.reports[0].answer.status is WorkerStatus.ONLINE

        item_id = await worker.submit("wedge once")
        first = await wait_until(
            lambda: any(r.work_id == item_id and r.done.is_set() for r in worker.sessions())
        )
        record = worker.sessions()[0]
        assert record.outcome is not None
        assert record.outcome.status is OutcomeStatus.WEDGED
        assert record.outcome.reason == WEDGE_LINE
        assert worker.wedge.reason == WEDGE_LINE

        # The item is back in the queue, one attempt spent, for anyone to claim.
        item = await plane.inner.get(item_id)
        assert (item.state, item.attempts, item.worker_id, item.outcome) == (
            WorkState.QUEUED,
            1,
            None,
            None,
        )

        # The next presence report says so, and the control plane degrades the worker.
        await wait_until(lambda: bool(plane.reports_after(first)))
        report = plane.reports_after(first)[0]
        assert report.at - first <= PRESENCE_INTERVAL
        assert report.report.runtime_state == "wedged"
        assert report.report.sample_error == WEDGE_LINE
        assert report.answer is not None
        assert report.answer.status is WorkerStatus.DEGRADED
        assert (await plane.inner.get_worker("w1")).status is WorkerStatus.DEGRADED

        # The poller claims nothing until the probe, probe_interval after the wedge.
        # Meanwhile the control plane flakes: the failures pile up unreported.
        plane.fail_polls = 3
        plane.fail_reports = True
        probe_at = await wait_until(lambda: len(plane.claims) == 2, step=0.01)
        assert plane.claims[1][1] == item_id  # the probe takes the given-back item
        since = worker.wedge.since if worker.wedge.since is not None else first
        assert probe_at >= first + PROBE_INTERVAL - 0.5
        assert [t for t in plane.polls if first < t < since + PROBE_INTERVAL] == []
        assert worker.breaker.statistics().probes == 1

        # The probe completes: the wedge is cleared, claims flow again.
        probe_done = await wait_until(lambda: not worker.wedge.is_wedged)
        plane.fail_reports = False
        assert attempts["wedge once"] == 2
        outcome = await worker.wait(item_id)
        assert outcome.status is OutcomeStatus.COMPLETED
        assert (await plane.inner.get(item_id)).state is WorkState.STOPPED

        # Recovery follows the table: degraded until the error rate is below 0.1.
        await wait_until(
            lambda: any(
                r.answer is not None and r.answer.status is WorkerStatus.ONLINE
                for r in plane.reports_after(probe_done)
            )
        )
        after = [r for r in plane.reports_after(probe_done) if r.answer is not None]
        assert all(r.report.runtime_state is None for r in after)
        first_clear, *rest = after
        assert first_clear.report.error_rate >= 0.1
        assert first_clear.answer is not None
        assert first_clear.answer.status is WorkerStatus.DEGRADED  # not recovered yet
        recovered = rest[-1]
        assert recovered.report.error_rate < 0.1
        assert recovered.answer is not None
        assert recovered.answer.status is WorkerStatus.ONLINE
        assert all(
            r.answer is not None and r.answer.status is WorkerStatus.DEGRADED for r in rest[:-1]
        )

        # Full capacity again: two items are claimed at once.
        ids = [await worker.submit(f"task {n}") for n in range(2)]
        await wait_until(lambda: worker.stats().active == 2)
        for i in ids:
            assert (await worker.wait(i)).status is OutcomeStatus.COMPLETED


async def test_a_silent_agent_is_wedged_by_the_watchdog(
    config: Callable[..., WorkerConfig], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An in-process agent that stops producing output is cancelled as wedged."""

    async def agent(ctx: AgentContext) -> str:
        if ctx.prompt == "goes quiet":
            for n in range(5):
                ctx.emit(f"step {n}")
                await trio.sleep(10)
            await trio.sleep_forever()
        await trio.sleep(1)
        return "fine"

    async with mock_clock_worker(config, tmp_path, agent, wedge_timeout=120.0) as (worker, plane):
        slow_but_talking = await worker.submit("talks")
        item_id = await worker.submit("goes quiet")
        await wait_until(lambda: any(r.work_id == item_id for r in worker.sessions()))
        record = next(r for r in worker.sessions() if r.work_id == item_id)
        ended = await wait_until(record.done.is_set)
        assert record.outcome is not None
        assert record.outcome.status is OutcomeStatus.WEDGED
        assert record.outcome.reason is not None
        assert "no output" in record.outcome.reason
        last_output = record.started_at + 40  # the fifth line
        assert 120 <= ended - last_output <= 150
        assert worker.wedge.is_wedged
        assert (await plane.inner.get(item_id)).state is WorkState.QUEUED
        assert (await worker.wait(slow_but_talking)).status is OutcomeStatus.COMPLETED


async def test_a_wedge_touches_only_its_own_session(
    config: Callable[..., WorkerConfig], tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A sibling session that was running keeps running and completes."""
    release = trio.Event()

    async def agent(ctx: AgentContext) -> str:
        if ctx.prompt == "wedge":
            ctx.emit(WEDGE_LINE)
            await trio.sleep_forever()
        ctx.emit("working")
        await release.wait()
        return "sibling done"

    async with mock_clock_worker(config, tmp_path, agent) as (worker, _plane):
        sibling = await worker.submit("long job")
        await wait_until(lambda: worker.stats().active == 1)
        wedged = await worker.submit("wedge")
        await wait_until(lambda: worker.wedge.is_wedged)
        await wait_until(
            lambda: any(r.work_id == wedged and r.done.is_set() for r in worker.sessions())
        )
        assert worker.stats().active == 1
        release.set()
        outcome = await worker.wait(sibling)
        assert outcome.status is OutcomeStatus.COMPLETED
        assert worker.wedge.is_wedged  # a session older than the wedge does not clear it


@pytest.mark.slow
async def test_a_real_agent_printing_the_wedge_line_is_requeued_and_reported(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    """A subprocess agent prints the line and hangs: killed, wedged, item requeued, degraded."""
    plane = EmbeddedControlPlane(tmp_path / "cp.sqlite3")
    agent = f"{sys.executable} {AGENTS / 'wedge.py'}"
    cfg = config(
        agent=agent,
        presence_interval=0.2,
        probe_interval=30.0,
        agent_grace=0.5,
        poll_block_ms=100,
    )
    worker = Worker(cfg, control_plane=plane)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            item_id = await worker.submit("anything")
            with trio.fail_after(20):
                while not any(r.done.is_set() for r in worker.sessions()):
                    await trio.sleep(0.02)
            record = worker.sessions()[0]
            assert record.outcome is not None
            assert record.outcome.status is OutcomeStatus.WEDGED
            assert record.outcome.reason == WEDGE_LINE
            item = await plane.get(item_id)
            assert (item.state, item.attempts) == (WorkState.QUEUED, 1)
            with trio.fail_after(10):
                while (await plane.get_worker("w1")).runtime_state != "wedged":
                    await trio.sleep(0.05)
            seen = await plane.get_worker("w1")
            assert (seen.status, seen.sample_error) == (WorkerStatus.DEGRADED, WEDGE_LINE)
            # paused: the requeued item stays in the queue
            await trio.sleep(1.0)
            assert (await plane.get(item_id)).state is WorkState.QUEUED
            assert len(worker.sessions()) == 1
            assert _no_agent_left(item_id)
            nursery.cancel_scope.cancel()
    finally:
        await plane.aclose()


def _no_agent_left(item_id: str) -> bool:
    needle = f"SUPERVISOR_WORK_ID={item_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return False
        except OSError:
            continue
    return True


def test_status_shows_a_degraded_worker_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m supervisor status`` (text and --json) shows what presence reported."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = SQLiteStore(state_dir / STORE_FILENAME)
    try:
        now = time.time()
        store.register_worker("default", "w1", now=now)
        report = PresenceReport(
            worker_id="w1",
            status="working",
            error_rate=0.25,
            sample_error=WEDGE_LINE,
            active_tasks=1,
            runtime_state="wedged",
        )
        store.worker_heartbeat("default", report, now=now)
    finally:
        store.close()
    assert main(["status", "--state-dir", str(state_dir), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (worker,) = document["workers"]
    assert worker["status"] == "degraded"
    assert worker["runtime_state"] == "wedged"
    assert worker["sample_error"] == WEDGE_LINE
    assert worker["error_rate"] == 0.25
    assert main(["status", "--state-dir", str(state_dir)]) == 0
    text = capsys.readouterr().out
    assert "degraded" in text
    assert "Control request timeout" in text
