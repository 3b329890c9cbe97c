"""Worker bounds the simulator and the soak benchmark called for: claim timing, kept records.

In-process agents, ``MemoryWorkspaces`` and the embedded control plane with
its store calls in the Trio thread, under ``autojump_clock``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import supervisor._worker._worker as worker_module
from supervisor import AgentContext, Worker, WorkerConfig
from supervisor.controlplane import EmbeddedControlPlane, LeasePolicy, OutcomeStatus
from supervisor.testing import Fault, FaultKind, FaultyControlPlane, MemoryWorkspaces


@pytest.fixture
def store_options() -> dict[str, Any]:
    return {"lease_policy": LeasePolicy(default_ttl=10.0, min_ttl=0.5)}


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {"poll_block_ms": 500, "lease_ttl": 10.0}


async def test_worker_remembers_only_the_last_finished_sessions(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records beyond the cap are forgotten oldest first, in batches; wait() still answers."""
    monkeypatch.setattr(worker_module, "_FINISHED_KEPT", 3)
    monkeypatch.setattr(worker_module, "_FORGET_BATCH", 2)

    async def agent(ctx: AgentContext) -> str:
        await trio.sleep(1.0)
        return f"done {ctx.prompt}"

    worker = Worker(
        config(max_concurrency=1),
        control_plane=plane,
        agent=agent,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        ids = [await plane.submit(f"task {n}") for n in range(6)]
        outcomes = [await worker.wait(item.id) for item in ids]
        kept = [record.work_id for record in worker.sessions()]
        first = await worker.wait(ids[0].id)
        nursery.cancel_scope.cancel()
    assert [o.status for o in outcomes] == [OutcomeStatus.COMPLETED] * 6
    assert kept == [item.id for item in ids[3:]]
    assert first.status is OutcomeStatus.COMPLETED and first.result == "done task 0"


async def test_worker_abandons_claims_whose_ack_answers_later_than_a_fifth_of_the_ttl(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With answers 3 s late and a 10 s ttl, no session starts until the latency ends."""
    started: list[float] = []

    async def agent(ctx: AgentContext) -> str:
        started.append(trio.current_time())
        return "ok"

    slow = Fault(FaultKind.LATENCY, 0, 0.0, duration=30.0, response_delay=(3.0, 3.0))
    link = FaultyControlPlane(plane, [slow], rng=random.Random(0))
    worker = Worker(
        config(),
        control_plane=link,
        agent=agent,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    item = await plane.submit("task")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        outcome = await worker.wait(item.id)
        nursery.cancel_scope.cancel()
    assert outcome.status is OutcomeStatus.COMPLETED
    assert started and min(started) >= 30.0
    assert (await plane.get(item.id)).attempts >= 1  # the abandoned claims' ack leases ran out
