"""Usage: python benchmarks/peers.py [--items 300] [--rounds 3] [--concurrency 2 8 32] [--dir PATH]
[--only NAME ...]

This worker against the job systems its users would pick instead, doing the same work
in the same run: every job runs ``/bin/true`` as a subprocess, at the same concurrency.

* **bare**: ``concurrency`` Trio tasks looping ``trio.run_process(["/bin/true"])``; the floor.
* **supervisor**: a :class:`~supervisor.Worker` on the embedded control plane (a SQLite file,
  WAL), ``none`` workspaces, agent ``/bin/true``: at-least-once delivery, a fenced lease per
  item, the outcome recorded durably before the item counts as done.
* **huey**: ``SqliteHuey`` (``fsync=True``), a thread consumer with ``concurrency`` workers,
  10 ms initial poll delay; the task calls ``subprocess.run``. Results stored.
* **procrastinate**: on the PostgreSQL at ``--database`` (its own schema in a scratch
  database), ``run_worker_async(concurrency=...)`` with LISTEN/NOTIFY; the task runs the
  process with asyncio. Skipped when no server answers.
* **arq**: Redis at ``--redis``, ``max_jobs=concurrency``, 5 ms poll delay, burst mode.
  Skipped when no server answers.

Each system runs in a child process of its own, one round after another, systems
interleaved so that a machine getting busier shifts every row alike. Figures are medians
over ``--rounds``, jobs/s and CPU with the lowest and highest round in brackets (the
spread shows how noisy the machine was):

* **jobs/s**: ``items`` queued before the consumer starts; from consumer start to the last
  job done.
* **CPU ms/job**: user + system CPU over the timed window only: the child, the processes it
  waited for (the ``/bin/true`` runs) and the database server's processes (``postgres``,
  ``redis-server``, read from ``/proc``). Other load on those servers
  counts too: run on a quiet machine.
* **enqueue→start p50/p99**: a second, paced phase queues ``items`` jobs at a fixed rate
  well under every system's capacity while the consumer runs; each job's start time (the
  handler's first line; for this worker, the grant of the item's lease, which an in-process
  store makes in the claim's transaction) less its enqueue time. Like a handler's first
  line, it comes before the job's own process starts: here, before the session's
  workspace, log and agent process are made.

The peers are benchmark-only dependencies: ``pip install -e '.[bench]'``. A peer that is not
installed, or whose server does not answer, is reported as skipped, never faked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRUE = "/bin/true"
SYSTEMS = ("bare", "supervisor", "huey", "procrastinate", "arq")
SERVERS = {"procrastinate": ("postgres",), "arq": ("redis-server",)}
DURABILITY = {
    "bare": "none: nothing queued, nothing recorded",
    "supervisor": "at-least-once, fenced leases, outcome committed (SQLite WAL)",
    "huey": "at-most-once once dequeued, result stored (SQLite, fsync)",
    "procrastinate": "at-least-once with stalled-job retry, status in PostgreSQL",
    "arq": "at-least-once (job kept until done), result in Redis (no fsync)",
}


# --- children: one system, one phase, prints one JSON line -----------------------------------


class Window:
    """CPU seconds spent between ``start()`` and ``stop()``: this process, the children it
    waited for, its long-lived helper processes (alive at both ends, such as this worker's
    reaper: a child not yet waited for is in no ``getrusage`` figure) and the named server
    processes (both read from ``/proc``)."""

    def __init__(self, servers: tuple[str, ...] = ()) -> None:
        self.servers = servers
        self.seconds = 0.0
        self.cpu = 0.0

    @staticmethod
    def _own() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._helpers = _children_cpu(os.getpid())
        servers = _server_cpu(self.servers)
        self._cpu = self._own() + servers  # the walks above cost nothing in the window

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self._wall
        own = self._own()  # before the /proc walks, which cost CPU of their own
        before = self._helpers
        now = _children_cpu(os.getpid())
        lived = sum(cpu - before[pid] for pid, cpu in now.items() if pid in before)
        self.cpu = own + _server_cpu(self.servers) + lived - self._cpu

    def result(self, latencies: list[float]) -> dict[str, Any]:
        return {"seconds": self.seconds, "cpu": self.cpu, "latencies": latencies}


def _paced(items: int, rate: float, enqueue: Callable[[int], None]) -> None:
    start = time.monotonic()
    for n in range(items):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        enqueue(n)


def child_bare(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    window = Window()

    async def main() -> None:
        left = args.items

        async def loop() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await trio.run_process([TRUE])

        window.start()
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(loop)
        window.stop()

    trio.run(main)
    return window.result([])


def child_supervisor(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from supervisor import Worker, WorkerConfig
    from supervisor.controlplane import EmbeddedControlPlane

    state = Path(args.state)
    window = Window()

    async def main() -> dict[str, Any]:
        plane = EmbeddedControlPlane(state / "cp.sqlite3")
        try:
            paced = args.phase == "latency"
            ids: list[str] = []
            if not paced:
                for n in range(args.items):
                    ids.append((await plane.submit(f"item {n}")).id)
            config = WorkerConfig(
                state_dir=state / "worker",
                max_concurrency=args.concurrency,
                agent=TRUE,
                workspace="none",
                poll_block_ms=20,
                api_enabled=False,
                worker_id="bench",
                drain_timeout=5.0,
            )
            worker = Worker(config, control_plane=plane)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                window.start()
                if paced:
                    begin = trio.current_time()
                    for n in range(args.items):
                        await trio.sleep_until(begin + n / args.rate)
                        ids.append((await plane.submit(f"item {n}")).id)
                # Done means the outcome is committed: a session ends after its final stop.
                for work_id in ids:
                    await worker.wait(work_id)
                window.stop()
                await worker.drain()
                nursery.cancel_scope.cancel()
            items = await _all_items(plane)
        finally:
            await plane.aclose()
        done = [i for i in items if i.outcome is not None and i.outcome.status == "completed"]
        if len(done) != args.items:
            raise SystemExit(f"supervisor: {len(done)} of {args.items} items completed")
        latencies = [
            (i.started_at - i.created_at) * 1000
            for i in items
            if i.started_at is not None and i.created_at is not None
        ]
        return window.result(latencies if paced else [])

    return trio.run(main)


async def _all_items(plane: Any) -> list[Any]:
    items: list[Any] = []
    page = 0
    while True:
        batch = await plane.list_work(limit=500, page=page)
        items += batch
        if len(batch) < 500:
            return items
        page += 1


def child_huey(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from huey import SqliteHuey

    logging.getLogger("huey").setLevel(logging.WARNING)
    huey = SqliteHuey(filename=str(Path(args.state) / "huey.db"), fsync=True)

    @huey.task()
    def run_true(enqueued: float) -> float:
        started = time.time()
        subprocess.run([TRUE], check=True)
        return (started - enqueued) * 1000

    results = []
    paced = args.phase == "latency"
    if not paced:
        results = [run_true(time.time()) for _ in range(args.items)]
    consumer = huey.create_consumer(
        workers=args.concurrency,
        worker_type="thread",
        periodic=False,
        initial_delay=0.01,
        backoff=1.15,
        max_delay=0.1,
        check_worker_health=False,
    )
    window = Window()
    consumer.start()
    window.start()
    try:
        if paced:
            _paced(args.items, args.rate, lambda n: results.append(run_true(time.time())))
        latencies = [r.get(blocking=True, timeout=120) for r in results]
        window.stop()
    finally:
        consumer.stop(graceful=True)
    return window.result(latencies if paced else [])


def child_procrastinate(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    connector = procrastinate.PsycopgConnector(conninfo=_scratch_database(args.database))
    app = procrastinate.App(connector=connector)
    latencies: list[float] = []
    all_started = asyncio.Event()

    @app.task(name="run_true")
    async def run_true(enqueued: float) -> None:
        latencies.append((time.time() - enqueued) * 1000)
        if len(latencies) == args.items:
            all_started.set()
        process = await asyncio.create_subprocess_exec(TRUE)
        await process.wait()

    window = Window(SERVERS["procrastinate"])

    async def main() -> None:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            paced = args.phase == "latency"
            if not paced:
                for _ in range(args.items):
                    await run_true.defer_async(enqueued=time.time())
            window.start()
            worker = asyncio.create_task(
                app.run_worker_async(
                    concurrency=args.concurrency,
                    wait=paced,
                    install_signal_handlers=False,
                    delete_jobs="successful",
                )
            )
            if paced:
                begin = time.monotonic()
                for n in range(args.items):
                    await asyncio.sleep(max(0.0, begin + n / args.rate - time.monotonic()))
                    await run_true.defer_async(enqueued=time.time())
                await all_started.wait()
                worker.cancel()
                try:
                    await worker
                except asyncio.CancelledError:
                    pass
            else:
                await worker
            window.stop()

    asyncio.run(main())
    return window.result(latencies if args.phase == "latency" else [])


def _scratch_database(url: str) -> str:
    """A fresh database beside ``url``'s (dropped and made anew); its URL."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = "supervisor_peers_bench"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    return make_conninfo(**{**conninfo_to_dict(url), "dbname": name})


def child_arq(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    logging.getLogger("arq").setLevel(logging.WARNING)
    settings = RedisSettings.from_dsn(args.redis)
    latencies: list[float] = []
    all_started = asyncio.Event()

    async def run_true(ctx: dict[str, Any], enqueued: float) -> None:
        latencies.append((time.time() - enqueued) * 1000)
        if len(latencies) == args.items:
            all_started.set()
        process = await asyncio.create_subprocess_exec(TRUE)
        await process.wait()

    window = Window(SERVERS["arq"])

    async def main() -> None:
        pool = await create_pool(settings)
        await pool.flushdb()
        paced = args.phase == "latency"
        if not paced:
            for _ in range(args.items):
                await pool.enqueue_job("run_true", time.time())
        worker = Worker(
            functions=[func(run_true, name="run_true")],
            redis_settings=settings,
            max_jobs=args.concurrency,
            poll_delay=0.005,
            burst=not paced,
            handle_signals=False,
            keep_result=60,
        )
        window.start()
        task = asyncio.create_task(worker.async_run())
        if paced:
            begin = time.monotonic()
            for n in range(args.items):
                await asyncio.sleep(max(0.0, begin + n / args.rate - time.monotonic()))
                await pool.enqueue_job("run_true", time.time())
            await all_started.wait()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        else:
            await task
        window.stop()
        await worker.close()
        await pool.aclose()

    asyncio.run(main())
    return window.result(latencies if args.phase == "latency" else [])


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "bare": child_bare,
    "supervisor": child_supervisor,
    "huey": child_huey,
    "procrastinate": child_procrastinate,
    "arq": child_arq,
}


# --- the parent: rounds, CPU accounting, the table -------------------------------------------


def _proc_stats() -> list[tuple[int, str, list[str]]]:
    """``(pid, command name, the fields after it)`` of every process, from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        found.append((int(entry.name), comm, stat[stat.rindex(")") + 2 :].split()))
    return found


def _children_cpu(parent: int) -> dict[int, float]:
    """CPU seconds so far of each live child process of ``parent``, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    return {
        pid: (int(fields[11]) + int(fields[12])) / tick
        for pid, _, fields in _proc_stats()
        if int(fields[1]) == parent  # ppid
    }


def _server_cpu(names: tuple[str, ...]) -> float:
    """CPU seconds so far of every process whose command name is one of ``names``."""
    tick = os.sysconf("SC_CLK_TCK")
    return (
        sum(int(fields[11]) + int(fields[12]) for _, comm, fields in _proc_stats() if comm in names)
        / tick
    )


def run_child(
    system: str, phase: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any] | str:
    """One round of one system in a fresh process; its figures, or why it was skipped.

    Its state goes in a fresh directory under ``args.scratch``, removed only when
    the whole run ends: on ext4 a new inode is looked for past every inode freed in
    the last minute or more (``recently_deleted`` in the kernel's allocator, which
    skips them), so removing one round's files just before the next round starts
    would charge that round, whichever system it is, for the previous one's cleanup.
    For the same reason, start a run a couple of minutes after anything removed
    many files on that file system (the previous run's scratch included).
    """
    state = tempfile.mkdtemp(prefix=f"peers-{system}-", dir=args.scratch)
    argv = [
        sys.executable,
        __file__,
        "--child",
        system,
        "--phase",
        phase,
        "--items",
        str(args.items),
        "--concurrency",
        str(concurrency),
        "--rate",
        str(args.rate),
        "--state",
        state,
        "--database",
        args.database,
        "--redis",
        args.redis,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=600)
    if process.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return f"skipped: {last[:120]}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _filesystem(path: str) -> str:
    """The type of the file system ``path`` is on (``ext4``, ``tmpfs``...), from /proc/mounts."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[8], help="one table per value"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="jobs/s in the latency phase")
    parser.add_argument("--only", nargs="*", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument(
        "--dir",
        default=tempfile.gettempdir(),
        help="where the state files go (its file system is printed: ext4, tmpfs...)",
    )
    parser.add_argument(
        "--database",
        default=os.environ.get(
            "SUPERVISOR_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--redis", default=os.environ.get("SUPERVISOR_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("throughput", "latency"), help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        args.concurrency = args.concurrency[0]
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    print(
        f"{args.items} jobs of {TRUE}, {args.rounds} rounds (interleaved), latency phase "
        f"paced at {args.rate:g} jobs/s; {os.cpu_count()} CPUs; state in {args.dir} "
        f"({_filesystem(args.dir)})"
    )
    with tempfile.TemporaryDirectory(prefix="peers-", dir=args.dir) as scratch:
        args.scratch = scratch
        for concurrency in args.concurrency:
            _table(concurrency, args)
    return 0


def _table(concurrency: int, args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {s: [] for s in args.only}
    cpu: dict[str, list[float]] = {s: [] for s in args.only}
    latencies: dict[str, list[float]] = {s: [] for s in args.only}
    skipped: dict[str, str] = {}
    for _ in range(args.rounds):
        for system in args.only:
            if system in skipped:
                continue
            for phase in ("throughput", "latency"):
                result = run_child(system, phase, concurrency, args)
                if isinstance(result, str):
                    skipped[system] = result
                    break
                if phase == "throughput":
                    rates[system].append(args.items / result["seconds"])
                    cpu[system].append(result["cpu"] * 1000 / args.items)
                else:
                    latencies[system] += result["latencies"]

    medians = {s: statistics.median(rates[s]) for s in args.only if s not in skipped}
    print(f"\n### concurrency {concurrency}")
    print(
        "\n| system | jobs/s | vs bare | vs huey | CPU ms/job "
        "| enqueue→start p50 / p99 ms | durability |"
    )
    print("|---|---|---|---|---|---|---|")
    for system in args.only:
        if system in skipped:
            print(f"| {system} | {skipped[system]} | | | | | |")
            continue
        rate = medians[system]
        versus = [f"{rate / medians[o]:.2f}" if o in medians else "-" for o in ("bare", "huey")]
        lat = latencies[system]
        latency = f"{_pct(lat, 0.5):.1f} / {_pct(lat, 0.99):.1f}" if lat else "-"
        spread = f"({min(rates[system]):.0f} to {max(rates[system]):.0f})"
        cpu_spread = f"({min(cpu[system]):.2f} to {max(cpu[system]):.2f})"
        print(
            f"| {system} | {rate:.0f} {spread} | {versus[0]} | {versus[1]} "
            f"| {statistics.median(cpu[system]):.2f} {cpu_spread} | {latency} "
            f"| {DURABILITY[system]} |"
        )


if __name__ == "__main__":
    sys.exit(main())
