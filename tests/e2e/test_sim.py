"""The fleet simulator: 500 seeds hold every invariant, a planted lease bug is caught, runs replay.

The seeded runs are split in chunks of 100 so each test stays well inside the
per-test timeout on a loaded two-core machine; together they are the CI's
500 seeds. Speed figures come from ``python -m supervisor.testing.sim``, which
prints seeds/min; nothing here asserts a wall time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio

from supervisor import AgentContext
from supervisor._worker._lease import MeasureFrom
from supervisor.testing import (
    Behaviour,
    Fault,
    FaultKind,
    FaultMix,
    SimConfig,
    generate_schedule,
    run_simulation,
)
from supervisor.testing.sim import main, summary_line

ROOT = Path(__file__).resolve().parents[2]
CI_SEEDS = 500
CHUNK = 100
PLANTED = SimConfig(keeper_options={"measure_from": MeasureFrom.ANSWER})
PLANT_FLAGS = ("--measure-from", "answer")
SUMMARY = re.compile(r"^(\d+) seeds, (\d+) violations, (\d+) seeds/min$")


@pytest.mark.parametrize("first", range(0, CI_SEEDS, CHUNK))
def test_seeded_runs_hold_every_invariant(first: int) -> None:
    """Seeds first..first+99 under the default fault mix: no violation of any kind."""
    failures = []
    for seed in range(first, first + CHUNK):
        result = run_simulation(seed)
        if result.violations:
            failures.append(f"seed {seed}: " + "; ".join(map(str, result.violations)))
        assert len(result.outcomes) == 5
    assert failures == []


def test_planted_answer_deadline_bug_is_caught_within_the_ci_seeds() -> None:
    """Deadline counted from the answer (planted via keeper_options): a split brain shows up."""
    for seed in range(CI_SEEDS):
        planted = run_simulation(seed, PLANTED)
        if planted.violations:
            break
    else:
        pytest.fail(f"the planted bug survived {CI_SEEDS} seeds")
    assert {v.kind for v in planted.violations} == {"split-brain"}
    assert any(f.kind is FaultKind.LATENCY for f in planted.faults)
    # The same seed with the deadline counted from the send is clean.
    assert run_simulation(seed).violations == ()


def test_a_seed_replays_exactly_in_process() -> None:
    """Same seed, same config: the same trace, hash, violations and outcomes."""
    first = run_simulation(7, PLANTED, keep_trace=True)
    second = run_simulation(7, PLANTED, keep_trace=True)
    assert first.trace == second.trace
    assert first.trace_hash == second.trace_hash
    assert first.violations == second.violations
    assert first.outcomes == second.outcomes
    assert len(first.trace) == first.events > 20


def test_different_seeds_explore_different_runs() -> None:
    hashes = {run_simulation(seed).trace_hash for seed in range(5)}
    assert len(hashes) == 5


def _replay(seed: int, hash_seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.testing.sim", "--seed", str(seed), *PLANT_FLAGS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    return done.stdout.splitlines()


def test_a_failing_seed_reproduces_exactly_from_the_command_line() -> None:
    """--seed S in two processes with different hash seeds: same violations, same trace hash."""
    seed = next(s for s in range(CI_SEEDS) if run_simulation(s, PLANTED).violations)
    first = _replay(seed, "1")
    second = _replay(seed, "2")
    assert first[:-1] == second[:-1]  # all but the timing line
    assert any("split-brain" in line for line in first)
    trace = next(line for line in first if " trace " in line)
    assert re.search(r"trace [0-9a-f]{64} ", trace)
    assert run_simulation(seed, PLANTED).trace_hash in trace
    assert SUMMARY.match(first[-1])


def test_cli_prints_one_line_per_failing_seed_then_the_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["--seeds", "110", "--measure-from", "answer"])
    lines = capsys.readouterr().out.splitlines()
    failing = [line for line in lines[:-1] if line.startswith("seed ")]
    assert status == 1
    assert failing and len(failing) == len(lines) - 1
    assert all(re.match(r"seed \d+: split-brain at t=", line) for line in failing)
    match = SUMMARY.match(lines[-1])
    assert match is not None
    assert int(match[1]) == 110
    assert int(match[2]) >= len(failing)


def test_cli_exits_zero_and_prints_only_the_summary_when_all_hold(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--seeds", "5", "--workers", "3", "--items", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("5 seeds, 0 violations, ")


def test_summary_line_format() -> None:
    assert summary_line(500, 0, 60.0) == "500 seeds, 0 violations, 500 seeds/min"
    assert summary_line(1, 2, 0.0) == "1 seeds, 2 violations, 0 seeds/min"


def test_the_schedule_is_a_pure_function_of_the_seed() -> None:
    config = SimConfig()
    assert generate_schedule(3, config) == generate_schedule(3, config)
    assert generate_schedule(3, config) != generate_schedule(4, config)
    kinds = {f.kind for seed in range(200) for f in generate_schedule(seed, config)}
    assert kinds == set(FaultKind)
    assert generate_schedule(3, SimConfig(faults=FaultMix.none())) == []


def test_at_least_one_worker_is_never_gone_for_good() -> None:
    """Revoked keys and permanent kills spare at least one worker, so items can finish."""
    for seed in range(300):
        gone = {
            f.worker
            for f in generate_schedule(seed, SimConfig())
            if f.kind is FaultKind.REVOKED
            or (f.kind is FaultKind.KILL and f.duration == float("inf"))
        }
        assert len(gone) <= 1


def test_revoked_key_makes_the_worker_give_up_and_that_is_expected() -> None:
    """A worker whose key is revoked escalates (RestartIntensityExceeded); no violation."""
    schedule = [Fault(FaultKind.REVOKED, 0, 1.0)]
    quiet = SimConfig(faults=FaultMix.none())
    result = run_simulation(1, quiet, schedule=schedule, keep_trace=True)
    assert result.violations == ()
    assert any("w0 gave up" in line for line in result.trace)
    assert set(result.outcomes) <= {"completed", "failed", "timeout"}


def test_partitioned_worker_loses_its_lease_and_another_finishes_the_item() -> None:
    """A partition of three ttls on the holder: the item moves to the other worker, once."""
    config = SimConfig(
        workers=2,
        items=1,
        faults=FaultMix.none(),
        behaviours={Behaviour.SLOW: 1.0},
    )
    schedule = [
        Fault(FaultKind.PARTITION, 1, 0.0, duration=1.0),  # w0 claims the item
        Fault(FaultKind.PARTITION, 0, 3.0, duration=18.0),
    ]
    result = run_simulation(2, config, schedule=schedule, keep_trace=True)
    assert result.violations == ()
    assert result.outcomes == ("completed",)
    starts = [line for line in result.trace if "agent #0/" in line and line.endswith("starts")]
    assert [line.split()[1] for line in starts] == ["w0", "w1"]


def test_killed_worker_sends_no_stop_and_comes_back_under_a_new_id() -> None:
    config = SimConfig(workers=2, items=2, faults=FaultMix.none(), behaviours={Behaviour.SLOW: 1})
    schedule = [Fault(FaultKind.KILL, 0, 2.0, duration=12.0)]
    result = run_simulation(4, config, schedule=schedule, keep_trace=True)
    assert result.violations == ()
    assert result.outcomes == ("completed", "completed")
    assert any(line.endswith("w0.1 starts") for line in result.trace)
    killed_at = next(float(line.split()[0]) for line in result.trace if " kill w0 " in line)
    late_w0 = [
        line
        for line in result.trace
        if float(line.split()[0]) > killed_at and line.split()[1] == "w0" and " stop " in line
    ]
    # Its keepers tried their final stops, but none reached the control plane.
    assert all("cancelled" in line for line in late_w0)


def test_an_agent_that_ignores_cancellation_too_long_is_reported() -> None:
    """Your own agent under the simulator: shielding past the deadline is a violation."""

    async def stubborn(ctx: AgentContext) -> str:
        try:
            await trio.sleep(100.0)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(5.0)  # most of a 6 s ttl: past every margin
        return "late"

    config = SimConfig(
        items=1,
        agent=stubborn,
        faults=FaultMix.none(),
        behaviours={Behaviour.OK: 1.0},
    )
    schedule = [Fault(FaultKind.PARTITION, 0, 1.0, duration=30.0)]
    schedule.append(Fault(FaultKind.PARTITION, 1, 0.0, duration=0.5))
    result = run_simulation(0, config, schedule=schedule)
    kinds = {v.kind for v in result.violations}
    assert {"deadline", "split-brain"} <= kinds


def test_your_agent_and_configuration_run_under_the_simulator() -> None:
    calls: list[str] = []

    async def mine(ctx: AgentContext) -> str:
        calls.append(ctx.work_id)
        await trio.sleep(1.0)
        return f"handled {ctx.prompt}"

    config = SimConfig(
        items=4,
        agent=mine,
        behaviours={Behaviour.OK: 1.0},
        worker_options={"max_concurrency": 1},
    )
    result = run_simulation(11, config)
    assert result.violations == ()
    assert len(calls) >= 4
    assert set(result.outcomes) <= {"completed", "cancelled", "failed"}


def test_a_hand_written_schedule_must_name_existing_workers() -> None:
    with pytest.raises(ValueError, match="there are 2 workers"):
        run_simulation(0, SimConfig(), schedule=[Fault(FaultKind.KILL, 5, 1.0)])


def test_wedged_agents_are_cancelled_requeued_and_finally_end_wedged() -> None:
    """Every attempt prints the wedge pattern: requeued until the last attempt ends it."""
    config = SimConfig(items=1, faults=FaultMix.none(), behaviours={Behaviour.WEDGE: 1.0})
    result = run_simulation(0, config, keep_trace=True)
    assert result.violations == ()
    assert result.outcomes == ("wedged",)
    requeues = [line for line in result.trace if " requeue #0 ok" in line]
    assert len(requeues) == config.max_attempts


# --- issue 15: beats in flight, restarts, clock steps, poison -------------------------


def test_planted_stale_stop_bug_is_caught_within_the_ci_seeds() -> None:
    """A keeper that abandons its beat in flight and ignores a named token loses finished work.

    ``completed-lost`` names it: a completed agent, a final stop refused for a
    stale token of the worker's own live lease and never sent again.
    """
    planted = SimConfig(keeper_options={"account_for_beats": False})
    for seed in range(CI_SEEDS):
        result = run_simulation(seed, planted)
        if any(v.kind == "completed-lost" for v in result.violations):
            break
    else:
        pytest.fail(f"the planted stale-stop bug survived {CI_SEEDS} seeds")
    assert run_simulation(seed).violations == ()


def test_restart_and_clock_steps_keep_every_invariant() -> None:
    """A control-plane restart mid-session, a clock stepped back and forward: nothing breaks."""
    config = SimConfig(workers=2, items=6, faults=FaultMix.none(), behaviours={Behaviour.SLOW: 1.0})
    schedule = [
        *(Fault(FaultKind.RESTART, w, 5.0, duration=4.0) for w in range(2)),
        Fault(FaultKind.CLOCK_STEP, 0, 12.0, offset=-9.0),
        Fault(FaultKind.CLOCK_STEP, 0, 20.0, offset=0.1),
    ]
    result = run_simulation(3, config, schedule=schedule, keep_trace=True)
    assert result.violations == ()
    assert result.outcomes == ("completed",) * 6
    trace = "\n".join(result.trace)
    assert "[restart]" in trace
    assert "control plane clock steps by -9.000s" in trace


def test_the_schedule_draws_restarts_and_clock_steps() -> None:
    kinds = {f.kind for seed in range(40) for f in generate_schedule(seed, SimConfig())}
    assert {FaultKind.RESTART, FaultKind.CLOCK_STEP} <= kinds


def test_poison_is_refused_at_submit_and_repaired_in_results() -> None:
    """Every finishing agent returns a lone surrogate: every item still completes, once."""
    config = SimConfig(
        items=6, faults=attrs.evolve(FaultMix.none(), poison=1.0), behaviours={Behaviour.OK: 1.0}
    )
    result = run_simulation(5, config, keep_trace=True)
    assert result.violations == ()
    assert result.outcomes == ("completed",) * 6
    assert any("poison submit refused" in line for line in result.trace)


def test_cli_plants_the_stale_stop_bug(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "60", "--plant-stale-stop"]) == 1
    out = capsys.readouterr().out
    assert "completed-lost" in out
    assert "refused with a stale token of its own lease" in out
