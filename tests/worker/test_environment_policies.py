"""The environment policies seen from a worker: backpressure, retention, default retries.

`Worker.submit` raises `QueueFull`; `ThreadedWorker.submit` fails its handle with
it; a worker writes the policies its configuration gives and sweeps retention on
the store it holds (under MockClock); the reference server sweeps its store too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor import QueueFull, ThreadedWorker, Worker, WorkerConfig
from supervisor.controlplane import (
    EmbeddedControlPlane,
    EnvironmentSettings,
    NotFound,
    RetryPolicy,
    SQLiteStore,
)
from supervisor.controlplane._retention import run_retention_sweep, sweep_once
from supervisor.controlplane._server import serve_control_plane
from supervisor.testing import MemoryWorkspaces

KEY = "environment-policies-key-0123456789"


async def never_runs(ctx: object) -> str:
    raise AssertionError("nothing is claimed in these tests")


async def test_worker_submit_raises_queue_full_past_the_cap(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The items are delayed, so the worker's poller leaves them queued.
    worker = Worker(
        config(max_queue_depth=2),
        control_plane=plane,
        agent=never_runs,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        assert (await plane.environment_settings()).max_queue_depth == 2
        first = await worker.submit("one", delay=3600.0, key="k-1")
        await worker.submit("two", delay=3600.0)
        with pytest.raises(QueueFull) as refused:
            await worker.submit("three", delay=3600.0)
        assert (refused.value.depth, refused.value.max_queue_depth) == (2, 2)
        # An idempotency key already used still answers with its item.
        assert await worker.submit("one again", delay=3600.0, key="k-1") == first
        assert len(await plane.list_work()) == 2
        assert (await plane.get(first)).data.prompt == "one"
        nursery.cancel_scope.cancel()


def test_threaded_worker_fails_the_handle_of_a_refused_submit(
    config: Callable[..., WorkerConfig],
) -> None:
    with ThreadedWorker(config(max_queue_depth=1), agent=never_runs) as worker:
        filled = worker.submit("fills the queue", delay=3600.0)
        # Submits run as concurrent tasks of the worker's loop: in order only if awaited.
        deadline = time.monotonic() + 30
        while filled.item_id is None:
            assert time.monotonic() < deadline, "the first submit never landed"
            time.sleep(0.01)
        refused = worker.submit("one too many", delay=3600.0)
        with pytest.raises(QueueFull, match=r"^queue full: environment default holds 1 queued"):
            refused.result(timeout=30)
        assert refused.done() and refused.item_id is None


async def test_the_worker_sweeps_retention_on_its_own_store(
    config: Callable[..., WorkerConfig],
    plane: EmbeddedControlPlane,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Stopped items go once older than the retention, within one sweep interval."""
    worker = Worker(
        config(retention="10m", retention_sweep_interval=30.0, default_max_attempts=2),
        control_plane=plane,
        agent=never_runs,
        workspaces=MemoryWorkspaces(),
        rng=random.Random(0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        settings = await plane.environment_settings()
        assert settings == EnvironmentSettings(retention=600.0, max_attempts=2)
        cancelled = await worker.submit("cancelled at once", delay=3600.0)
        assert (await plane.get(cancelled)).retry == RetryPolicy(max_attempts=2)
        await worker.cancel(cancelled)
        kept = await worker.submit("still queued", delay=3600.0)
        await trio.sleep(590.0)
        await plane.get(cancelled)  # younger than the retention: kept
        # Past it, gone by the next sweep (the sweeps' phase depends on when the
        # worker's start let the clock jump: allow a second interval).
        gone_by = trio.current_time() + 10.0 + 2 * 30.0
        while True:
            try:
                await plane.get(cancelled)
            except NotFound:
                break
            assert trio.current_time() < gone_by, "not purged a sweep interval past its retention"
            await trio.sleep(1.0)
        assert trio.current_time() >= 600.0
        assert (await plane.get(kept)).data.prompt == "still queued"
        nursery.cancel_scope.cancel()


async def test_a_sweep_batches_until_one_comes_back_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[int] = []
    left = [7]

    async def purge(limit: int) -> int:
        calls.append(limit)
        deleted = min(limit, left[0])
        left[0] -= deleted
        return deleted

    assert await sweep_once(purge, batch=3) == 7
    assert calls == [3, 3, 3]
    with pytest.raises(ValueError, match="interval"):
        await run_retention_sweep(purge, interval=0)


async def test_the_server_sweeps_its_store(tmp_path: Path) -> None:
    """The reference server over a store runs the sweep (here every 0.05 s)."""
    store = SQLiteStore(tmp_path / "cp.sqlite3")
    try:
        old = store.submit("default", "old", now=time.time() - 100.0)
        store.request_stop("default", old.id, now=time.time() - 100.0)
        young = store.submit("default", "young", now=time.time())
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_control_plane,
                    store,
                    key_provider=KEY,
                    environment_settings={"retention": 50.0},
                    retention_sweep_interval=0.05,
                )
            )
            with trio.fail_after(10):
                while any(i.id == old.id for i in store.list_work("default", now=time.time())):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert [i.id for i in store.list_work("default", now=time.time())] == [young.id]
        assert store.environment_defaults.retention == 50.0
    finally:
        store.close()
