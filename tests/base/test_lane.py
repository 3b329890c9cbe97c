"""ThreadLane: order, results, errors, cancellation, idle exit and close."""

from __future__ import annotations

import functools
import threading

import pytest
import trio

from supervisor.lowlevel import ThreadLane


async def test_calls_run_in_the_lane_thread_in_order_and_return_results() -> None:
    lane = ThreadLane("test-lane-1")
    seen: list[tuple[int, str]] = []

    def call(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await lane.run(call, n)

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(one, n)
            await trio.lowlevel.checkpoint()  # start_soon order is the queue order
    assert results == {n: n * 2 for n in range(50)}
    assert [n for n, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-lane-1"}
    await lane.aclose()
    assert lane.join(0)


async def test_an_exception_is_raised_in_the_caller_and_the_lane_goes_on() -> None:
    lane = ThreadLane("test-lane-2")

    def boom() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await lane.run(boom)
    assert await lane.run(len, "abc") == 3
    await lane.aclose()


async def test_a_queued_call_cancelled_never_runs() -> None:
    lane = ThreadLane("test-lane-3")
    release = threading.Event()
    ran: list[str] = []

    def block() -> str:
        release.wait(5)
        ran.append("block")
        return "block"

    def second() -> None:
        ran.append("second")

    async with trio.open_nursery() as nursery:
        first_result: list[str] = []

        async def first() -> None:
            first_result.append(await lane.run(block))

        nursery.start_soon(first)
        await trio.sleep(0.05)  # `block` is running in the lane
        with trio.move_on_after(0.05) as scope:
            await lane.run(second)  # queued behind `block`, then cancelled
        assert scope.cancelled_caught
        release.set()
    assert first_result == ["block"]
    assert await lane.run(len, "") == 0  # everything queued before this has been handled
    assert ran == ["block"]
    await lane.aclose()


async def test_a_running_call_is_waited_for_and_cancellation_comes_after() -> None:
    lane = ThreadLane("test-lane-4")
    started = threading.Event()
    done: list[str] = []
    got: list[str] = []

    def slow() -> str:
        started.set()
        threading.Event().wait(0.1)
        done.append("slow")
        return "slow"

    with trio.CancelScope() as scope:

        async def cancel_when_started() -> None:
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_started)
            got.append(await lane.run(slow))  # the result comes back...
            await trio.lowlevel.checkpoint()  # ...and the cancellation at the next checkpoint
            got.append("not cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert got == ["slow"]
    assert done == ["slow"]
    await lane.aclose()


async def test_an_already_cancelled_caller_queues_nothing() -> None:
    lane = ThreadLane("test-lane-5")
    ran: list[int] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await lane.run(ran.append, 1)
    assert scope.cancelled_caught
    assert ran == []
    assert lane.join(0)  # no thread was even started
    await lane.aclose()


async def test_an_idle_thread_exits_and_a_new_call_starts_another() -> None:
    lane = ThreadLane("test-lane-idle", idle_timeout=0.05)
    assert await lane.run(len, "a") == 1
    await trio.sleep(0.3)
    assert not any(t.name == "test-lane-idle" for t in threading.enumerate())
    assert await lane.run(len, "ab") == 2
    assert any(t.name == "test-lane-idle" for t in threading.enumerate())  # a new thread
    await lane.aclose()
    assert not any(t.name == "test-lane-idle" for t in threading.enumerate())


async def test_close_finishes_queued_calls_then_refuses_new_ones() -> None:
    lane = ThreadLane("test-lane-6")
    results: list[int] = []

    async def one(n: int) -> None:
        results.append(await lane.run(int, n))

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(one, n)
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        await lane.aclose()
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert lane.closed
    with pytest.raises(RuntimeError, match="closed"):
        await lane.run(int, 1)
    assert not any(t.name == "test-lane-6" and t.is_alive() for t in threading.enumerate())


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        ThreadLane("x", idle_timeout=0)


async def test_a_thread_that_cannot_start_raises_and_the_next_call_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lane = ThreadLane("test-lane-7")
    real_start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran: list[str] = []
    with pytest.raises(RuntimeError, match="can't start"):
        await lane.run(ran.append, "refused")
    monkeypatch.setattr(threading.Thread, "start", real_start)
    await lane.run(ran.append, "second")
    assert ran == ["second"]  # the refused call was dropped, not run later
    await lane.aclose()


async def test_submitted_calls_run_in_order_and_a_later_run_waits_for_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lane = ThreadLane("test-lane-submit")
    seen: list[tuple[int, str]] = []
    gate = threading.Event()

    def first() -> None:
        gate.wait(5)  # holds the lane: the submits below queue behind it
        seen.append((0, threading.current_thread().name))

    def failing() -> None:
        raise ValueError("a write failed")

    def note(n: int) -> None:
        seen.append((n, threading.current_thread().name))

    lane.submit(first)
    for n in range(1, 4):
        lane.submit(functools.partial(note, n))
    lane.submit(failing)
    assert seen == []  # submit returned at once
    gate.set()
    assert await lane.run(len, seen) == 4  # the barrier: everything queued before ran
    assert seen == [(n, "test-lane-submit") for n in range(4)]
    assert "a queued call in a thread lane failed" in caplog.text
    await lane.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(first)
