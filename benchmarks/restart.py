"""What supervision costs: restart overhead, shutdown latency, memory per child.

Run ``python benchmarks/restart.py`` (about half a minute); ``--profile`` adds a
cProfile breakdown of the supervised restart loop. Figures:

* **per restart**: a TRANSIENT child that raises at once, restarted by a
  :class:`Supervisor` (intensity too high to ever escalate, no backoff), against
  a bare Trio respawn loop (a new nursery per attempt, catching the exception),
  in the same process, rounds interleaved; medians of the rounds and their ratio.
  The ``supervisor`` logger keeps its default level, so every crash makes one
  WARNING record (the bare loop logs nothing); the records go to a NullHandler so
  the terminal stays readable. A second row shows the cost with that logger
  silenced, to separate logging from the tree's own work.
* **shutdown latency**: from ``shutdown()`` of a depth-5 tree (five nested
  supervisors, 20 sleeping leaves each: 100 leaves) to its ``run()`` returning.
* **memory per idle child**: tracemalloc growth for 10,000 idle children under
  one supervisor, next to 10,000 bare sleeping Trio tasks.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import pstats
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor import ChildSpec, Restart, Supervisor, SupervisorSpec

RESTARTS = 5_000
ROUNDS = 7
LATENCY_ROUNDS = 15
IDLE_CHILDREN = 10_000


class Crasher:
    """A child that raises at once, ``limit`` times, then returns (and sets ``done``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.runs = 0
        self.done = trio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs > self.limit:
            self.done.set()
            return
        raise ValueError("crash")


# --------------------------------------------------------------- per restart


class Timer:
    """Wall-clock and CPU time (this thread) of a stretch of code.

    The CPU figure is the cost that stays put when other processes share the
    cores; the wall figure is what a caller waits.
    """

    def __enter__(self) -> Timer:
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.thread_time() - self._cpu

    def per(self, count: int) -> tuple[float, float]:
        return self.wall / count, self.cpu / count


async def bare_respawn(restarts: int) -> tuple[float, float]:
    """Seconds (wall, CPU) per attempt of a hand-written respawn loop."""
    child = Crasher(restarts)
    with Timer() as timer:
        for _ in range(restarts):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(child)
            except* ValueError:
                pass
    assert child.runs == restarts
    return timer.per(restarts)


async def bare_respawn_caught_in_task(restarts: int) -> tuple[float, float]:
    """Seconds per attempt when the task itself catches (no ExceptionGroup is built)."""
    child = Crasher(restarts)

    async def guarded() -> None:
        try:
            await child()
        except ValueError:
            pass

    with Timer() as timer:
        for _ in range(restarts):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded)
    assert child.runs == restarts
    return timer.per(restarts)


async def supervised_respawn(restarts: int) -> tuple[float, float]:
    """Seconds (wall, CPU) per restart of a crashing TRANSIENT child under a Supervisor."""
    child = Crasher(restarts)
    spec = SupervisorSpec(
        [ChildSpec("crasher", child, restart=Restart.TRANSIENT)],
        intensity=10**9,
        period=3600.0,
    )
    sup = Supervisor(spec)
    async with trio.open_nursery() as nursery:
        with Timer() as timer:
            await nursery.start(sup.run)
            await child.done.wait()
        await sup.shutdown()
    assert child.runs == restarts + 1
    return timer.per(restarts)


def triotp_available() -> bool:
    """Whether triotp (0.3.1 needs Python 3.13) is importable here."""
    try:
        import logbook  # type: ignore[import-untyped]
        import triotp  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    # triotp logs each restart as an ERROR with its traceback through logbook; send the
    # records nowhere, as the ``supervisor`` logger's go to a NullHandler.
    logbook.NullHandler().push_application()
    return True


async def triotp_respawn(restarts: int) -> tuple[float, float]:
    """Seconds (wall, CPU) per restart of the same crashing TRANSIENT child under triotp."""
    from triotp import supervisor as otp

    child = Crasher(restarts)
    specs = [
        otp.child_spec(id="crasher", task=child, args=[], restart=otp.restart_strategy.TRANSIENT)
    ]
    with Timer() as timer:
        # Returns once the child returned normally (TRANSIENT: no restart).
        await otp.start(specs, otp.options(max_restarts=10**9, max_seconds=3600))
    assert child.runs == restarts + 1
    return timer.per(restarts)


async def restart_rounds(restarts: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Every variant once per round, interleaved, so drifts in load hit them all alike."""
    logger = logging.getLogger("supervisor")
    results: dict[str, list[tuple[float, float]]] = {
        "bare": [],
        "bare, caught in task": [],
        "supervised": [],
        "supervised, no logs": [],
    }
    with_triotp = triotp_available()
    if with_triotp:
        results["triotp"] = []
    for _ in range(rounds):
        results["bare"].append(await bare_respawn(restarts))
        results["bare, caught in task"].append(await bare_respawn_caught_in_task(restarts))
        results["supervised"].append(await supervised_respawn(restarts))
        logger.disabled = True
        try:
            results["supervised, no logs"].append(await supervised_respawn(restarts))
        finally:
            logger.disabled = False
        if with_triotp:
            results["triotp"].append(await triotp_respawn(restarts))
    return results


# ------------------------------------------------------------ shutdown latency


async def sleeper() -> None:
    await trio.sleep_forever()


def nested_tree(depth: int, leaves: int, level: int = 1) -> Supervisor:
    children = [ChildSpec(f"leaf{i}", sleeper) for i in range(leaves)]
    if level < depth:
        below = nested_tree(depth, leaves, level + 1)
        children.append(ChildSpec(f"level{level + 1}", below.run))
    return Supervisor(SupervisorSpec(children, name=f"level{level}"))


async def shutdown_latency() -> float:
    """Seconds from ``shutdown()`` of a depth-5, 100-leaf tree to ``run()`` returning."""
    root = nested_tree(depth=5, leaves=20)
    returned = 0.0

    async def run_root(*, task_status: trio.TaskStatus[Supervisor]) -> None:
        nonlocal returned
        await root.run(task_status=task_status)
        returned = time.perf_counter()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_root)
        await trio.testing.wait_all_tasks_blocked()
        start = time.perf_counter()
        await root.shutdown()
    return returned - start


# ------------------------------------------------------------------- memory


async def traced_growth(populate: Callable[[trio.Nursery], Awaitable[None]]) -> int:
    """Bytes tracemalloc sees added by ``populate`` once everything has settled."""
    gc.collect()
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            before = tracemalloc.get_traced_memory()[0]
            await populate(nursery)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    return after - before


async def memory_per_child(count: int) -> tuple[float, float]:
    async def supervised(nursery: trio.Nursery) -> None:
        specs = [ChildSpec(f"idle{i}", sleeper) for i in range(count)]
        await nursery.start(Supervisor(SupervisorSpec(specs)).run)

    async def bare(nursery: trio.Nursery) -> None:
        for _ in range(count):
            nursery.start_soon(sleeper)

    return (await traced_growth(supervised)) / count, (await traced_growth(bare)) / count


# ------------------------------------------------------------------- report


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(wall for wall, _ in samples),
        statistics.median(cpu for _, cpu in samples),
    )


def row(label: str, wall: str, cpu: str = "") -> None:
    print(f"{label:<50}{wall:>11}{cpu:>11}")


async def main(profile: bool) -> None:
    logging.getLogger("supervisor").addHandler(logging.NullHandler())
    await restart_rounds(500, 1)  # warm-up: imports, caches, allocator
    rounds = await restart_rounds(RESTARTS, ROUNDS)
    bare = medians(rounds["bare"])
    supervised = medians(rounds["supervised"])
    quiet = medians(rounds["supervised, no logs"])
    in_task = medians(rounds["bare, caught in task"])
    latencies = [await shutdown_latency() for _ in range(LATENCY_ROUNDS)]
    per_child, per_task = await memory_per_child(IDLE_CHILDREN)

    def us(pair: tuple[float, float]) -> tuple[str, str]:
        return f"{pair[0] * 1e6:.1f} µs", f"{pair[1] * 1e6:.1f} µs"

    def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[str, str]:
        return f"{a[0] / b[0]:.2f} x", f"{a[1] / b[1]:.2f} x"

    print(f"python {sys.version.split()[0]}, trio {trio.__version__}")
    print(f"per restart: medians of {ROUNDS} rounds x {RESTARTS}, variants interleaved")
    print(f"shutdown latency: median of {LATENCY_ROUNDS} rounds")
    print()
    row("measure", "wall", "cpu")
    print("-" * 72)
    row("bare respawn loop (nursery per attempt)", *us(bare))
    row("Supervisor, crashing TRANSIENT child", *us(supervised))
    row("  ratio Supervisor / bare (target <= 1.5)", *ratio(supervised, bare))
    row("Supervisor, `supervisor` logger silenced", *us(quiet))
    row("  ratio silenced / bare", *ratio(quiet, bare))
    row("bare loop, exception caught inside the task", *us(in_task))
    row("  ratio Supervisor / this", *ratio(supervised, in_task))
    if "triotp" in rounds:
        triotp = medians(rounds["triotp"])
        row("triotp 0.3.1 supervisor, same child", *us(triotp))
        row("  triotp / Supervisor (target >= 3)", *ratio(triotp, supervised))
    else:
        row("triotp: not installed (Python 3.13: pip install triotp==0.3.1)", "-")
    print("-" * 72)
    latency = f"{statistics.median(latencies) * 1e3:.2f} ms"
    row("shutdown() to run() returning, depth 5, 100 leaves", latency)
    row(f"memory per idle supervised child (of {IDLE_CHILDREN})", f"{per_child:.0f} B")
    row(f"memory per idle bare Trio task (of {IDLE_CHILDREN})", f"{per_task:.0f} B")

    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await supervised_respawn(RESTARTS)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        print()
        print(out.getvalue())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="add a cProfile breakdown")
    trio.run(main, parser.parse_args().profile)
