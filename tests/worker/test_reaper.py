"""The reaper process (DESIGN §3.8) on its own: deadlines, escapees, the lifeline.

Real processes throughout: the reaper script, agents that ignore SIGTERM, call
``setsid()`` and double-fork; ``/proc`` says who is alive. The worker side is
played by this test process through `supervisor._worker._reaper.Reaper`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor._base._exceptions import ConfigError
from supervisor._worker._config import WorkerConfig
from supervisor._worker._lease import Lease
from supervisor._worker._process import AgentResult
from supervisor._worker._reaper import TAG_VARIABLE, Reaper, kill_grace
from supervisor._worker._session import _outcome_of
from supervisor.controlplane import OutcomeStatus

pytestmark = pytest.mark.slow

#: Ignores SIGTERM; its child calls setsid() and double-forks; every process writes
#: its pid to the file given as argv[1] and then sleeps.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def note():
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\\n")
note()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        note()
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    reaper = Reaper(grace=0.2)
    reaper.start()
    try:
        yield reaper
    finally:
        reaper.close()


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a failed test left alive is killed (each process wrote its pid)."""
    yield
    for path in tmp_path.glob("*.pids"):
        for pid in read_pids(path):
            if alive(pid):
                os.kill(pid, 9)


def start_stubborn(tmp_path: Path, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    pids = tmp_path / f"{tag}.pids"
    process = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, str(pids)],
        env={TAG_VARIABLE: tag},
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while len(read_pids(pids)) < 2:
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.01)
    return process, pids


def read_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def wait_dead(pids: list[int], timeout: float) -> float:
    """Seconds until every pid is dead; fails after ``timeout``."""
    started = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - started < timeout, [p for p in pids if alive(p)]
        time.sleep(0.002)
    return time.monotonic() - started


def send(reaper: Reaper, **message: object) -> None:
    reaper._send(message)


def test_a_run_past_its_deadline_is_killed_with_its_escapee(reaper: Reaper, tmp_path: Path) -> None:
    process, pids = start_stubborn(tmp_path, "late")
    try:
        deadline = time.monotonic() + 0.3
        send(reaper, op="track", tag="late", deadline=deadline, grace=0.2)
        send(reaper, op="pid", tag="late", pid=process.pid)
        time.sleep(0.2)
        assert all(alive(p) for p in read_pids(pids))  # not before its deadline
        wait_dead(read_pids(pids), timeout=3)
        # SIGTERM is ignored: only the SIGKILL after the grace ends them
        assert time.monotonic() >= deadline + 0.2
    finally:
        process.kill()
        process.wait()


def test_a_renewed_deadline_keeps_the_run_alive(reaper: Reaper, tmp_path: Path) -> None:
    process, pids = start_stubborn(tmp_path, "renewed")
    try:
        send(reaper, op="track", tag="renewed", deadline=time.monotonic() + 0.3, grace=0.1)
        send(reaper, op="pid", tag="renewed", pid=process.pid)
        for _ in range(5):
            time.sleep(0.15)
            send(reaper, op="renew", tag="renewed", deadline=time.monotonic() + 0.3, grace=0.1)
        assert all(alive(p) for p in read_pids(pids))
        # a renewal never moves a deadline backwards
        send(reaper, op="renew", tag="renewed", deadline=time.monotonic() - 10, grace=0.1)
        time.sleep(0.1)
        assert all(alive(p) for p in read_pids(pids))
        wait_dead(read_pids(pids), timeout=3)
    finally:
        process.kill()
        process.wait()


def test_when_the_lifeline_closes_every_run_dies_at_once(tmp_path: Path) -> None:
    """The worker dies (here: closes the pipe): no grace, no deadline, everything goes."""
    reaper = Reaper(grace=5.0)
    reaper.start()
    runs = [start_stubborn(tmp_path, f"run{n}") for n in range(3)]
    try:
        for n, (process, _) in enumerate(runs):
            send(reaper, op="track", tag=f"run{n}", deadline=time.monotonic() + 600, grace=5.0)
            if n:  # the first one's pid never arrived (killed between spawn and message)
                send(reaper, op="pid", tag=f"run{n}", pid=process.pid)
        time.sleep(0.1)
        reaper.close()
        pids = [pid for _, path in runs for pid in read_pids(path)]
        assert len(pids) == 6
        assert wait_dead(pids, timeout=1.0) < 1.0
    finally:
        reaper.close()
        for process, _ in runs:
            process.kill()
            process.wait()


def test_untrack_kills_what_escaped_the_group(reaper: Reaper, tmp_path: Path) -> None:
    """The worker stopped the group itself; the setsid() escapee is the reaper's."""
    process, pids = start_stubborn(tmp_path, "done")
    send(reaper, op="track", tag="done", deadline=time.monotonic() + 600, grace=0.2)
    send(reaper, op="pid", tag="done", pid=process.pid)
    time.sleep(0.3)  # an ancestry walk has seen the escapee
    process.kill()
    process.wait()
    escapee = read_pids(pids)[1]
    assert alive(escapee)
    send(reaper, op="untrack", tag="done")
    wait_dead([escapee], timeout=2)


async def test_the_lease_pushes_each_new_deadline() -> None:
    lease = Lease("w")
    seen: list[float] = []
    forget = lease.on_renew(lambda: seen.append(lease.deadline))
    lease.deadline = 10.0
    lease.renewed()
    forget()
    lease.deadline = 20.0
    lease.renewed()
    assert seen == [10.0]


def test_the_grace_is_capped_by_the_granted_ttl() -> None:
    assert kill_grace(5.0, 60.0) == 5.0
    assert kill_grace(5.0, 2.0) == pytest.approx(0.3)  # a server that clamped the ttl
    assert kill_grace(5.0, None) == 5.0


def test_a_grace_longer_than_the_lease_allows_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(lease_ttl=3, agent_grace=30)
    assert info.value.key == "agent_grace"
    assert "lease_ttl" in str(info.value) and "agent_grace" in str(info.value)
    with pytest.raises(ConfigError):
        WorkerConfig(lease_ttl=3, agent_grace=0.6)  # 0.8 x 3 + 0.6 is the expiry itself
    assert WorkerConfig(lease_ttl=3, agent_grace=0.5).agent_grace == 0.5
    # left unset, it fits the lease
    assert WorkerConfig(lease_ttl=3).agent_grace == pytest.approx(0.45)
    assert WorkerConfig().agent_grace == 5.0


def test_an_unknown_agent_user_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(agent_user="no-such-user-here")
    assert info.value.key == "agent_user"
    assert WorkerConfig(agent_user="0").agent_user == 0


def test_the_reaper_gets_no_environment(reaper: Reaper) -> None:
    assert reaper.pid is not None
    with open(f"/proc/{reaper.pid}/environ", "rb") as f:
        assert f.read() == b""
    assert os.getsid(reaper.pid) == reaper.pid  # out of reach of the worker's group signals


async def test_an_agent_killed_after_its_lease_deadline_ended_with_the_lease_not_failed() -> None:
    """The reaper's signal may beat the keeper to the deadline: still ``lease_lost``."""
    lease = Lease("w", beats=1, deadline=trio.current_time() - 0.01)
    killed = AgentResult(exit_code=-15, result="", tail=(), duration=1.0)
    assert _outcome_of(killed, lease).status is OutcomeStatus.LEASE_LOST
    lease.deadline = trio.current_time() + 10  # a signal from someone else: a failure
    assert _outcome_of(killed, lease).status is OutcomeStatus.FAILED
    lease.deadline = trio.current_time() - 0.01
    done = AgentResult(exit_code=0, result="ok", tail=(), duration=1.0)
    assert _outcome_of(done, lease).status is OutcomeStatus.COMPLETED  # it finished first


def test_the_reaper_state_looks_only_at_runs_not_yet_ended() -> None:
    """Untracked runs stay watched for leftovers, but set no wake-up and get no
    deadline signal: at hundreds of sessions a second the reaper's work per
    command does not grow with the runs it still remembers."""
    from supervisor._worker import _reaper_main as main

    state = main.Reaper(worker_pid=os.getpid())
    now = time.monotonic()
    state.apply({"op": "track", "tag": "ended", "deadline": now - 1.0, "grace": 1.0})
    state.apply({"op": "untrack", "tag": "ended"})
    state.apply({"op": "track", "tag": "live", "deadline": now + 30.0, "grace": 1.0})
    assert set(state.runs) == {"ended", "live"}
    assert set(state.pending) == {"live"}
    assert state.next_wakeup(now, next_sweep=now + 60.0) == now + 30.0
    state.enforce(now)  # the ended run's deadline has passed: no signal for it
    assert state.runs["ended"].state == "dead"
    assert state.runs["live"].state == "live"
