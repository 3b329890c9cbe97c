"""Work policies end to end: retry, dead letter, priority, delay, keys, routing labels,
per-item timeouts.

A real worker, real agent processes, a real SQLite file (the delay under MockClock).

The agents are `tests/agents/flaky.py` (fails its first N runs) and `crash.py`
(always exits 3). Backoffs are a fraction of a second, so the real clock is
fine; what is asserted is order (each attempt starts after the previous one's
``retry_at``), never speed.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor import AgentContext, ThreadedWorker, Worker, WorkerConfig, open_worker
from supervisor.controlplane import (
    BadRequest,
    EmbeddedControlPlane,
    OutcomeStatus,
    RetryPolicy,
    WorkState,
)
from supervisor.testing import MemoryWorkspaces

AGENTS = Path(__file__).resolve().parents[1] / "agents"


def flaky(counter: Path, failures: int) -> str:
    return " ".join([sys.executable, str(AGENTS / "flaky.py"), str(counter), str(failures)])


@pytest.mark.slow
async def test_an_item_failing_twice_then_succeeding_completes_with_three_attempts(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane, tmp_path: Path
) -> None:
    counter = tmp_path / "runs.json"
    policy = RetryPolicy(max_attempts=3, backoff=0.3)
    async with open_worker(config(agent=flaky(counter, 2)), control_plane=plane) as worker:
        item_id = await worker.submit("flaky task", retry=policy)
        outcome = await worker.wait(item_id)
    assert outcome.status is OutcomeStatus.COMPLETED
    assert outcome.result == "succeeded on run 3"
    item = await plane.get(item_id)
    assert (item.state, item.dead, item.attempts) == (WorkState.STOPPED, False, 2)
    history = item.history
    assert [(a.attempt, a.outcome.status, a.outcome.exit_code) for a in history] == [
        (1, OutcomeStatus.FAILED, 1),
        (2, OutcomeStatus.FAILED, 1),
        (3, OutcomeStatus.COMPLETED, 0),
    ]
    runs = json.loads(counter.read_text())
    assert len(runs) == 3
    # Backoff between attempts: at least half of 0.3 s, then half of 0.6 s.
    for failed, step in zip(history[:2], (0.3, 0.6), strict=True):
        assert failed.retry_at is not None
        assert failed.retry_at - failed.ended_at >= step / 2 - 1e-3
    assert runs[1] - runs[0] >= 0.15
    assert runs[2] - runs[1] >= 0.3


@pytest.mark.slow
async def test_a_failing_item_lands_in_dead_letter_and_retry_brings_it_back(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane, tmp_path: Path
) -> None:
    counter = tmp_path / "runs.json"
    policy = RetryPolicy(max_attempts=2, backoff=0.1)
    async with open_worker(config(agent=flaky(counter, 2)), control_plane=plane) as worker:
        item_id = await worker.submit("fails twice", retry=policy)
        outcome = await worker.wait(item_id)
        assert (outcome.status, outcome.exit_code) == (OutcomeStatus.FAILED, 1)
        dead = await plane.get(item_id)
        assert (dead.state, dead.dead, dead.attempts, len(dead.history)) == (
            WorkState.STOPPED,
            True,
            2,
            2,
        )
        assert [i.id for i in await plane.list_work(dead=True)] == [item_id]
        back = await worker.retry(item_id)
        assert (back.state, back.dead, back.attempts) == (WorkState.QUEUED, False, 0)
        again = await worker.wait(item_id)
    assert again.status is OutcomeStatus.COMPLETED
    final = await plane.get(item_id)
    assert [a.outcome.status for a in final.history] == ["failed", "failed", "completed"]
    assert await plane.list_work(dead=True) == []


@pytest.mark.slow
def test_a_threaded_worker_handle_resolves_with_the_items_final_outcome(
    tmp_path: Path, config: Callable[..., WorkerConfig]
) -> None:
    counter = tmp_path / "runs.json"
    cfg = config(agent=flaky(counter, 1))
    with ThreadedWorker(cfg) as worker:
        handle = worker.submit("once more", retry=RetryPolicy(max_attempts=2, backoff=0.1))
        outcome = handle.result(timeout=60)
    assert outcome.status is OutcomeStatus.COMPLETED
    assert len(json.loads(counter.read_text())) == 2


# --- priority and not_before ------------------------------------------------------------


@pytest.mark.slow
async def test_a_higher_priority_overtakes_fifo_with_real_agents(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """Queued before the worker starts; one slot: the claim order is priority, then age."""
    ok = " ".join([sys.executable, str(AGENTS / "ok.py"), "{prompt}"])
    first = await plane.submit("first in")
    second = await plane.submit("second in")
    urgent = await plane.submit("urgent", priority=10)
    async with open_worker(config(agent=ok, max_concurrency=1), control_plane=plane) as worker:
        for item in (first, second, urgent):
            assert (await worker.wait(item.id)).status is OutcomeStatus.COMPLETED
    started = {i.id: i.started_at for i in await plane.list_work()}
    order = sorted(started, key=lambda work_id: started[work_id] or 0.0)
    assert order == [urgent.id, first.id, second.id]


async def test_a_delayed_item_waits_for_its_time_while_others_run(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under MockClock: the worker serves the undelayed item and claims the delayed one
    only once its time has come."""
    claimed_at: dict[str, float] = {}

    async def agent(ctx: AgentContext) -> str:
        claimed_at[ctx.prompt] = trio.current_time()
        await trio.sleep(1.0)
        return ctx.prompt

    worker = Worker(
        config(max_concurrency=2),
        control_plane=plane,
        agent=agent,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        start = trio.current_time()
        later = await worker.submit("later", delay=120.0)
        now = await worker.submit("now")
        assert (await worker.wait(now)).status is OutcomeStatus.COMPLETED
        assert "later" not in claimed_at
        assert (await worker.wait(later)).status is OutcomeStatus.COMPLETED
        nursery.cancel_scope.cancel()
    assert claimed_at["now"] - start < 5.0
    # Within float rounding: the store compares times around 1.7e9 (an ulp is ~2e-7 s).
    assert claimed_at["later"] - start >= 120.0 - 1e-6


@pytest.mark.slow
def test_threaded_worker_handles_of_one_key_follow_the_same_item(
    tmp_path: Path, config: Callable[..., WorkerConfig]
) -> None:
    ok = " ".join([sys.executable, str(AGENTS / "ok.py"), "{prompt}"])
    with ThreadedWorker(config(agent=ok)) as worker:
        first = worker.submit("nightly report", key="report-2030-01-01")
        second = worker.submit("nightly report, again", key="report-2030-01-01")
        # The handles submit concurrently: whichever came first made the one item.
        outcome = first.result(timeout=60)
        assert outcome.result in ("done: nightly report", "done: nightly report, again")
        assert second.result(timeout=60) == outcome
    assert first.item_id is not None and first.item_id == second.item_id


async def test_a_duplicate_key_returns_the_same_id_from_python(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    ok = " ".join([sys.executable, str(AGENTS / "ok.py"), "{prompt}"])
    async with open_worker(config(agent=ok), control_plane=plane) as worker:
        first = await worker.submit("deploy 42", key="deploy-42")
        assert await worker.submit("deploy 42 again", key="deploy-42") == first
        assert await worker.submit("deploy 43", key="deploy-43") != first
        assert (await worker.wait(first)).result == "done: deploy 42"
    assert len(await plane.list_work()) == 2


# --- routing labels -----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_labelled_item_waits_for_a_worker_with_its_labels_while_others_are_served(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane, tmp_path: Path
) -> None:
    ok = " ".join([sys.executable, str(AGENTS / "ok.py"), "{prompt}"])
    routed = await plane.submit("train the model", labels=["gpu", "repo:foo"])
    plain = [await plane.submit(f"lint {n}") for n in range(3)]
    unlabelled = config(agent=ok, worker_id="plain", state_dir=tmp_path / "plain")
    async with open_worker(unlabelled, control_plane=plane) as first:
        for item in plain:
            assert (await first.wait(item.id)).status is OutcomeStatus.COMPLETED
        # The labelled item is older than all of them and still nobody's.
        waiting = await plane.get(routed.id)
        assert (waiting.state, waiting.acknowledged_at, waiting.worker_id) == (
            WorkState.QUEUED,
            None,
            None,
        )
        # A worker with only one of its labels does not take it either.
        half = config(
            agent=ok, worker_id="gpu-only", labels=["gpu"], state_dir=tmp_path / "gpu-only"
        )
        async with open_worker(half, control_plane=plane) as second:
            late = await second.submit("lint late")
            assert (await second.wait(late)).status is OutcomeStatus.COMPLETED
            assert (await plane.get(routed.id)).state is WorkState.QUEUED
        labelled = config(
            agent=ok,
            worker_id="gpu-foo",
            labels=["repo:foo", "gpu", "cpu"],
            state_dir=tmp_path / "gpu-foo",
        )
        async with open_worker(labelled, control_plane=plane) as third:
            outcome = await third.wait(routed.id)
            assert (outcome.status, outcome.result) == (
                OutcomeStatus.COMPLETED,
                "done: train the model",
            )
            # Presence reports the labels from the worker's settings (sorted).
            record = await plane.get_worker("gpu-foo")
            assert record.runtime_metadata["labels"] == ["cpu", "gpu", "repo:foo"]
        assert (await plane.get_worker("plain")).runtime_metadata["labels"] == []
    by_id = {item.id: item for item in await plane.list_work()}
    assert by_id[routed.id].worker_id == "gpu-foo"
    assert {by_id[item.id].worker_id for item in plain} == {"plain"}


def test_threaded_worker_submit_routes_by_labels_and_refuses_bad_ones_at_once(
    tmp_path: Path, config: Callable[..., WorkerConfig]
) -> None:
    ok = " ".join([sys.executable, str(AGENTS / "ok.py"), "{prompt}"])
    with ThreadedWorker(config(agent=ok, labels=["gpu"])) as worker:
        handle = worker.submit("render", labels=["gpu"])
        outcome = handle.result(timeout=60)
        assert outcome.status is OutcomeStatus.COMPLETED
        with pytest.raises(BadRequest, match="bad label"):
            worker.submit("never", labels=["no spaces allowed"])
        with pytest.raises(BadRequest, match="timeout"):
            worker.submit("never", timeout=-1)


# --- per-item timeout ---------------------------------------------------------------------


@pytest.mark.slow
async def test_an_items_timeout_replaces_the_workers_session_timeout(
    config: Callable[..., WorkerConfig], plane: EmbeddedControlPlane
) -> None:
    """A real agent sleeping ``{prompt}`` seconds: timeout=1 stops a 30 s sleeper in about a
    second with outcome timeout; timeout=5 lets a 1 s sleeper finish although the worker's
    own session_timeout (0.5 s) would have stopped it; without one, 0.5 s holds."""
    sleeper = " ".join([sys.executable, str(AGENTS / "slow_ok.py"), "{prompt}"])
    settings = config(agent=sleeper, session_timeout=0.5, max_concurrency=3, agent_grace=1.0)
    async with open_worker(settings, control_plane=plane) as worker:
        started = trio.current_time()
        bounded = await worker.submit("30", timeout=1)
        longer = await worker.submit("1.0", timeout=5)
        default = await worker.submit("1.0")
        outcomes = {
            "bounded": await worker.wait(bounded),
            "longer": await worker.wait(longer),
            "default": await worker.wait(default),
        }
        took = trio.current_time() - started
    assert outcomes["bounded"].status is OutcomeStatus.TIMEOUT
    assert outcomes["bounded"].duration is not None and 0.9 <= outcomes["bounded"].duration < 3
    assert (outcomes["longer"].status, outcomes["longer"].result) == (
        OutcomeStatus.COMPLETED,
        "slept 1.0",
    )
    assert outcomes["default"].status is OutcomeStatus.TIMEOUT
    assert took < 3.0
    stored = await plane.get(bounded)
    assert stored.timeout == 1.0
    assert stored.outcome is not None and stored.outcome.status is OutcomeStatus.TIMEOUT


async def test_an_items_timeout_bounds_an_in_process_agent_under_mock_clock(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
) -> None:
    began: dict[str, float] = {}
    ended: dict[str, float] = {}

    async def agent(ctx: AgentContext) -> str:
        began[ctx.work_id] = trio.current_time()
        try:
            await trio.sleep(float(ctx.prompt))
        finally:
            ended[ctx.work_id] = trio.current_time()
        return "slept"

    worker = Worker(
        config(session_timeout=3600.0),
        control_plane=plane,
        agent=agent,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        bounded = await worker.submit("600", timeout=5)
        free = await worker.submit("60")
        assert (await worker.wait(bounded)).status is OutcomeStatus.TIMEOUT
        assert (await worker.wait(free)).status is OutcomeStatus.COMPLETED
        nursery.cancel_scope.cancel()
    assert ended[bounded] - began[bounded] == pytest.approx(5.0, abs=0.01)
    assert ended[free] - began[free] == pytest.approx(60.0, abs=0.01)
