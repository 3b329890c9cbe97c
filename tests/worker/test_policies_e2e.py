"""Work policies end to end: retry, dead letter, priority, delay.

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
from supervisor.controlplane import EmbeddedControlPlane, OutcomeStatus, RetryPolicy, WorkState
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
    # The store reads the same clock with another offset: allow float rounding only.
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
