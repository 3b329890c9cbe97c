"""Usage: python benchmarks/tree_overhead.py [--runs 3000] [--rounds 7] [--concurrency 8]
                                            [--profile]

What the supervision tree itself costs per session, in CPU microseconds of the
event-loop thread per run (``time.thread_time``), with trivial children so
that nothing but the tree's own machinery is measured:

* **(a) plain nursery**: a nursery with two trivial tasks (``start_soon``, one
  checkpoint each): the floor of any two-task structure.
* **(a') by hand**: the session's shape written with a bare nursery: a "lease"
  started with ``nursery.start`` that sleeps until cancelled, and a "runner"
  that passes one checkpoint and cancels the nursery.
* **(b) session supervisor**: a fresh :class:`Supervisor` with the worker's
  session spec (``lease`` and ``runner``, both TEMPORARY and significant,
  ``shutdown=0``, ONE_FOR_ALL, ANY_SIGNIFICANT, intensity 0) and the same two
  children; the lease takes ``task_status`` and calls ``started()``. The
  runner's return shuts the session down (auto-shutdown), which stops the lease.
* **(c) per-session shape**: a long-lived ``sessions`` supervisor (as the worker
  builds it) gets one ``start_child`` of a TEMPORARY ``session:<n>`` child per
  run, ``concurrency`` of them at a time; each runs (b) and is removed when it
  ends. The cost per run covers the ``start_child``, (b), and the removal.

Medians over ``--rounds`` (variants interleaved, so a drift in load hits all
alike); figures printed, never asserted. ``--profile`` adds a cProfile of (c).

The ``supervisor`` package is imported from ``PYTHONPATH`` when given (e.g.
``PYTHONPATH=/path/to/other/checkout`` to compare two trees), else from this
checkout; the path used is printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH

import supervisor
from supervisor import AutoShutdown, ChildSpec, Restart, Strategy, Supervisor, SupervisorSpec

Variant = Callable[[int, int], Awaitable[float]]


async def lease(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep_forever()


async def runner() -> None:
    await trio.lowlevel.checkpoint()


def cpu_per_run(start: float, runs: int) -> float:
    return (time.thread_time() - start) / runs * 1e6


# ---------------------------------------------------------------- (a)


async def plain_nursery(runs: int, _concurrency: int) -> float:
    start = time.thread_time()
    for _ in range(runs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            nursery.start_soon(runner)
    return cpu_per_run(start, runs)


async def by_hand(runs: int, _concurrency: int) -> float:
    async def cancelling_runner(nursery: trio.Nursery) -> None:
        await runner()
        nursery.cancel_scope.cancel()

    start = time.thread_time()
    for _ in range(runs):
        async with trio.open_nursery() as nursery:
            await nursery.start(lease)
            nursery.start_soon(cancelling_runner, nursery)
    return cpu_per_run(start, runs)


# ---------------------------------------------------------------- (b)


def session_supervisor(name: str) -> Supervisor:
    """The worker's session supervisor (see ``SessionRunner.run``) with trivial children."""
    return Supervisor(
        SupervisorSpec(
            [
                ChildSpec(child_id, target, restart=Restart.TEMPORARY, significant=True, shutdown=0)
                for child_id, target in (("lease", lease), ("runner", runner))
            ],
            strategy=Strategy.ONE_FOR_ALL,
            auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
            intensity=0,
            name=name,
        )
    )


async def session_alone(runs: int, _concurrency: int) -> float:
    start = time.thread_time()
    for n in range(runs):
        sup = session_supervisor(f"session:{n}")
        await sup.run()
        assert sup.exit_reason is not None and sup.exit_reason.child_id == "runner"
    return cpu_per_run(start, runs)


# ---------------------------------------------------------------- (c)


async def per_session_shape(runs: int, concurrency: int) -> float:
    slots = trio.Semaphore(concurrency)
    finished = 0
    all_done = trio.Event()

    async def session(
        n: int, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal finished
        sup = session_supervisor(f"session:{n}")
        task_status.started(sup)
        try:
            await sup.run()
        finally:
            slots.release()
            finished += 1
            if finished == runs:
                all_done.set()

    sessions = Supervisor(
        SupervisorSpec([], name="sessions", parallel_stop=True, intensity=3, period=30.0)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sessions.run)
        start = time.thread_time()
        for n in range(runs):
            await slots.acquire()
            await sessions.start_child(
                ChildSpec(
                    f"session:{n}",
                    session,
                    args=(n,),
                    restart=Restart.TEMPORARY,
                    shutdown=None,
                )
            )
        await all_done.wait()
        await trio.testing.wait_all_tasks_blocked()
        cost = cpu_per_run(start, runs)
        assert sessions.which_children() == []
        await sessions.shutdown()
    return cost


VARIANTS: dict[str, Variant] = {
    "(a) plain nursery, two tasks": plain_nursery,
    "(a') the session's shape by hand": by_hand,
    "(b) session Supervisor, two children": session_alone,
    "(c) start_child of a session, (b) inside": per_session_shape,
}


async def measure(runs: int, rounds: int, concurrency: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for variant in VARIANTS.values():  # warm up: imports, caches, first allocations
        await variant(max(1, runs // 10), concurrency)
    for _ in range(rounds):
        for label, variant in VARIANTS.items():
            results[label].append(await variant(runs, concurrency))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000, help="runs per round and variant")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=8, help="sessions at a time in (c)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of (c)")
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, trio {trio.__version__}")
    print(f"supervisor from {Path(supervisor.__file__).resolve().parent}")
    print(
        f"CPU us per run (event-loop thread): medians of {args.rounds} rounds x {args.runs} runs, "
        f"(c) at concurrency {args.concurrency}"
    )
    results = trio.run(measure, args.runs, args.rounds, args.concurrency)
    print("-" * 64)
    print(f"{'variant':<46}{'median':>9}{'min':>9}")
    for label, figures in results.items():
        print(f"{label:<46}{statistics.median(figures):>9.1f}{min(figures):>9.1f}")
    base = statistics.median(results["(a) plain nursery, two tasks"])
    print("-" * 64)
    for label in list(VARIANTS)[2:]:
        extra = statistics.median(results[label]) - base
        print(f"{label[:3]} over (a): {extra:.1f} us per run")
    if args.profile:
        profile(args.runs, args.concurrency)


def profile(runs: int, concurrency: int) -> None:
    profiler = cProfile.Profile()

    async def profiled() -> Any:
        profiler.enable()
        try:
            return await per_session_shape(runs, concurrency)
        finally:
            profiler.disable()

    trio.run(profiled)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
