"""Chaos run: real server process, fault-injecting proxy, two real workers, real agent processes.

One bounded run (about twenty seconds, a few hundred requests, loopback only)
with a worker and its agents killed mid-run; the invariants are then checked
from the server's store file, the proxy's record of the server's answers and
the agents' own start/end log. The checker itself is also tested on records
made up to break each invariant.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from supervisor.controlplane import Outcome, OutcomeStatus, SessionData, WorkItem, WorkState
from supervisor.testing import ChaosConfig, ProxyFault, ProxyFaults, ProxyRecord, run_chaos
from supervisor.testing.chaos import _Run

AGENT = Path(__file__).resolve().parents[1] / "agents" / "chaos.py"


@pytest.mark.slow
async def test_chaos_run_against_the_real_server_keeps_every_invariant() -> None:
    config = ChaosConfig(
        seed=3,
        items=12,
        agent=f"{shlex.quote(sys.executable)} {shlex.quote(str(AGENT))} {{prompt}}",
        faults=ProxyFaults(
            latency=(0.0, 0.03),
            error_rate=0.05,
            drop_rate=0.03,
            reset_rate=0.05,
            truncate_rate=0.05,
        ),
        crash_after=4.0,
        fault_time=12.0,
        time_limit=80.0,
    )
    report = await run_chaos(config)
    assert report.violations == (), report.describe()
    assert len(report.outcomes) == 12
    assert set(report.outcomes) <= {"completed", "failed"}
    assert report.crashed and report.workers == ("w0", "w1", "w2")
    assert report.agent_runs >= 12
    assert sum(n for kind, n in report.faults.items() if kind != "pass") > 0
    assert not report.directory.exists()  # cleaned up


def _lease_bound_config(*, reaper: bool) -> ChaosConfig:
    """Long agents, a worker-only SIGKILL and a freeze past the ttl, few network faults."""
    return ChaosConfig(
        seed=5,
        items=4,
        max_concurrency=4,  # the replacement worker has room for every lost item at once
        lease_ttl=3.0,
        agent=f"{shlex.quote(sys.executable)} {shlex.quote(str(AGENT))} {{prompt}}",
        agent_seconds=(8.0, 12.0),
        crash_rate=0.0,
        crash_mode="worker",
        crash_after=3.0,
        freeze_after=3.5,
        faults=ProxyFaults(
            latency=(0.0, 0.01),
            error_rate=0.02,
            burst_rate=0.0,
            drop_rate=0.0,
            reset_rate=0.0,
            truncate_rate=0.0,
        ),
        fault_time=6.0,
        time_limit=80.0,
        reaper=reaper,
    )


@pytest.mark.slow
async def test_chaos_worker_sigkill_and_freeze_leave_no_agent_running_beside_another() -> None:
    """Only the worker process is killed, another is frozen for 2 x ttl: the reaper kills
    their agents (at once; at the lease deadline), so no item ever runs twice at once."""
    report = await run_chaos(_lease_bound_config(reaper=True))
    assert report.violations == (), report.describe()
    assert report.crashed and report.frozen
    assert report.agent_runs > 4  # the killed and frozen workers' items ran again
    assert set(report.outcomes) == {"completed"}


@pytest.mark.slow
async def test_chaos_catches_agents_that_outlive_their_worker_without_the_reaper() -> None:
    """The old behaviour planted back (workers without a reaper): the run finds the
    agents that kept working after their worker died or froze."""
    report = await run_chaos(_lease_bound_config(reaper=False))
    found = "\n".join(report.violations)
    print(f"\nwithout the reaper: {report.describe()}\n{found}")
    assert "split-brain" in found or "orphan" in found, report.describe()


def _item(work_id: str, *, attempts: int, outcome: Outcome) -> WorkItem:
    return WorkItem(
        id=work_id,
        environment_id="default",
        state=WorkState.STOPPED,
        data=SessionData(id=f"s-{work_id}", prompt="p"),
        attempts=attempts,
        outcome=outcome,
    )


def _stop(work_id: str) -> ProxyRecord:
    return ProxyRecord(
        "POST", f"/v1/environments/default/work/{work_id}/stop", ProxyFault.PASS, 200, 0.0
    )


def test_the_checker_reports_each_broken_invariant(tmp_path: Path) -> None:
    """Made-up records: overlap, two stops, an early dead letter, a lost item, a ghost outcome."""
    run = _Run(ChaosConfig(), tmp_path)
    run.ids = ["a", "b", "c", "d", "e"]
    done = Outcome(OutcomeStatus.COMPLETED)
    expired = Outcome(OutcomeStatus.FAILED, reason="lease expired")
    lines = [
        {"event": "start", "work_id": "a", "pid": 1, "time": 10.0},
        {"event": "start", "work_id": "a", "pid": 2, "time": 11.0},  # while pid 1 still runs
        {"event": "end", "work_id": "a", "pid": 1, "time": 12.0, "code": 0},
        {"event": "end", "work_id": "a", "pid": 2, "time": 13.0, "code": 0},
        {"event": "start", "work_id": "b", "pid": 3, "time": 20.0},
        {"event": "end", "work_id": "b", "pid": 3, "time": 21.0, "code": 0},
    ]
    run.log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run.records = [_stop("a"), _stop("b"), _stop("b")]
    items = [
        _item("a", attempts=1, outcome=done),
        _item("b", attempts=0, outcome=done),
        _item("c", attempts=1, outcome=expired),
        _item("e", attempts=0, outcome=done),
    ]
    run.check(items)
    found = "\n".join(run.violations)
    assert "split-brain: item 0" in found
    assert "finished-twice: item 1: 2 stops accepted" in found
    assert "attempts: item 2: dead-lettered after 1 attempts" in found
    assert "lost: item 3 is not on the server" in found
    assert "item 4: outcome completed recorded without an accepted stop" in found
    assert "outcome: item 4 completed but no agent finished it" in found


def test_the_checker_accepts_a_clean_history(tmp_path: Path) -> None:
    run = _Run(ChaosConfig(), tmp_path)
    run.ids = ["a"]
    lines = [
        {"event": "start", "work_id": "a", "pid": 1, "time": 10.0},
        {"event": "end", "work_id": "a", "pid": 1, "time": 11.0, "signal": "SIGTERM"},
        {"event": "start", "work_id": "a", "pid": 2, "time": 15.0},
        {"event": "end", "work_id": "a", "pid": 2, "time": 16.0, "code": 0},
    ]
    run.log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run.records = [_stop("a")]
    run.check([_item("a", attempts=1, outcome=Outcome(OutcomeStatus.COMPLETED))])
    assert run.violations == []
    assert run.agent_run_count == 2


LATENCY_ONLY = ProxyFaults(
    latency=(0.25, 0.25),
    error_rate=0,
    burst_rate=0,
    drop_rate=0,
    reset_rate=0,
    truncate_rate=0,
)


@pytest.mark.slow
async def test_forty_items_at_quarter_second_latency_complete_once_with_no_refused_stop() -> None:
    """0.25 s each way and a 3 s ttl: a heartbeat is often in flight when a session ends.

    The final stop must carry the token that beat earned (or the one the server
    names on a 412 for the same lease): no refused stop, no item served twice,
    no completed session turned into a failure.
    """
    config = ChaosConfig(
        seed=7,
        items=40,
        workers=2,
        max_concurrency=6,
        lease_ttl=3.0,
        agent=f"{shlex.quote(sys.executable)} {shlex.quote(str(AGENT))} {{prompt}}",
        agent_seconds=(0.3, 1.5),
        crash_rate=0.0,
        crash_after=None,
        faults=LATENCY_ONLY,
        time_limit=100.0,
    )
    report = await run_chaos(config)
    print(report.describe())
    assert report.violations == (), report.describe()
    assert report.outcomes == ("completed",) * 40
    assert report.refused_stops == 0
    assert report.reruns == 0
    assert report.completed_not_recorded == 0
    assert report.agent_runs == 40
    assert report.attempts == (0,) * 40


@pytest.mark.slow
async def test_a_server_restart_and_poison_keep_every_invariant() -> None:
    """The server restarts mid-run, then its clock steps back; a surrogate submit and results.

    The submit holding a lone surrogate gets a 400 and changes nothing; the
    agents printing one have their result recorded (repaired); listing over
    HTTP keeps working (the run waits on it); every item ends once.
    """
    config = ChaosConfig(
        seed=11,
        items=9,
        workers=2,
        max_concurrency=3,
        lease_ttl=3.0,
        agent=f"{shlex.quote(sys.executable)} {shlex.quote(str(AGENT))} {{prompt}}",
        agent_seconds=(0.5, 3.0),
        crash_rate=0.0,
        crash_after=None,
        restart_after=2.0,
        poison=True,
        clock_step=-6.0,  # back by two ttls: leases last longer, nothing may break
        clock_step_after=4.0,
        faults=ProxyFaults(
            latency=(0.0, 0.02),
            error_rate=0,
            burst_rate=0,
            drop_rate=0,
            reset_rate=0,
            truncate_rate=0,
        ),
        time_limit=90.0,
    )
    report = await run_chaos(config)
    assert report.violations == (), report.describe()
    assert report.outcomes == ("completed",) * 9
    assert report.restarted and report.clock_stepped
