"""What only the embedded control plane promises: long-poll timing under MockClock, wake-ups,
its clock, its lifecycle and ``open_embedded_control_plane``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from supervisor import ControlPlaneError
from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    ControlPlane,
    EmbeddedControlPlane,
    LeasePolicy,
    SQLiteStore,
    WorkState,
    open_embedded_control_plane,
)
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.testing import ManualClock

T0 = 1_700_000_000.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / STORE_FILENAME


# --- long poll under the mock clock ---------------------------------------------------


async def test_a_long_poll_on_an_empty_queue_waits_exactly_block_ms(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with EmbeddedControlPlane(db, threaded=False, poll_interval=0.25) as cp:
        start = trio.current_time()
        assert await cp.poll(worker_id="w1", block_ms=5000) is None
        assert trio.current_time() - start == pytest.approx(5.0)


async def test_a_long_poll_wakes_at_once_on_a_submit_through_the_same_store(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with EmbeddedControlPlane(db, threaded=False, poll_interval=30.0) as cp:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def submit_later() -> None:
                await trio.sleep(1.0)
                await cp.submit("hello")

            nursery.start_soon(submit_later)
            item = await cp.poll(worker_id="w1", block_ms=60_000)
        assert item is not None
        assert trio.current_time() - start == pytest.approx(1.0)


async def test_a_submit_through_another_control_plane_on_the_same_store_wakes_the_poller(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SQLiteStore(db)
    try:
        poller_side = EmbeddedControlPlane(store, threaded=False, poll_interval=30.0)
        submit_side = EmbeddedControlPlane(store, threaded=False)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def submit_later() -> None:
                await trio.sleep(2.0)
                await submit_side.submit("hello")

            nursery.start_soon(submit_later)
            assert await poller_side.poll(worker_id="w1", block_ms=60_000) is not None
        assert trio.current_time() - start == pytest.approx(2.0)
        await poller_side.aclose()
        await submit_side.aclose()
        assert not store.closed  # a shared store belongs to whoever opened it
    finally:
        store.close()


async def test_a_submit_from_another_process_is_seen_at_the_next_recheck(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Another store object stands in for another process: no wake-up, only re-checks."""
    other = SQLiteStore(db)
    try:
        async with EmbeddedControlPlane(db, threaded=False, poll_interval=0.5) as cp:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def submit_later() -> None:
                    await trio.sleep(1.2)
                    other.submit("default", "from elsewhere", now=T0)

                nursery.start_soon(submit_later)
                assert await cp.poll(worker_id="w1", block_ms=60_000) is not None
            assert trio.current_time() - start == pytest.approx(1.5)
    finally:
        other.close()


async def test_a_submit_to_another_environment_does_not_end_the_wait(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SQLiteStore(db)
    try:
        cp = EmbeddedControlPlane(store, threaded=False, poll_interval=0.25)
        elsewhere = EmbeddedControlPlane(store, environment_id="other", threaded=False)
        async with trio.open_nursery() as nursery:

            async def submit_later() -> None:
                await trio.sleep(1.0)
                await elsewhere.submit("not for you")

            nursery.start_soon(submit_later)
            assert await cp.poll(worker_id="w1", block_ms=3000) is None
        assert (await elsewhere.stats()).depth == 1
    finally:
        store.close()


async def test_a_cancelled_long_poll_claims_nothing(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with EmbeddedControlPlane(db, threaded=False) as cp:
        with trio.move_on_after(1.0) as scope:
            await cp.poll(worker_id="w1", block_ms=10_000)
        assert scope.cancelled_caught
        item = await cp.submit("after")
        assert (await cp.poll(worker_id="w2")) is not None
        assert (await cp.get(item.id)).state is WorkState.QUEUED


@pytest.mark.parametrize("block_ms", [-1, 60_001, True, 1.5])
async def test_an_unusable_block_ms_is_a_bad_request(db: Path, block_ms: object) -> None:
    async with EmbeddedControlPlane(db, threaded=False) as cp:
        with pytest.raises(BadRequest, match="block_ms"):
            await cp.poll(worker_id="w1", block_ms=block_ms)  # type: ignore[arg-type]


async def test_a_threaded_long_poll_is_woken_from_a_worker_thread(db: Path) -> None:
    """Real threads: the wake-up crosses back into Trio instead of waiting a poll interval."""
    async with EmbeddedControlPlane(db, threaded=True, poll_interval=60.0) as cp:
        with trio.fail_after(20):  # far below the 60 s a missed wake-up would cost
            async with trio.open_nursery() as nursery:

                async def submit_soon() -> None:
                    await trio.sleep(0.05)
                    await cp.submit("hello")

                nursery.start_soon(submit_soon)
                assert await cp.poll(worker_id="w1", block_ms=60_000) is not None


# --- clocks ------------------------------------------------------------------------------


async def test_the_clock_is_read_per_call_and_recorded_by_the_store(db: Path) -> None:
    clock = ManualClock(T0)
    async with EmbeddedControlPlane(db, clock=clock, threaded=False) as cp:
        item = await cp.submit("x")
        assert item.created_at == T0
        clock.advance(12.5)
        assert await cp.poll(worker_id="w1") is not None
        assert (await cp.ack(item.id, worker_id="w1")).acknowledged_at == T0 + 12.5


async def test_under_mock_clock_a_lease_renewed_on_time_lives_and_an_abandoned_one_expires(
    db: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Trio's mock time drives the store clock: ten minutes of leases in no real time."""
    policy = LeasePolicy(default_ttl=30.0)
    async with EmbeddedControlPlane(
        db, clock=lambda: T0 + trio.current_time(), threaded=False, lease_policy=policy
    ) as cp:
        item = await cp.submit("x")
        assert await cp.poll(worker_id="w1") is not None
        await cp.ack(item.id, worker_id="w1")
        token = NO_HEARTBEAT
        for _ in range(60):
            token = (await cp.heartbeat(item.id, expected_last_heartbeat=token)).last_heartbeat
            await trio.sleep(10)
        assert (await cp.get(item.id)).state is WorkState.ACTIVE
        await trio.sleep(20)  # 30 s since the last beat: the lease is gone
        assert (await cp.get(item.id)).attempts == 1


# --- lifecycle ----------------------------------------------------------------------------


async def test_it_is_a_control_plane(db: Path) -> None:
    async with EmbeddedControlPlane(db, threaded=False) as cp:
        assert isinstance(cp, ControlPlane)
        assert cp.environment_id == "default"
        assert cp.store.path == str(db)
        assert str(db) in repr(cp)


async def test_aclose_is_idempotent_and_later_calls_are_refused(db: Path) -> None:
    cp = EmbeddedControlPlane(db)
    await cp.submit("x")
    await cp.aclose()
    await cp.aclose()
    assert cp.store.closed
    assert "closed" in repr(cp)
    with pytest.raises(ControlPlaneError, match="closed"):
        await cp.submit("y")


async def test_the_session_secret_is_verified_through_the_control_plane(db: Path) -> None:
    async with EmbeddedControlPlane(db) as cp:
        item = await cp.submit("x")
        polled = await cp.poll(worker_id="w1")
        assert polled is not None
        assert polled.secret is not None
        assert await cp.verify_session_secret(item.data.id, polled.secret)
        assert not await cp.verify_session_secret(item.data.id, "guess")


async def test_policies_cannot_be_given_with_an_open_store(db: Path) -> None:
    store = SQLiteStore(db)
    try:
        with pytest.raises(ValueError, match="policies"):
            EmbeddedControlPlane(store, lease_policy=LeasePolicy())
        with pytest.raises(ValueError, match="poll_interval"):
            EmbeddedControlPlane(store, poll_interval=0)
    finally:
        store.close()


@pytest.mark.parametrize("threaded", [True, False])
async def test_open_embedded_control_plane_creates_the_state_dir_and_closes_on_exit(
    tmp_path: Path, threaded: bool
) -> None:
    state_dir = tmp_path / "nested" / ".supervisor"
    async with open_embedded_control_plane(state_dir, threaded=threaded) as cp:
        item = await cp.submit("x")
    assert (state_dir / STORE_FILENAME).is_file()
    with pytest.raises(ControlPlaneError, match="closed"):
        await cp.get(item.id)
    async with open_embedded_control_plane(state_dir, threaded=threaded) as again:
        assert (await again.get(item.id)).data.prompt == "x"


async def test_open_embedded_control_plane_closes_the_store_when_cancelled(
    tmp_path: Path,
) -> None:
    with trio.CancelScope() as scope:
        async with open_embedded_control_plane(tmp_path) as cp:
            scope.cancel()
            await trio.sleep_forever()
    assert cp.store.closed
