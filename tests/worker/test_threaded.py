"""``ThreadedWorker`` from plain threads, with real agents and a real SQLite file."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from supervisor import ConfigError
from supervisor._worker._agent import AgentContext
from supervisor._worker._config import WorkerConfig
from supervisor._worker._threaded import ResultTimeout, ThreadedWorker, WorkCancelled
from supervisor.controlplane import OutcomeStatus

AGENTS = Path(__file__).resolve().parents[1] / "agents"


def agent_cmd(name: str, *extra: str) -> str:
    return " ".join([sys.executable, str(AGENTS / f"{name}.py"), *extra])


def make_config(tmp_path: Path, **overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "max_concurrency": 3,
        "agent": agent_cmd("ok", "{prompt}"),
        "poll_block_ms": 50,
        "agent_grace": 0.3,
        "drain_timeout": 0.5,
        "api_enabled": False,
        "worker_id": "threaded",
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_handles_resolve_with_the_outcome(tmp_path: Path) -> None:
    with ThreadedWorker(make_config(tmp_path)) as tw:
        handles = [tw.submit(f"job {n}", origin="test") for n in range(3)]
        outcomes = [h.result(timeout=30) for h in handles]
    assert [o.status for o in outcomes] == [OutcomeStatus.COMPLETED] * 3
    assert outcomes[1].result == "done: job 1"
    assert all(h.done() for h in handles)
    assert all(h.item_id for h in handles)


@pytest.mark.slow
def test_submit_never_blocks_and_result_times_out(tmp_path: Path) -> None:
    with ThreadedWorker(make_config(tmp_path, agent=agent_cmd("hang"))) as tw:
        started = time.monotonic()
        handle = tw.submit("wait for ever")
        assert time.monotonic() - started < 0.1
        with pytest.raises(ResultTimeout) as info:
            handle.result(timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert not handle.done()
        tw.stop(drain=False)


@pytest.mark.slow
def test_stop_with_three_hanging_sessions_fails_every_handle(tmp_path: Path) -> None:
    """stop() returns within the drain timeout (+ agent grace); all handles raise WorkCancelled."""
    tw = ThreadedWorker(make_config(tmp_path, agent=agent_cmd("hang"), drain_timeout=0.5))
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
def test_stop_answers_the_handle_of_an_item_that_never_started(tmp_path: Path) -> None:
    """Three hanging items, two slots: the third is still queued when stop() comes.

    Its handle was dropped by the cancelled serving task without an answer, so
    its result() waited until the timeout; now every handle raises at once.
    """
    config = make_config(tmp_path, agent=agent_cmd("hang"), max_concurrency=2)
    tw = ThreadedWorker(config)
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
def test_cancel_stops_the_session(tmp_path: Path) -> None:
    with ThreadedWorker(make_config(tmp_path, agent=agent_cmd("hang"))) as tw:
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


def test_start_errors_surface_from_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    tw = ThreadedWorker(make_config(tmp_path, state_dir=blocker / "state"))
    with pytest.raises(ConfigError, match="state_dir"):
        tw.start()
    assert not tw.running
    bad_agent = ThreadedWorker(make_config(tmp_path, agent="no_such_module_xyz:agent"))
    with pytest.raises(ConfigError, match="agent"):
        bad_agent.start()


def test_submit_on_a_stopped_worker_fails_the_handle_at_once(tmp_path: Path) -> None:
    handle = ThreadedWorker(make_config(tmp_path)).submit("nobody home")
    assert handle.done()
    with pytest.raises(WorkCancelled, match="not running"):
        handle.result()


def test_blocking_calls_from_the_loop_thread_raise(tmp_path: Path) -> None:
    errors: list[str] = []
    tw: ThreadedWorker

    async def agent(ctx: AgentContext) -> str:
        for call in (lambda: tw.stop(), lambda: handle.result(timeout=1)):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        return "ok"

    tw = ThreadedWorker(make_config(tmp_path), agent=agent)
    with tw:
        handle = tw.submit("call back")
        assert handle.result(timeout=30).status is OutcomeStatus.COMPLETED
    assert len(errors) == 2
    assert all("would deadlock" in e for e in errors)


@pytest.mark.slow
def test_repeated_start_stop_leaks_no_threads_or_fds(tmp_path: Path) -> None:
    async def agent(ctx: AgentContext) -> str:
        return ctx.prompt

    tw = ThreadedWorker(make_config(tmp_path), agent=agent)
    tw.start()
    assert tw.submit("warm up").result(timeout=30).result == "warm up"
    tw.stop()
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = fd_count()
    for n in range(5):
        tw.start()
        assert tw.submit(f"round {n}").result(timeout=30).result == f"round {n}"
        tw.stop()
    assert {t.ident for t in threading.enumerate()} <= threads_before | {None}
    assert not any(t.name.startswith("supervisor-") for t in threading.enumerate())
    assert fd_count() <= fds_before
