"""Usage: python benchmarks/throughput.py [--items 300] [--rounds 5] [--concurrency 8] [--profile]

Sessions/s through an embedded worker running ``/bin/true`` against a bare
``trio.run_process`` loop at the same concurrency, in one process and one
``trio.run``, rounds interleaved so that a machine getting busier or quieter
shifts every row alike. Medians over ``--rounds``; the ratio is each row's
rate over the bare rate (the worker's target is >= 0.5).

* **bare**: ``concurrency`` tasks each looping ``await
  trio.run_process(["/bin/true"])`` until ``items`` processes ran: nothing but
  fork/exec/wait.
* **agent layer**: the same loop through ``AgentRunner.run``, the call a
  session's runner makes: environment allowlist, a log file per run, pipes
  read line by line, a new process group, the group teardown, orphan reaping.
  What it costs to run an agent safely, with no control plane involved.
* **worker**: a :class:`~supervisor.Worker` on an ``EmbeddedControlPlane``
  over a real SQLite file in a temporary directory, ``none`` workspaces,
  agent ``/bin/true``, ``max_concurrency`` = ``concurrency``, a 20 ms long
  poll. ``items`` are queued before the worker starts; the clock runs from
  the worker being ready until the last item's final ``stop`` (its outcome)
  is in the store. Each session pays four store transactions (poll, ack,
  first heartbeat, stop) in the store's thread, a workspace directory made
  and removed, a log file created and a journal line fsynced in the worker's
  I/O thread, and its own supervisor with a lease keeper and a runner. A
  second worker row runs the store calls in the event-loop thread
  (``threaded=False``) to show what the thread hand-over costs.
* **without its reaper**: the threaded worker row with ``agent_reaper=False``:
  what telling the reaper process about each agent (three short pipe writes,
  and its ``/proc`` walks) costs, against the worker row above it.
* **no-op**: the threaded worker row with an in-process agent that returns at
  once: everything a session costs except the process. Its rate is the
  worker's ceiling on this machine whatever the agent.

CPU columns split each session's CPU between the event-loop thread, the
store and I/O threads, Trio's threads, and the agent processes (Linux: per
thread from ``/proc``). After the table: one timed
worker round (control-plane call latencies, the poller's claim cycle,
sessions in flight) and the worker's rate at 2, 8 and 32 slots.
``--profile`` adds one worker round under cProfile (event-loop thread only).
Figures are printed, never asserted: they depend on the machine.

The worker rows keep their state (SQLite file, workspaces, logs, journal) in
a temporary directory; the header names it and its file system. Creating a
file costs from a few µs (tmpfs) to over 0.5 ms of kernel CPU (a busy
ext4), and a worker creates two per session, so run once more with
``TMPDIR=/dev/shm`` to see the worker without the disk.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import logging
import os
import pstats
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor import AgentSpec, Worker, WorkerConfig
from supervisor.controlplane import EmbeddedControlPlane, HeartbeatResult, Outcome, WorkItem
from supervisor.lowlevel import AgentRunner, SessionOutput

AGENT = "/bin/true"


#: Thread groups of the CPU columns, by OS thread name (Linux names, 15 characters).
THREAD_GROUPS = (("supervisor-stor", "store"), ("supervisor-io", "io"))


def _threads_cpu() -> dict[str, float]:
    """CPU seconds so far by thread group (store lane, I/O lane, other), from /proc."""
    groups: dict[str, float] = defaultdict(float)
    main = threading.main_thread().native_id
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    for tid in tids:
        if int(tid) == main:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        group = next((g for prefix, g in THREAD_GROUPS if name.startswith(prefix)), "other")
        groups[group] += (int(fields[11]) + int(fields[12])) / tick
    return dict(groups)


@attrs.frozen
class Cpu:
    """CPU seconds used: by the event-loop thread, the whole process, reaped children,
    and the other threads by group (see `THREAD_GROUPS`; Linux only, else empty)."""

    loop: float
    process: float
    children: float
    threads: dict[str, float]

    @classmethod
    def now(cls) -> Cpu:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            loop=time.thread_time(),
            process=own.ru_utime + own.ru_stime,
            children=kids.ru_utime + kids.ru_stime,
            threads=_threads_cpu(),
        )

    def __sub__(self, other: Cpu) -> Cpu:
        # A thread that exited during the round takes its CPU along: clamp at 0.
        threads = {
            group: max(0.0, seconds - other.threads.get(group, 0.0))
            for group, seconds in self.threads.items()
        }
        return Cpu(
            self.loop - other.loop,
            self.process - other.process,
            self.children - other.children,
            threads,
        )


@attrs.frozen
class Round:
    """One measured round: wall seconds and CPU used."""

    seconds: float
    cpu: Cpu


async def bare_round(items: int, concurrency: int) -> Round:
    """``items`` runs of ``/bin/true`` by ``concurrency`` looping tasks."""
    left = items

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await trio.run_process([AGENT])

    cpu = Cpu.now()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(loop)
    return Round(time.perf_counter() - start, Cpu.now() - cpu)


async def agent_round(items: int, concurrency: int, directory: Path) -> Round:
    """``items`` runs through the worker's agent layer (``AgentRunner.run``), nothing else.

    The same call a session's runner makes: environment policy, a log file
    per run, pipes, a new process group, the group teardown, orphan reaping.
    """
    left = items
    agent = AgentRunner(AgentSpec.from_argv([AGENT]), reap_orphans=True)
    logs = directory / "logs"
    logs.mkdir()

    async def loop(n: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            result = await agent.run(
                prompt="p",
                work_id=f"w-{left}",
                session_id=f"s-{left}",
                workspace=directory,
                output=SessionOutput(log_path=logs / f"{n}-{left}.log"),
            )
            assert result.exit_code == 0, result

    cpu = Cpu.now()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(loop, n)
    return Round(time.perf_counter() - start, Cpu.now() - cpu)


class CountingPlane(EmbeddedControlPlane):
    """The embedded control plane, counting final stops (one per finished session).

    ``all_stopped`` is set once ``expected`` items were stopped: the moment the
    last session's outcome is in the store. With ``timed=True`` every work
    call is also recorded as ``(method, work id, start, end)`` on the trio clock.
    """

    def __init__(self, path: Path, expected: int, *, threaded: bool, timed: bool) -> None:
        super().__init__(path, threaded=threaded)
        self.expected = expected
        self.stopped = 0
        self.all_stopped = trio.Event()
        self.timed = timed
        self.calls: list[tuple[str, str | None, float, float]] = []

    async def poll(
        self,
        *,
        worker_id: str,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        start = trio.current_time()
        item = await super().poll(
            worker_id=worker_id,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=labels,
        )
        if self.timed:
            self.calls.append(("poll", item.id if item else None, start, trio.current_time()))
        return item

    async def ack(self, work_id: str, *, worker_id: str) -> WorkItem:
        start = trio.current_time()
        item = await super().ack(work_id, worker_id=worker_id)
        if self.timed:
            self.calls.append(("ack", work_id, start, trio.current_time()))
        return item

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        start = trio.current_time()
        result = await super().heartbeat(
            work_id,
            expected_last_heartbeat=expected_last_heartbeat,
            desired_ttl_seconds=desired_ttl_seconds,
        )
        if self.timed:
            self.calls.append(("heartbeat", work_id, start, trio.current_time()))
        return result

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        start = trio.current_time()
        item = await super().stop(
            work_id, force=force, expected_last_heartbeat=expected_last_heartbeat, outcome=outcome
        )
        if self.timed:
            self.calls.append(("stop", work_id, start, trio.current_time()))
        self.stopped += 1
        if self.stopped >= self.expected:
            self.all_stopped.set()
        return item


async def no_op(ctx: object) -> str:
    """An in-process agent that does nothing: the worker's own cost, with no process at all."""
    await trio.lowlevel.checkpoint()
    return "done"


@attrs.frozen
class WorkerRound(Round):
    """One worker round: its duration and CPU, its sessions, and the plane it used."""

    completed: int
    lifetimes: list[float]
    plane: CountingPlane


async def worker_round(
    items: int,
    concurrency: int,
    directory: Path,
    *,
    threaded: bool = True,
    timed: bool = False,
    profiler: cProfile.Profile | None = None,
    in_process: bool = False,
    reaper: bool = True,
) -> WorkerRound:
    """``items`` sessions through a worker, queued before it starts; timed from ready to done."""
    plane = CountingPlane(directory / "cp.sqlite3", items, threaded=threaded, timed=timed)
    try:
        for n in range(items):
            await plane.submit(f"item {n}")
        config = WorkerConfig(
            state_dir=directory / "state",
            max_concurrency=concurrency,
            agent=AGENT,
            workspace="none",
            poll_block_ms=20,
            api_enabled=False,
            worker_id="bench",
            drain_timeout=5.0,
            agent_reaper=reaper,
        )
        worker = Worker(config, control_plane=plane, agent=no_op if in_process else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            if profiler is not None:
                profiler.enable()
            cpu = Cpu.now()
            start = time.perf_counter()
            await plane.all_stopped.wait()
            elapsed = time.perf_counter() - start
            cpu = Cpu.now() - cpu
            if profiler is not None:
                profiler.disable()
            await worker.drain()
    finally:
        await plane.aclose()
    records = worker.sessions()
    return WorkerRound(
        seconds=elapsed,
        cpu=cpu,
        completed=worker.stats().outcomes.get("completed", 0),
        lifetimes=[r.ended_at - r.started_at for r in records if r.ended_at is not None],
        plane=plane,
    )


def print_anatomy(result: WorkerRound, concurrency: int) -> None:
    """Where a session's time goes, from one round on the timed control plane."""
    calls = result.plane.calls
    rate = len(result.lifetimes) / result.seconds
    print(f"\nanatomy of one extra worker round (timed plane, {rate:.0f} sessions/s)")
    print(f"  {'control-plane call':<30}{'calls':>8}{'median ms':>12}{'p90 ms':>10}")
    for method in ("poll", "ack", "heartbeat", "stop"):
        took = sorted(end - start for m, _, start, end in calls if m == method)
        if took:
            p90 = took[int(0.9 * (len(took) - 1))]
            print(f"  {method:<30}{len(took):>8}{_ms(statistics.median(took)):>12}{_ms(p90):>10}")
    polls = sorted(start for m, _, start, _end in calls if m == "poll")
    cycle = statistics.median(b - a for a, b in itertools.pairwise(polls))
    claimed = {wid: start for m, wid, start, _end in calls if m == "poll" and wid}
    confirmed = {wid: end for m, wid, _start, end in calls if m == "heartbeat"}
    hand_over = statistics.median(confirmed[w] - claimed[w] for w in claimed if w in confirmed)
    lifetime = statistics.mean(result.lifetimes)
    print(
        f"  poller claim cycle (poll start to next poll start), median: {_ms(cycle)} ms"
        f" -> at most {1 / cycle:.0f} claims/s from the one poller"
    )
    print(f"    of which poll + ack + first heartbeat (lease confirmed): {_ms(hand_over)} ms")
    print(
        f"  session lifetime (hand-over to end, final stop included), mean: {_ms(lifetime)} ms"
        f" -> sessions in flight on average (rate x lifetime): {rate * lifetime:.1f}"
        f" of {concurrency}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def print_profile(profiler: cProfile.Profile, wall: float, top: int = 16) -> None:
    """Own time by module (C functions named one by one) and the costliest functions.

    cProfile sees the event-loop thread only: store calls made in worker
    threads show up as the loop waiting (``epoll.poll``), not as SQLite time.
    """
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = stats.stats  # type: ignore[attr-defined]
    by_module: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in rows.items():
        by_module[_module_label(filename, name)] += tottime
    total = sum(by_module.values())
    print(f"\nprofile of one worker round ({wall:.2f} s wall; event-loop thread only)")
    print(f"  {'own time by module (C functions by name)':<56}{'s':>8}{'share':>8}")
    for label, seconds in sorted(by_module.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {label[:56]:<56}{seconds:>8.3f}{seconds / total:>8.1%}")
    print(f"\n  {'supervisor functions by cumulative time':<56}{'s':>8}{'calls':>8}")
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][3])
    shown = 0
    for (filename, _line, name), (_cc, ncalls, _tt, cumtime, _callers) in ranked:
        label = _module_label(filename, name)
        if not label.startswith("supervisor/"):
            continue
        print(f"  {(label + ':' + name)[:56]:<56}{cumtime:>8.3f}{ncalls:>8}")
        shown += 1
        if shown >= top:
            break


def _module_label(filename: str, name: str) -> str:
    if filename == "~":
        return f"C: {name.strip('<>').removeprefix('built-in method ')}"
    parts = Path(filename).parts
    for anchor in ("supervisor", "trio", "attr", "outcome", "sqlite3"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index:])
    return Path(filename).name


ROWS = (
    ("bare", "bare trio.run_process loop"),
    ("agent", "agent layer loop (AgentRunner.run, no worker)"),
    ("worker", "worker, embedded SQLite (threaded store calls)"),
    ("inline", "worker, embedded SQLite (store calls inline)"),
    ("no-reaper", "worker, threaded, without its reaper (§3.8)"),
    ("no-op", "worker, in-process no-op agent (no process)"),
)


async def run(args: argparse.Namespace) -> None:
    items, rounds, concurrency = args.items, args.rounds, args.concurrency
    results: dict[str, list[Round]] = defaultdict(list)
    completed: set[int] = set()
    for _ in range(rounds):
        results["bare"].append(await bare_round(items, concurrency))
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
            results["agent"].append(await agent_round(items, concurrency, Path(tmp)))
        for key, threaded, in_process, reaper in (
            ("worker", True, False, True),
            ("inline", False, False, True),
            ("no-reaper", True, False, False),
            ("no-op", True, True, True),
        ):
            with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
                result = await worker_round(
                    items,
                    concurrency,
                    Path(tmp),
                    threaded=threaded,
                    in_process=in_process,
                    reaper=reaper,
                )
            results[key].append(result)
            completed.add(result.completed)

    bare_rate = items / statistics.median(r.seconds for r in results["bare"])
    header = (
        f"{'row':<48}{'sessions/s':>11}{'min..max':>12}{'ratio':>7}"
        f"{'loop':>7}{'store':>7}{'io':>6}{'other':>7}{'procs':>7}{'total':>7}"
    )
    print(f"{'':<78}{'CPU ms per session':>32}")
    print(header)
    print("-" * len(header))
    for key, label in ROWS:
        rows = results[key]
        rate = items / statistics.median(r.seconds for r in rows)
        fastest, slowest = min(r.seconds for r in rows), max(r.seconds for r in rows)
        spread = f"{items / slowest:.0f}..{items / fastest:.0f}"
        cpu = {
            "loop": statistics.median(r.cpu.loop for r in rows) / items,
            "procs": statistics.median(r.cpu.children for r in rows) / items,
            "total": statistics.median(r.cpu.process + r.cpu.children for r in rows) / items,
        }
        for group in ("store", "io", "other"):
            cpu[group] = statistics.median(r.cpu.threads.get(group, 0.0) for r in rows) / items
        print(
            f"{label:<48}{rate:>11.0f}{spread:>12}{rate / bare_rate:>7.2f}"
            f"{_ms(cpu['loop']):>7}{_ms(cpu['store']):>7}{_ms(cpu['io']):>6}"
            f"{_ms(cpu['other']):>7}{_ms(cpu['procs']):>7}{_ms(cpu['total']):>7}"
        )
    print(
        "\nloop = the event-loop thread; store = the embedded control plane's thread; io = the"
        "\nworker's I/O thread (workspace directories, session logs, journal fsyncs); other ="
        "\nTrio's threads (each spawn's fork/exec runs in one); procs = the /bin/true children;"
        "\ntotal = all of it. Thread columns are sampled in clock ticks (10 ms), so a round of"
        "\n300 sessions resolves about 0.03 ms per session."
        f"\nworker sessions completed per round: {sorted(completed)} of {items}"
    )

    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        print_anatomy(await worker_round(items, concurrency, Path(tmp), timed=True), concurrency)

    # If one claim at a time is the ceiling, more session slots do not raise the rate.
    print(f"\n  worker sessions/s by max_concurrency (one round each, {items} items):")
    sweep = []
    for slots in (2, 8, 32):
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
            result = await worker_round(items, slots, Path(tmp))
        sweep.append(f"{slots}: {items / result.seconds:.0f}")
    print("    " + "   ".join(sweep))

    if args.profile:
        profiler = cProfile.Profile()
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
            result = await worker_round(items, concurrency, Path(tmp), profiler=profiler)
        print_profile(profiler, result.seconds)


def _file_system(path: str) -> str:
    """The type of the file system ``path`` is on (Linux), else ``"?"``."""
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--items", type=int, default=300, help="sessions per round (300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians shown (5)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent sessions (8)")
    parser.add_argument("--profile", action="store_true", help="profile one extra worker round")
    args = parser.parse_args(argv)
    # Session ends are logged at INFO; keep warnings visible, nothing else.
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    print(
        f"throughput: {args.items} sessions per round, concurrency {args.concurrency}, "
        f"median of {args.rounds} rounds, agent {AGENT}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus"
    )
    state = os.path.realpath(tempfile.gettempdir())
    print(f"worker state in {state} ({_file_system(state)}; set TMPDIR to move it)\n")
    trio.run(run, args)
    print(f"\ntook {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
