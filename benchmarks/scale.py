"""Usage: python benchmarks/scale.py [--sessions 2000] [--window 8] [--lease-ttl 3] [--gc-freeze]

Memory per session and heartbeat CPU per lease per second, with ``--sessions``
in-process sessions alive at once in one worker (``max_concurrency`` =
``--sessions``): each its own supervisor with a lease keeper and a runner, its
agent an async function waiting on an event. Two control planes, each
measured in a fresh child process (so each RSS baseline is clean):

* **embedded**: ``EmbeddedControlPlane`` on a real SQLite file in a temporary
  directory, store calls on worker threads (the default): every heartbeat is a
  write transaction behind a thread hop, the storage one machine pays for.
* **scripted**: ``supervisor.testing.ScriptedControlPlane``, the in-memory
  test double, so the worker's own cost shows apart from storage. It is built
  for tests, not speed (every call scans all items for expired leases and is
  recorded; the script drops those records as it goes), so its own cost is
  measured too and shown on its own column.

Steps, per control plane: queue the items; start the worker under
``tracemalloc`` (one frame per trace) and wait until every agent runs (the
ramp); read traced memory and ``VmRSS`` from ``/proc/self/status`` (minus what
tracing itself grew by), each as a delta from before the worker started,
divided by the session count. Tracing slows every allocation, so while it is
on the control plane grants 9 s leases (``--traced-ttl``) instead of the 3 s
asked for; it then goes back to granting 3 s, every lease adopts that at its
next beat, and after a settling second process CPU time (all threads) is
sampled over ``--window`` seconds of real time in ``--slices`` slices while
every lease renews once a second. CPU per lease per second is a slice's CPU
divided by leases x seconds (median slice shown); garbage-collector pauses in
the window are timed. Then every agent is released at once and the worker
drains: the script reports how many final stops (outcomes) reached the
control plane, and checks that no task or file descriptor was left behind.
Last, with no worker running, the control plane's own traced memory per live
lease and CPU per heartbeat call are measured (calls one after another), so
the worker's share is the difference. ``--gc-freeze`` (a diagnosis, off by
default) calls ``gc.freeze()`` once every session runs, which shows how much
of the heartbeat CPU is the cyclic garbage collector walking the long-lived
session objects. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import gc
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor import AgentContext, Worker, WorkerConfig
from supervisor.controlplane import (
    NO_HEARTBEAT,
    ControlPlane,
    EmbeddedControlPlane,
    HeartbeatResult,
    LeasePolicy,
    Outcome,
    WorkItem,
)
from supervisor.testing import ScriptedControlPlane


class BeatCounter:
    """Mixin for a control plane: counts heartbeats (with latencies) and accepted stops."""

    beats: int = 0
    stops: int = 0
    latencies: array.array[float]  # compact: the window holds tens of thousands

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        start = trio.current_time()
        result: HeartbeatResult = await super().heartbeat(  # type: ignore[misc]
            work_id,
            expected_last_heartbeat=expected_last_heartbeat,
            desired_ttl_seconds=desired_ttl_seconds,
        )
        self.beats += 1
        self.latencies.append(trio.current_time() - start)
        return result

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        item: WorkItem = await super().stop(  # type: ignore[misc]
            work_id, force=force, expected_last_heartbeat=expected_last_heartbeat, outcome=outcome
        )
        self.stops += 1
        return item


class CountingEmbedded(BeatCounter, EmbeddedControlPlane):
    """The embedded control plane, counting heartbeats."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.latencies = array.array("d")


class CountingScripted(BeatCounter, ScriptedControlPlane):
    """The scripted test double, counting heartbeats."""

    def __init__(self) -> None:
        super().__init__()
        self.latencies = array.array("d")


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.frozen
class PlaneCost:
    """The control plane alone: traced bytes per live item, CPU seconds per heartbeat call."""

    memory_per_item: float
    cpu_per_beat: float


@attrs.frozen
class Figures:
    """What one control plane's run measured (memory per session in bytes, CPU in seconds)."""

    label: str
    sessions: int
    ramp: float
    traced: float
    rss: float
    cpu_per_lease_s: list[float]
    beats_per_s: list[float]
    beat_p50: float
    beat_p99: float
    beat_max: float
    gc_share: float
    gc_longest: float
    plane: PlaneCost
    rss_growth: float
    lost_before_release: int
    lost_at_release: int
    alive_at_release: int
    completed: int
    outcomes_stored: int
    release_to_end: float
    leaked_tasks: int
    leaked_fds: int


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


OpenPlane = Callable[[Path], contextlib.AbstractAsyncContextManager[BeatCounter]]


async def measure(label: str, make_plane: OpenPlane, args: argparse.Namespace) -> Figures:
    """One worker with ``args.sessions`` live sessions on the plane ``make_plane`` opens."""
    sessions = args.sessions
    release = trio.Event()
    all_alive = trio.Event()
    alive = 0

    async def agent(ctx: AgentContext) -> str:
        nonlocal alive
        alive += 1
        if alive == sessions:
            all_alive.set()
        await release.wait()
        return "released"

    tasks_before = trio.lowlevel.current_statistics().tasks_living
    fds_before = open_fds()
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        directory = Path(tmp)
        async with make_plane(directory) as counting:
            plane: ControlPlane = counting  # type: ignore[assignment]
            for n in range(sessions):
                await plane.submit(f"wait {n}")
            config = WorkerConfig(
                state_dir=directory / "state",
                max_concurrency=sessions,
                lease_ttl=args.lease_ttl,
                poll_block_ms=20,
                api_enabled=False,
                worker_id=f"scale-{label}",
                drain_timeout=120.0,
            )
            worker = Worker(config, control_plane=plane, agent=agent)
            # Tracing slows every allocation: while it is on, the plane grants
            # longer leases than asked for, so that renewals cannot fall behind.
            grant_ttl(plane, args.traced_ttl)
            gc.collect()
            # One frame per trace: deeper tracebacks slow a Trio program several times over.
            tracemalloc.start(1)
            traced_before = tracemalloc.get_traced_memory()[0]
            rss_before = rss_bytes() - tracemalloc.get_tracemalloc_memory()
            async with trio.open_nursery() as nursery:
                ramp_start = time.perf_counter()
                await nursery.start(worker.run)
                await all_alive.wait()
                ramp = time.perf_counter() - ramp_start
                _forget_calls(counting)
                traced_after = tracemalloc.get_traced_memory()[0]
                rss_after = rss_bytes() - tracemalloc.get_tracemalloc_memory()
                tracemalloc.stop()

                # Back to the ttl asked for; each lease adopts it at its next beat.
                grant_ttl(plane, None)
                if args.gc_freeze:
                    gc.freeze()  # every object alive now moves out of the collector's sight
                await trio.sleep(args.traced_ttl / 3 + args.settle)
                del counting.latencies[:]
                cpu_per_lease_s: list[float] = []
                beats_per_s: list[float] = []
                slice_s = args.window / args.slices
                pauses = GcPauses()
                window_cpu, window_rss, window_start = (
                    cpu_seconds(),
                    rss_bytes(),
                    time.perf_counter(),
                )
                with pauses:
                    for _ in range(args.slices):
                        cpu0, beats0, t0 = cpu_seconds(), counting.beats, time.perf_counter()
                        await trio.sleep(slice_s)
                        cpu1, beats1, t1 = cpu_seconds(), counting.beats, time.perf_counter()
                        leases = worker.stats().active
                        cpu_per_lease_s.append((cpu1 - cpu0) / (max(leases, 1) * (t1 - t0)))
                        beats_per_s.append((beats1 - beats0) / (t1 - t0))
                        _forget_calls(counting)
                window_cpu = cpu_seconds() - window_cpu
                rss_growth = (rss_bytes() - window_rss) / (time.perf_counter() - window_start)
                latencies = sorted(counting.latencies)
                before_release = worker.stats()

                release_start = time.perf_counter()
                stops_before = counting.stops
                release.set()
                await worker.drain()
                release_to_end = time.perf_counter() - release_start
            stats = worker.stats()
            stored = counting.stops - stops_before
            cost = await plane_cost(plane, items=200, calls=2000)
    return Figures(
        label=label,
        sessions=sessions,
        ramp=ramp,
        traced=(traced_after - traced_before) / sessions,
        rss=(rss_after - rss_before) / sessions,
        cpu_per_lease_s=cpu_per_lease_s,
        beats_per_s=beats_per_s,
        beat_p50=_quantile(latencies, 0.5),
        beat_p99=_quantile(latencies, 0.99),
        beat_max=_quantile(latencies, 1.0),
        gc_share=sum(pauses.pauses) / window_cpu,
        gc_longest=max(pauses.pauses, default=0.0),
        plane=cost,
        rss_growth=rss_growth,
        lost_before_release=before_release.lease_losses,
        lost_at_release=stats.lease_losses - before_release.lease_losses,
        alive_at_release=before_release.active,
        completed=stats.outcomes.get("completed", 0),
        outcomes_stored=stored,
        release_to_end=release_to_end,
        leaked_tasks=trio.lowlevel.current_statistics().tasks_living - tasks_before,
        leaked_fds=open_fds() - fds_before,
    )


class GcPauses:
    """Records how long each garbage collection takes while the block runs."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)


def grant_ttl(plane: ControlPlane, ttl: float | None) -> None:
    """Make the plane grant at least ``ttl`` seconds per lease (``None``: its default policy)."""
    if isinstance(plane, ScriptedControlPlane):
        plane.min_ttl = ttl if ttl is not None else 0.1
    elif isinstance(plane, EmbeddedControlPlane):
        policy = LeasePolicy(min_ttl=ttl) if ttl is not None else LeasePolicy()
        plane.store.lease_policy = policy


def _forget_calls(plane: object) -> None:
    """Drop the scripted double's record of past calls (a test aid that grows per call)."""
    if isinstance(plane, ScriptedControlPlane):
        plane.calls.clear()


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


async def plane_cost(plane: ControlPlane, *, items: int, calls: int) -> PlaneCost:
    """The control plane's own costs, measured on it with no worker running.

    ``items`` fresh items are queued, then claimed and confirmed by hand
    (traced, for the memory a live lease costs the plane, as in the worker
    run where items were queued before tracing began), then ``calls`` heartbeats go round
    them one after another (for the CPU per call, thread hops included).
    """
    tokens: dict[str, str] = {}
    for n in range(items):
        await plane.submit(f"cost {n}")
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(items):
        item = await plane.poll(worker_id="cost")
        assert item is not None
        await plane.ack(item.id, worker_id="cost")
        beat = await plane.heartbeat(
            item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=60.0
        )
        tokens[item.id] = beat.last_heartbeat
    _forget_calls(plane)
    memory = (tracemalloc.get_traced_memory()[0] - before) / items
    tracemalloc.stop()
    ids = list(tokens)
    start = cpu_seconds()
    for n in range(calls):
        work_id = ids[n % len(ids)]
        beat = await plane.heartbeat(
            work_id, expected_last_heartbeat=tokens[work_id], desired_ttl_seconds=60.0
        )
        tokens[work_id] = beat.last_heartbeat
    return PlaneCost(memory_per_item=memory, cpu_per_beat=(cpu_seconds() - start) / calls)


@contextlib.asynccontextmanager
async def open_embedded(directory: Path) -> AsyncIterator[BeatCounter]:
    plane = CountingEmbedded(directory / "cp.sqlite3")
    try:
        yield plane
    finally:
        await plane.aclose()


@contextlib.asynccontextmanager
async def open_scripted(directory: Path) -> AsyncIterator[BeatCounter]:
    plane = CountingScripted()
    try:
        yield plane
    finally:
        await plane.aclose()


PLANES: dict[str, OpenPlane] = {"embedded": open_embedded, "scripted": open_scripted}


def report(results: list[Figures]) -> None:
    print(f"\n{'':<28}{'memory, KiB per session':^32}{'heartbeat CPU, µs per lease-second':^42}")
    header = (
        f"{'control plane':<12}{'ramp s':>7}{'beats/s':>9}"
        f"{'traced':>8}{'plane':>8}{'worker':>8}{'RSS':>8}"
        f"{'total':>9}{'min..max':>13}{'plane':>9}{'worker':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        total = statistics.median(r.cpu_per_lease_s)
        beats = statistics.median(r.beats_per_s)
        # The plane's share per lease-second: its CPU per call x calls per lease per second.
        plane = r.plane.cpu_per_beat * beats / r.sessions
        spread = f"{min(r.cpu_per_lease_s) * 1e6:.0f}..{max(r.cpu_per_lease_s) * 1e6:.0f}"
        print(
            f"{r.label:<12}{r.ramp:>7.1f}{beats:>9.0f}"
            f"{_kib(r.traced):>8}{_kib(r.plane.memory_per_item):>8}"
            f"{_kib(r.traced - r.plane.memory_per_item):>8}{_kib(r.rss):>8}"
            f"{total * 1e6:>9.0f}{spread:>13}{plane * 1e6:>9.0f}{(total - plane) * 1e6:>9.0f}"
        )
    print(
        "\nramp = worker start until every agent runs (traced; claims are made one at a time)."
        "\nmemory: traced = tracemalloc delta over the ramp; plane = traced bytes per live lease"
        "\nof the control plane alone (SQLite's own memory is not traced); worker = traced -"
        "\nplane; RSS = VmRSS delta minus tracemalloc's own growth."
        "\nCPU: total = process CPU, all threads, / (live leases x seconds), median slice;"
        "\nplane = the control plane's CPU per heartbeat call, measured alone, x beats per"
        "\nlease-second; worker = total - plane."
    )
    print(f"\n{'':<14}{'in the CPU window':^44}{'after releasing every agent at once':^46}")
    header = (
        f"{'control plane':<14}{'beat p50/p99/max ms':>20}{'GC share/max ms':>16}{'RSS KiB/s':>10}"
        f"{'lost':>6}{'lost':>6}{'completed':>10}{'stored':>8}{'to end s':>9}{'leaks':>7}"
    )
    print(f"{header}\n{'-' * len(header)}")
    for r in results:
        latency = f"{r.beat_p50 * 1e3:.1f}/{r.beat_p99 * 1e3:.0f}/{r.beat_max * 1e3:.0f}"
        gc_figures = f"{r.gc_share:.0%}/{r.gc_longest * 1e3:.0f}"
        print(
            f"{r.label:<14}{latency:>20}{gc_figures:>16}{r.rss_growth / 1024:>10.0f}"
            f"{r.lost_before_release:>6}{r.lost_at_release:>6}{r.completed:>10}"
            f"{r.outcomes_stored:>8}{r.release_to_end:>9.2f}"
            f"{f'{r.leaked_tasks}/{r.leaked_fds}':>7}"
        )
    print(
        "\nbeat = heartbeat call latency; GC = share of the window's CPU spent in the garbage"
        "\ncollector, and its longest pause; RSS KiB/s = resident growth over the window; lost ="
        "\nsessions ended by a lost lease (before the release, ramp included; then during it);"
        "\ncompleted = sessions that ended completed; stored = final stops (outcomes) the control"
        "\nplane accepted for the released sessions (a stop is never sent once a lease's"
        "\ndeadline passed); to end = release until the worker drained; leaks = tasks / file"
        "\ndescriptors left once the worker ended."
    )


def _kib(value: float) -> str:
    return f"{value / 1024:.1f}"


def measure_in_child(plane: str, args: argparse.Namespace) -> tuple[Figures, Counter[str]]:
    """Run one control plane's measurement in a fresh interpreter, for a clean RSS baseline.

    Returns its figures and a count of the log records it wrote, by level and logger.
    """
    command = [sys.executable, __file__, "--plane", plane]
    for name in ("sessions", "window", "slices", "settle", "traced_ttl", "lease_ttl"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.gc_freeze:
        command.append("--gc-freeze")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith(RESULT):
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"the {plane} run failed with exit code {done.returncode}")
    data = json.loads(lines[-1].removeprefix(RESULT))
    figures = Figures(**{**data, "plane": PlaneCost(**data["plane"])})
    logs: Counter[str] = Counter()
    for line in done.stderr.splitlines():
        level, _, rest = line.partition(":")
        if level in ("WARNING", "ERROR", "CRITICAL"):
            logger_name, _, message = rest.partition(":")
            # Ids and numbers vary from line to line; the wording says what happened.
            words = ["#" if any(c.isdigit() for c in w) else w for w in message.split()]
            logs[f"{level} {logger_name}: {' '.join(words)[:90]}"] += 1
    return figures, logs


RESULT = "RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--sessions", type=int, default=2000, help="live sessions (2000)")
    parser.add_argument("--window", type=float, default=8.0, help="CPU window, seconds (8)")
    parser.add_argument("--slices", type=int, default=4, help="slices of the window (4)")
    parser.add_argument("--settle", type=float, default=1.0, help="pause before the window (1)")
    parser.add_argument(
        "--traced-ttl", type=float, default=9.0, help="lease ttl granted while tracing (9)"
    )
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="lease ttl asked for (3)")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="diagnosis: gc.freeze() once every session runs, to show the collector's share",
    )
    parser.add_argument("--plane", choices=sorted(PLANES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plane is not None:
        # One measurement, in this (child) process; the parent reads the last line.
        logging.basicConfig(level=logging.WARNING)
        figures = trio.run(measure, args.plane, PLANES[args.plane], args)
        print(RESULT + json.dumps(attrs.asdict(figures)))
        return 0

    started = time.perf_counter()
    print(
        f"scale: {args.sessions} live in-process sessions, lease ttl {args.lease_ttl:g} s "
        f"(a beat per lease every {args.lease_ttl / 3:g} s), CPU window {args.window:g} s "
        f"in {args.slices} slices; python {sys.version.split()[0]}, {os.cpu_count()} cpus"
    )
    results: list[Figures] = []
    logs: dict[str, Counter[str]] = {}
    for plane in PLANES:
        figures, logs[plane] = measure_in_child(plane, args)
        results.append(figures)
    report(results)
    for plane, counts in logs.items():
        print(f"\nlog records of the {plane} run, most frequent first (ids and numbers as #):")
        for what, n in counts.most_common(5):
            print(f"  {n:>6}  {what}")
        if not counts:
            print("  none")
    print(f"\ntook {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
