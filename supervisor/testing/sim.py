"""Run seeded fleet simulations from the command line.

::

    python -m supervisor.testing.sim --seeds 500                 # seeds 0..499
    python -m supervisor.testing.sim --seeds 200 --workers 3 --items 8
    python -m supervisor.testing.sim --seed 417 --trace          # replay one seed

Each failing seed prints one line (its first violation, how many there were,
and its trace hash); the last line is always
``N seeds, V violations, R seeds/min``. ``--seed S`` replays one run exactly:
the same violations and the same trace hash, which it prints. The exit status
is 1 when any invariant was violated, 0 otherwise.

``--measure-from answer`` plants the classic lease bug (the deadline counted
from the heartbeat's answer instead of its send) to show what a violation
looks like; ``--plant-stale-stop`` plants another (a heartbeat in flight
abandoned when the session ends, so the final stop carries a stale token and
a finished session is lost: ``completed-lost``).

From Python, use :func:`run_simulation` and :class:`SimConfig` (re-exported
here and from ``supervisor.testing``); ``SimConfig(agent=...,
worker_options=...)`` runs your own in-process agent and configuration under
the same faults.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .._worker._lease import KeeperOptions, MeasureFrom
from ._sim import (
    AgentBehaviour,
    Behaviour,
    FaultMix,
    SimConfig,
    SimResult,
    Simulation,
    Violation,
    generate_schedule,
    run_simulation,
)

__all__ = [
    "AgentBehaviour",
    "Behaviour",
    "FaultMix",
    "SimConfig",
    "SimResult",
    "Simulation",
    "Violation",
    "generate_schedule",
    "main",
    "run_simulation",
    "summary_line",
]


def summary_line(seeds: int, violations: int, seconds: float) -> str:
    """The last line of every run: ``N seeds, V violations, R seeds/min``."""
    rate = seeds / seconds * 60.0 if seconds > 0 else 0.0
    return f"{seeds} seeds, {violations} violations, {rate:.0f} seeds/min"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.testing.sim",
        description="Deterministic simulation of a worker fleet under seeded faults; "
        "checks split brain, lease deadlines, lost or twice-finished items, restart "
        "budgets and leaks.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--seeds", type=int, default=100, metavar="N", help="run N seeds (default: 100)"
    )
    which.add_argument(
        "--seed", type=int, metavar="S", help="replay seed S alone and print its trace hash"
    )
    parser.add_argument(
        "--first", type=int, default=0, metavar="F", help="first seed of --seeds (default: 0)"
    )
    parser.add_argument("--workers", type=int, default=2, metavar="W", help="workers (default: 2)")
    parser.add_argument(
        "--items", type=int, default=5, metavar="I", help="work items per run (default: 5)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, metavar="C", help="sessions per worker (default: 2)"
    )
    parser.add_argument(
        "--lease-ttl", type=float, default=6.0, metavar="S", help="lease ttl (default: 6)"
    )
    parser.add_argument(
        "--measure-from",
        choices=[m.value for m in MeasureFrom],
        default=MeasureFrom.SEND.value,
        help="where lease deadlines count from; 'answer' plants the classic split-brain bug",
    )
    parser.add_argument(
        "--plant-stale-stop",
        action="store_true",
        help="plant the stale final stop bug (a heartbeat in flight abandoned at the end)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="with --seed: print every event of the run"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="let the workers log (to stderr, at WARNING)"
    )
    return parser


def _config(args: argparse.Namespace) -> SimConfig:
    keeper = KeeperOptions()
    if args.measure_from != MeasureFrom.SEND.value:
        keeper["measure_from"] = MeasureFrom(args.measure_from)
    if args.plant_stale_stop:
        keeper["account_for_beats"] = False
    return SimConfig(
        workers=args.workers,
        items=args.items,
        max_concurrency=args.concurrency,
        lease_ttl=args.lease_ttl,
        keeper_options=keeper,
    )


def _failure_line(result: SimResult) -> str:
    first = result.violations[0]
    more = f" (+{len(result.violations) - 1} more)" if len(result.violations) > 1 else ""
    return f"seed {result.seed}: {first}{more} [trace {result.trace_hash[:16]}]"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    if args.seed is not None:
        result = run_simulation(args.seed, config, keep_trace=args.trace, verbose=args.verbose)
        if args.trace:
            for fault in result.faults:
                print(f"fault {fault.describe()}")
            for line in result.trace:
                print(line)
        for violation in result.violations:
            print(f"seed {result.seed}: {violation}")
        print(
            f"seed {result.seed}: trace {result.trace_hash} "
            f"({result.events} events, {result.sim_time:.1f}s simulated, "
            f"outcomes {', '.join(result.outcomes)})"
        )
        print(summary_line(1, len(result.violations), time.perf_counter() - started))
        return 1 if result.violations else 0
    if args.seeds < 0:
        print("error: --seeds must be >= 0", file=sys.stderr)
        return 2
    total = 0
    for seed in range(args.first, args.first + args.seeds):
        result = run_simulation(seed, config, verbose=args.verbose)
        if result.violations:
            total += len(result.violations)
            print(_failure_line(result), flush=True)
    print(summary_line(args.seeds, total, time.perf_counter() - started))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
