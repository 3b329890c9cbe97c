"""The worker end to end: the embedded control plane on a real SQLite file, real agents."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import AgentContext, ChildState, TransientError, Worker, WorkerConfig, open_worker
from supervisor._worker._process import process_group_members
from supervisor.controlplane import EmbeddedControlPlane, Outcome, OutcomeStatus, WorkState

AGENTS = Path(__file__).resolve().parents[1] / "agents"


def agent_cmd(name: str, *extra: str) -> str:
    return " ".join([sys.executable, str(AGENTS / f"{name}.py"), *extra])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeClock:
    """A wall clock for the store that a test can move."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {"agent": agent_cmd("ok", "{prompt}"), "agent_grace": 0.5}


async def wait_for(predicate: object, *, timeout: float = 20.0, step: float = 0.02) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


@pytest.mark.slow
async def test_fifty_items_complete_with_never_more_than_eight_at_once(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """50 items, max_concurrency 8: all completed and recorded, at most 8 sessions at once."""
    fds_before = open_fds()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    peak = 0
    cfg = config(max_concurrency=8)
    async with open_worker(cfg, control_plane=plane) as worker:
        ids = [await worker.submit(f"task {n}") for n in range(50)]

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, worker.stats().active)
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            outcomes = [await worker.wait(i) for i in ids]
            nursery.cancel_scope.cancel()
    assert [o.status for o in outcomes] == [OutcomeStatus.COMPLETED] * 50
    assert outcomes[7].result == "done: task 7"
    assert 1 < peak <= 8
    items = await plane.list_work(limit=100)
    assert len(items) == 50
    assert all(i.state is WorkState.STOPPED for i in items)
    assert all(i.outcome is not None and i.outcome.status is OutcomeStatus.COMPLETED for i in items)
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    assert open_fds() <= fds_before


@pytest.mark.slow
async def test_a_worker_removes_workspaces_a_killed_worker_left_and_leaves_none_itself(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    killed_worker_workspace: Callable[..., Path],
) -> None:
    cfg = config()
    leftover = killed_worker_workspace(cfg.state_dir)
    async with open_worker(cfg, control_plane=plane) as worker:
        assert not leftover.exists()
        outcome = await worker.wait(await worker.submit("after the crash"))
        assert outcome.status is OutcomeStatus.COMPLETED
    assert os.listdir(cfg.state_dir / "workspaces") == []


@pytest.mark.slow
async def test_exit_codes_map_to_outcomes_and_reach_the_control_plane(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    async with open_worker(config(agent=agent_cmd("crash")), control_plane=plane) as w:
        outcome = await w.wait(await w.submit("boom"))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.exit_code == 3
    item = (await plane.list_work())[0]
    assert item.outcome is not None
    assert item.outcome.status is OutcomeStatus.FAILED
    assert item.outcome.exit_code == 3


@pytest.mark.slow
async def test_operator_cancel_stops_the_agent_group(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """request-stop -> the next heartbeat says stopping -> agent group gone -> cancelled."""
    cfg = config(agent=agent_cmd("grandchild"), lease_ttl=1.5, agent_grace=0.25)
    async with open_worker(cfg, control_plane=plane) as worker:
        item_id = await worker.submit("spawn")
        await wait_for(lambda: any(r.work_id == item_id for r in worker.sessions()))
        record = next(r for r in worker.sessions() if r.work_id == item_id)
        await wait_for(lambda: record.lease is not None and record.lease.confirmed)
        await trio.sleep(0.5)  # the agent and its grandchild are up
        pgid = _agent_pgid(cfg, item_id)
        await plane.request_stop(item_id)
        outcome = await worker.wait(item_id)
        assert outcome.status is OutcomeStatus.CANCELLED
        assert process_group_members(pgid) == []
    item = await plane.get(item_id)
    assert item.state is WorkState.STOPPED
    assert item.outcome is not None and item.outcome.status is OutcomeStatus.CANCELLED


def _agent_pgid(cfg: WorkerConfig, item_id: str) -> int:
    """The process group of the agent serving ``item_id`` (found by its environment)."""
    needle = f"SUPERVISOR_WORK_ID={item_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return os.getpgid(int(entry))
        except OSError:
            continue
    raise AssertionError(f"no agent process found for {item_id}")


@pytest.mark.slow
async def test_lease_loss_cancels_the_session_and_sends_no_stop(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    """The store's clock jumps past the lease: 412 -> lease_lost, agent gone, item requeued."""
    clock = FakeClock()
    plane = EmbeddedControlPlane(tmp_path / "cp.sqlite3", clock=clock)
    cfg = config(agent=agent_cmd("hang"), lease_ttl=1.5, agent_grace=0.25, max_concurrency=1)
    try:
        async with open_worker(cfg, control_plane=plane) as worker:
            item_id = await worker.submit("hang around")
            await wait_for(lambda: any(r.work_id == item_id for r in worker.sessions()))
            record = next(r for r in worker.sessions() if r.work_id == item_id)
            await wait_for(lambda: record.lease is not None and record.lease.confirmed)
            await trio.sleep(0.3)
            pgid = _agent_pgid(cfg, item_id)
            clock.now += 120  # the server-side lease expired long ago: the next beat gets 412
            await wait_for(lambda: record.done.is_set(), timeout=15.0)
            assert record.outcome is not None
            assert record.outcome.status is OutcomeStatus.LEASE_LOST
            assert process_group_members(pgid) == []
            await worker.drain(timeout=0)
        item = await plane.get(item_id)
        # expired and requeued by the store, never stopped by the worker that lost it
        assert item.attempts >= 1
        assert item.outcome is None or item.outcome.status is not OutcomeStatus.LEASE_LOST
    finally:
        await plane.aclose()


@pytest.mark.slow
async def test_drain_lets_sessions_finish_then_cancels_the_rest(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    cfg = config(agent=agent_cmd("hang"), max_concurrency=2)
    worker = Worker(cfg, control_plane=plane)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        ids = [await worker.submit(f"h{n}") for n in range(2)]
        await wait_for(lambda: worker.stats().active == 2)
        with trio.fail_after(10):
            await worker.drain(timeout=0.2)
    assert not worker.running
    for item_id in ids:
        item = await plane.get(item_id)
        assert item.state is WorkState.STOPPED
        assert item.outcome is not None and item.outcome.status is OutcomeStatus.CANCELLED


@pytest.mark.slow
async def test_host_cancellation_stops_sessions_with_outcomes(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    cfg = config(agent=agent_cmd("hang"), max_concurrency=3)
    worker = Worker(cfg, control_plane=plane)
    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            ids = [await worker.submit(f"h{n}") for n in range(3)]
            await wait_for(lambda: worker.stats().active == 3)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    for item_id in ids:
        item = await plane.get(item_id)
        assert item.state is WorkState.STOPPED
        assert item.outcome is not None and item.outcome.status is OutcomeStatus.CANCELLED


async def test_in_process_agent_and_the_live_tree(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """An in-process agent runs in its workspace; the snapshot shows session -> lease/runner."""
    seen: dict[str, object] = {}
    release = trio.Event()

    async def agent(ctx: AgentContext) -> dict[str, str]:
        seen["workspace"] = ctx.workspace
        seen["exists"] = ctx.workspace.is_dir()
        ctx.emit("working")
        await release.wait()
        return {"answer": ctx.prompt.upper()}

    async with open_worker(config(), control_plane=plane, agent=agent) as worker:
        item_id = await worker.submit("hello")
        await wait_for(lambda: "workspace" in seen)
        snap = worker.snapshot()
        session = snap.find("work", "sessions", f"session:{item_id}")
        assert session is not None and session.supervisor is not None
        assert [c.id for c in session.supervisor.children] == ["lease", "runner"]
        assert all(c.state is ChildState.RUNNING for c in session.supervisor.children)
        release.set()
        outcome = await worker.wait(item_id)
    assert outcome.status is OutcomeStatus.COMPLETED
    assert outcome.result == '{"answer": "HELLO"}'
    assert seen["exists"] is True
    assert not Path(str(seen["workspace"])).exists()  # removed afterwards


async def test_bad_state_dir_is_a_clear_config_error(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    worker = Worker(config(state_dir=blocker / "sub"))
    with pytest.raises(Exception, match="state_dir: cannot use"):
        await worker.run()


class CountingGets:
    """The embedded plane, counting ``get`` calls per item."""

    def __init__(self, inner: EmbeddedControlPlane) -> None:
        self._inner = inner
        self.gets: Counter[str] = Counter()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def get(self, work_id: str) -> object:
        self.gets[work_id] += 1
        return await self._inner.get(work_id)


async def test_waiting_on_a_session_running_here_asks_the_control_plane_nothing(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """While the session runs here its end is heard here: other sessions ending on the
    way do not send the waiter to the control plane."""
    release = trio.Event()

    async def agent(ctx: AgentContext) -> str:
        if ctx.prompt == "held":
            await release.wait()
        return ctx.prompt

    counting = CountingGets(plane)
    async with open_worker(
        config(max_concurrency=4),
        control_plane=counting,  # type: ignore[arg-type]
        agent=agent,
    ) as worker:
        held = await worker.submit("held")
        await wait_for(lambda: worker.stats().active == 1)
        async with trio.open_nursery() as nursery:
            outcomes: list[Outcome] = []

            async def waiter() -> None:
                outcomes.append(await worker.wait(held, poll_interval=0.01))

            nursery.start_soon(waiter)
            for n in range(5):  # each end wakes every waiter
                await worker.wait(await worker.submit(f"quick {n}"))
            gets_while_running = counting.gets[held]
            release.set()
    assert gets_while_running == 0
    assert [o.result for o in outcomes] == ["held"]


async def test_a_session_is_journalled_before_its_agent_starts(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """The journal line is queued without waiting, but ahead of the workspace on the
    same lane: the agent never runs before its session is in the journal."""
    seen: list[bool] = []

    async def agent(ctx: AgentContext) -> str:
        watcher = worker.delegations
        assert watcher is not None
        journal = watcher.journal_path.read_text() if watcher.journal_path.exists() else ""
        seen.append(ctx.session_id in journal)
        return "ok"

    async with open_worker(config(max_concurrency=4), control_plane=plane, agent=agent) as worker:
        ids = [await worker.submit(f"item {n}") for n in range(8)]
        for item_id in ids:
            assert (await worker.wait(item_id)).status is OutcomeStatus.COMPLETED
    assert seen == [True] * 8


async def test_a_process_agent_starts_on_the_worker_lane_after_its_journal_line(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real agent processes start on the worker's own lane (neither a thread per
    start nor a lane of their own), each once its session's line is in the journal."""
    starts: list[tuple[str, bool]] = []
    real_popen = subprocess.Popen

    def recording_popen(argv: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(argv, list) and argv[:1] == ["/bin/true"]:
            journal = worker.delegations.journal_path if worker.delegations else None
            text = journal.read_text() if journal is not None and journal.exists() else ""
            starts.append((threading.current_thread().name, argv[1] in text))
        return real_popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    cfg = config(max_concurrency=4, agent="/bin/true {session_id}")
    async with open_worker(cfg, control_plane=plane) as worker:
        ids = [await worker.submit(f"item {n}") for n in range(8)]
        for item_id in ids:
            assert (await worker.wait(item_id)).status is OutcomeStatus.COMPLETED
    assert starts == [("supervisor-io", True)] * 8


class StopLostOnFirstAttempt:
    """The embedded plane, except that no stop of an item's first attempt gets an answer."""

    def __init__(self, inner: EmbeddedControlPlane) -> None:
        self._inner = inner
        self.failed = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def stop(self, work_id: str, **kwargs: object) -> object:
        if (await self._inner.get(work_id)).attempts == 0:
            self.failed += 1
            raise TransientError("injected: the answer to stop was lost")
        return await self._inner.stop(work_id, **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_wait_follows_the_control_plane_when_the_final_stop_did_not_get_through(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """The first run's outcome never reached the store: the item runs again, and wait()
    returns the outcome the control plane finally recorded, not the lost one."""
    flaky = StopLostOnFirstAttempt(plane)
    cfg = config(lease_ttl=1.0, agent_grace=0.15, max_concurrency=1)
    async with open_worker(cfg, control_plane=flaky) as worker:  # type: ignore[arg-type]
        item_id = await worker.submit("twice")
        with trio.fail_after(30):
            outcome = await worker.wait(item_id, poll_interval=0.1)
        started = worker.stats().started
    assert flaky.failed >= 2  # the final stop was retried within its budget, in vain
    assert outcome.status is OutcomeStatus.COMPLETED
    assert started == 2  # the first outcome was lost, so the item ran again
    item = await plane.get(item_id)
    assert item.state is WorkState.STOPPED
    assert item.attempts == 1


async def test_presence_reports_carry_the_live_supervision_tree(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """The dashboard draws a worker's tree from ``runtime_metadata["tree"]``."""
    release = trio.Event()

    async def agent(ctx: AgentContext) -> str:
        await release.wait()
        return "done"

    async with open_worker(config(), control_plane=plane, agent=agent) as worker:
        item_id = await worker.submit("hello")
        await wait_for(lambda: worker.stats().active == 1)
        tree = worker.runtime_metadata()["tree"]
        assert tree["name"] == worker.snapshot().name == "worker"
        sessions = next(c for c in tree["children"] if c["id"] == "work")["supervisor"]
        assert f"session:{item_id}" in str(sessions)
        with trio.fail_after(20):
            while "tree" not in (await plane.get_worker(worker.worker_id)).runtime_metadata:
                await trio.sleep(0.02)
        record = await plane.get_worker(worker.worker_id)
        assert record.runtime_metadata["tree"]["name"] == tree["name"] == "worker"
        release.set()
        await worker.wait(item_id)
