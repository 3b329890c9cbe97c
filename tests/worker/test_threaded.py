"""``ThreadedWorker`` from plain threads, with real agents and a real SQLite file."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor import (
    AgentContext,
    ConfigError,
    ResultTimeout,
    ThreadedWorker,
    WorkCancelled,
    WorkerConfig,
)
from supervisor.controlplane import OutcomeStatus

AGENTS = Path(__file__).resolve().parents[1] / "agents"


def agent_cmd(name: str, *extra: str) -> str:
    return " ".join([sys.executable, str(AGENTS / f"{name}.py"), *extra])


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {
        "max_concurrency": 3,
        "agent": agent_cmd("ok", "{prompt}"),
        "agent_grace": 0.3,
        "drain_timeout": 0.5,
        "worker_id": "threaded",
    }


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_handles_resolve_with_the_outcome(config: Callable[..., WorkerConfig]) -> None:
    with ThreadedWorker(config()) as tw:
        handles = [tw.submit(f"job {n}", origin="test") for n in range(3)]
        outcomes = [h.result(timeout=30) for h in handles]
    assert [o.status for o in outcomes] == [OutcomeStatus.COMPLETED] * 3
    assert outcomes[1].result == "done: job 1"
    assert all(h.done() for h in handles)
    assert all(h.item_id for h in handles)


@pytest.mark.slow
def test_submit_never_blocks_and_result_times_out(config: Callable[..., WorkerConfig]) -> None:
    with ThreadedWorker(config(agent=agent_cmd("hang"))) as tw:
        started = time.monotonic()
        handle = tw.submit("wait for ever")
        assert time.monotonic() - started < 0.1
        with pytest.raises(ResultTimeout) as info:
            handle.result(timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert not handle.done()
        tw.stop(drain=False)


@pytest.mark.slow
def test_stop_with_three_hanging_sessions_fails_every_handle(
    config: Callable[..., WorkerConfig],
) -> None:
    """stop() returns within the drain timeout (+ agent grace); all handles raise WorkCancelled."""
    tw = ThreadedWorker(config(agent=agent_cmd("hang"), drain_timeout=0.5))
    tw.start()
    handles = [tw.submit(f"hang {n}") for n in range(3)]
    deadline = time.monotonic() + 15
    while tw.worker is not None and tw.worker.stats().active < 3:
        assert time.monotonic() < deadline, "sessions did not start"
        time.sleep(0.02)
    started = time.monotonic()
    tw.stop()
    assert time.monotonic() - started < 0.5 + 0.3 + 2.0  # drain + grace + slack for teardown
    for handle in handles:
        with pytest.raises(WorkCancelled):
            handle.result(timeout=1)


@pytest.mark.slow
def test_stop_answers_the_handle_of_an_item_that_never_started(
    config: Callable[..., WorkerConfig],
) -> None:
    """Three hanging items, two slots: the third is still queued when stop() comes.

    Its handle was dropped by the cancelled serving task without an answer, so
    its result() waited until the timeout; now every handle raises at once.
    """
    tw = ThreadedWorker(config(agent=agent_cmd("hang"), max_concurrency=2))
    tw.start()
    handles = [tw.submit(f"hang {n}") for n in range(3)]
    deadline = time.monotonic() + 15
    while tw.worker is not None and tw.worker.stats().active < 2:
        assert time.monotonic() < deadline, "sessions did not start"
        time.sleep(0.02)
    assert tw.worker is not None and tw.worker.stats().active == 2
    tw.stop()
    for handle in handles:
        assert handle.done(), "stop() returned with a handle still unanswered"
        with pytest.raises(WorkCancelled, match="stop"):
            handle.result(timeout=5)


@pytest.mark.slow
def test_cancel_stops_the_session(config: Callable[..., WorkerConfig]) -> None:
    with ThreadedWorker(config(agent=agent_cmd("hang"))) as tw:
        handle = tw.submit("hang")
        deadline = time.monotonic() + 15
        while handle.item_id is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert handle.cancel() is True
        with pytest.raises(WorkCancelled, match="cancelled by the caller"):
            handle.result(timeout=1)
        assert handle.cancel() is False
        while tw.worker is not None and tw.worker.stats().active:
            assert time.monotonic() < deadline, "the cancelled session did not stop"
            time.sleep(0.02)


def test_start_errors_surface_from_start(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    tw = ThreadedWorker(config(state_dir=blocker / "state"))
    with pytest.raises(ConfigError, match="state_dir"):
        tw.start()
    assert not tw.running
    bad_agent = ThreadedWorker(config(agent="no_such_module_xyz:agent"))
    with pytest.raises(ConfigError, match="agent"):
        bad_agent.start()


def test_an_unknown_worker_option_is_refused_when_the_worker_is_made(
    config: Callable[..., WorkerConfig],
) -> None:
    """Not later, in the background thread, when the worker would start."""
    with pytest.raises(TypeError, match="keeper_option"):
        ThreadedWorker(config(), keeper_option={"rng": None})  # type: ignore[call-arg]


def test_submit_on_a_stopped_worker_fails_the_handle_at_once(
    config: Callable[..., WorkerConfig],
) -> None:
    handle = ThreadedWorker(config()).submit("nobody home")
    assert handle.done()
    with pytest.raises(WorkCancelled, match="not running"):
        handle.result()


def test_blocking_calls_from_the_loop_thread_raise(config: Callable[..., WorkerConfig]) -> None:
    errors: list[str] = []
    tw: ThreadedWorker

    async def agent(ctx: AgentContext) -> str:
        for call in (lambda: tw.stop(), lambda: handle.result(timeout=1)):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        return "ok"

    tw = ThreadedWorker(config(), agent=agent)
    with tw:
        handle = tw.submit("call back")
        assert handle.result(timeout=30).status is OutcomeStatus.COMPLETED
    assert len(errors) == 2
    assert all("would deadlock" in e for e in errors)


@pytest.mark.slow
def test_repeated_start_stop_leaks_no_threads_or_fds(config: Callable[..., WorkerConfig]) -> None:
    async def agent(ctx: AgentContext) -> str:
        return ctx.prompt

    tw = ThreadedWorker(config(), agent=agent)
    tw.start()
    assert tw.submit("warm up").result(timeout=30).result == "warm up"
    tw.stop()
    threads_before = {t.ident for t in threading.enumerate()}
    # The worker's lanes are gone once stop() returns; a lane another test left
    # idling in this process (it exits after its idle timeout) is not this worker's.
    ours_before = [t for t in threading.enumerate() if t.name.startswith("supervisor-")]
    fds_before = fd_count()
    for n in range(5):
        tw.start()
        assert tw.submit(f"round {n}").result(timeout=30).result == f"round {n}"
        tw.stop()
        lanes = {t.ident for t in threading.enumerate() if t.name.startswith("supervisor-")}
        assert lanes <= {t.ident for t in ours_before}, "a lane of the stopped worker lives on"
    assert {t.ident for t in threading.enumerate()} <= threads_before | {None}
    assert fd_count() <= fds_before
