"""Control-plane throughput, layer by layer: bare SQLite, the store, the embedded control plane.

Run from the repository root::

    python benchmarks/controlplane.py [--ops 500] [--rounds 5] [--routing 1000] [--database URL]

Prints the cost of a bare SQLite round trip (``SELECT 1``, and the
``BEGIN IMMEDIATE`` / one-row ``UPDATE`` / ``COMMIT`` every store call pays),
then claims/s and heartbeats/s through each layer above it, so the overhead a
layer adds is the difference between two rows. Every figure is the median of
``--rounds`` rounds, each on a fresh database in a temporary directory.

A *claim* is what a worker does to take an item: ``poll`` (which hands it
out) then ``ack``. A *heartbeat* renews one active lease, chaining the fencing
token. Figures are printed, never asserted: they depend on the machine.

Adding a layer (the HTTP column): write ``async def bench_<name>(directory,
ops) -> LayerFigures`` (most of it is `bench_control_plane` over your
`ControlPlane`), and append ``("<label>", bench_<name>)`` to `LAYERS`.

Routing labels (``--routing N``): claims with N items queued, on both engines:
no labels at all, a queue mixing label sets, and a worker without labels
claiming from behind N/2 older labelled items it must pass over.

PostgreSQL (``--database``, default ``SUPERVISOR_TEST_DATABASE_URL`` or
``postgresql://postgres@127.0.0.1:5432/test``; each round in a fresh schema,
dropped after): the same rows for `PostgresStore` directly, the embedded plane
over it, and the reference server over it with one and with two replicas (four
concurrent callers, split over the replicas; their aggregate rate). Then the
claim/complete cycle (claim, then record the outcome) beside a peer doing the
same on the same database: procrastinate (``pip install -e '.[bench]'``),
``fetch_job`` then ``finish_job``. Skipped, with a line saying why, when no
server answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.controlplane import (
    NO_HEARTBEAT,
    ControlPlane,
    EmbeddedControlPlane,
    HttpControlPlane,
    Outcome,
    OutcomeStatus,
    SQLiteStore,
    open_control_plane_server,
)
from supervisor.controlplane._store import Store

ENV = "default"


@attrs.frozen
class LayerFigures:
    """Seconds per operation through one layer (one round)."""

    claim: float
    heartbeat: float


# --- the bare SQLite round trip -------------------------------------------------------


def bench_sqlite(directory: Path, ops: int) -> tuple[float, float]:
    """Seconds per ``SELECT 1`` and per one-row write transaction, on a WAL file."""
    conn = sqlite3.connect(directory / "bare.sqlite3", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        conn.execute("INSERT INTO t VALUES (1, 0)")
        start = time.perf_counter()
        for _ in range(ops):
            conn.execute("SELECT 1").fetchone()
        select = (time.perf_counter() - start) / ops
        start = time.perf_counter()
        for _ in range(ops):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET v = v + 1 WHERE id = 1")
            conn.execute("COMMIT")
        update = (time.perf_counter() - start) / ops
    finally:
        conn.close()
    return select, update


# --- the store, called directly ------------------------------------------------------------


def bench_store(directory: Path, ops: int) -> LayerFigures:
    """The synchronous store with no async layer: the floor for every layer above."""
    store = SQLiteStore(directory / "store.sqlite3")
    try:
        return bench_store_calls(store, ops)
    finally:
        store.close()


def bench_store_calls(store: Store, ops: int) -> LayerFigures:
    """Claims then heartbeats on an open store (either engine), one caller."""
    now = time.time()
    ids = [store.submit(ENV, f"item {n}", now=now).id for n in range(ops)]
    start = time.perf_counter()
    for _ in ids:
        item = store.poll(ENV, worker_id="bench", now=time.time())
        assert item is not None
        store.ack(ENV, item.id, worker_id="bench", now=time.time())
    claim = (time.perf_counter() - start) / ops
    token = NO_HEARTBEAT
    start = time.perf_counter()
    for _ in range(ops):
        beat = store.heartbeat(ENV, ids[0], expected_last_heartbeat=token, now=time.time())
        token = beat.last_heartbeat
    heartbeat = (time.perf_counter() - start) / ops
    return LayerFigures(claim=claim, heartbeat=heartbeat)


# --- routing labels: claims over a queue that mixes them ---------------------------------

#: The label sets the routing rows cycle through when queueing (``()`` is unlabelled).
MIXED_LABELS: tuple[tuple[str, ...], ...] = ((), ("gpu",), ("gpu", "repo:foo"), ("cpu",))


def routing_scenarios(store: Store, queued: int) -> dict[str, float]:
    """Seconds per claim (poll + ack) with ``queued`` items waiting, per routing case.

    * ``unlabelled``: no labels anywhere (the baseline);
    * ``mixed``: items cycle through `MIXED_LABELS`; a worker with ``gpu`` and
      ``repo:foo`` claims every item it may (three in four);
    * ``skip``: half the queue, the older half, requires ``gpu``; a worker
      without labels claims the other half, passing over the labelled rows
      each time.
    """
    figures: dict[str, float] = {}
    cases: dict[str, tuple[list[tuple[str, ...]], tuple[str, ...]]] = {
        "unlabelled": ([()] * queued, ()),
        "mixed": (
            [MIXED_LABELS[n % len(MIXED_LABELS)] for n in range(queued)],
            ("gpu", "repo:foo"),
        ),
        "skip": ([("gpu",)] * (queued // 2) + [()] * (queued - queued // 2), ()),
    }
    for case, (labels, worker) in cases.items():
        environment = f"routing-{case}"
        now = time.time()
        for n, required in enumerate(labels):
            store.submit(environment, f"item {n}", now=now, labels=required)
        eligible = sum(1 for required in labels if set(required) <= set(worker))
        start = time.perf_counter()
        for _ in range(eligible):
            item = store.poll(environment, worker_id="bench", now=time.time(), labels=worker)
            assert item is not None and set(item.labels) <= set(worker)
            store.ack(environment, item.id, worker_id="bench", now=time.time())
        assert store.poll(environment, worker_id="bench", now=time.time(), labels=worker) is None
        figures[case] = (time.perf_counter() - start) / eligible
    return figures


def routing_section(queued: int, rounds: int, database: str) -> None:
    print(f"\nrouting labels: claims (poll+ack) with {queued} items queued, median of {rounds}")
    header = f"{'store':<16}" + "".join(f"{case:>26}" for case in ("unlabelled", "mixed", "skip"))
    print(header)
    print("-" * len(header))
    engines: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Store]]]] = []

    @contextlib.contextmanager
    def sqlite_store() -> Iterator[Store]:
        with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
            store = SQLiteStore(Path(tmp) / "routing.sqlite3")
            try:
                yield store
            finally:
                store.close()

    @contextlib.contextmanager
    def postgres_store() -> Iterator[Store]:
        with fresh_schema(database) as (url, _schema):
            store = _postgres_store(url)
            try:
                yield store
            finally:
                store.close()

    engines.append(("sqlite", sqlite_store))
    if database != "none":
        try:
            import psycopg

            psycopg.connect(database, connect_timeout=3).close()
            engines.append(("postgresql", postgres_store))
        except Exception as exc:
            print(f"(postgresql skipped: {exc})")
    for name, opened in engines:
        runs: list[dict[str, float]] = []
        for _ in range(rounds):
            with opened() as store:
                runs.append(routing_scenarios(store, queued))
        row = "".join(f"{_rate(statistics.median(r[case] for r in runs)):>26}" for case in runs[0])
        print(f"{name:<16}{row}")


# --- any ControlPlane ----------------------------------------------------------------------


async def bench_control_plane(cp: ControlPlane, ops: int) -> LayerFigures:
    """Claims and heartbeats through ``cp``, one caller at a time (latency-bound)."""
    ids = [(await cp.submit(f"item {n}")).id for n in range(ops)]
    start = time.perf_counter()
    for _ in ids:
        item = await cp.poll(worker_id="bench")
        assert item is not None
        await cp.ack(item.id, worker_id="bench")
    claim = (time.perf_counter() - start) / ops
    token = NO_HEARTBEAT
    start = time.perf_counter()
    for _ in range(ops):
        token = (await cp.heartbeat(ids[0], expected_last_heartbeat=token)).last_heartbeat
    heartbeat = (time.perf_counter() - start) / ops
    return LayerFigures(claim=claim, heartbeat=heartbeat)


async def bench_embedded(directory: Path, ops: int) -> LayerFigures:
    """The embedded control plane as workers use it: store calls on worker threads."""
    async with EmbeddedControlPlane(directory / "embedded.sqlite3", threaded=True) as cp:
        return await bench_control_plane(cp, ops)


async def bench_embedded_inline(directory: Path, ops: int) -> LayerFigures:
    """The embedded control plane with store calls in the Trio thread (the MockClock mode)."""
    async with EmbeddedControlPlane(directory / "inline.sqlite3", threaded=False) as cp:
        return await bench_control_plane(cp, ops)


async def bench_http(directory: Path, ops: int) -> LayerFigures:
    """HttpControlPlane <-> the reference server on 127.0.0.1, in one process.

    The server serves a store with the embedded plane (threaded), so this row
    minus the "embedded (threaded)" row is what HTTP on loopback costs: httpx,
    a TCP round trip, Hypercorn, Starlette, auth and the JSON codec.
    """
    key = "benchmark-key-0123456789"
    store = SQLiteStore(directory / "http.sqlite3")
    try:
        async with (
            open_control_plane_server(store, key_provider=key) as url,
            HttpControlPlane.open(url, key=key) as cp,
        ):
            return await bench_control_plane(cp, ops)
    finally:
        store.close()


async def _store_layer(directory: Path, ops: int) -> LayerFigures:
    await trio.lowlevel.checkpoint()
    return bench_store(directory, ops)


#: The rows of the table, in order. Append ("label", bench_fn) to add a layer.
LAYERS: list[tuple[str, Callable[[Path, int], Awaitable[LayerFigures]]]] = [
    ("store (sync, no async layer)", _store_layer),
    ("embedded (threaded, default)", bench_embedded),
    ("embedded (inline, threaded=False)", bench_embedded_inline),
    ("HTTP on loopback (client <-> server)", bench_http),
]


# --- PostgreSQL --------------------------------------------------------------------------

DEFAULT_DATABASE = os.environ.get(
    "SUPERVISOR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
KEY = "benchmark-key-0123456789"


@contextlib.contextmanager
def fresh_schema(database: str) -> Iterator[tuple[str, str]]:
    """A new schema for one round: ``(store URL with ?schema=, schema name)``; dropped after."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{database}{'&' if '?' in database else '?'}schema={schema}", schema
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _postgres_store(url: str):  # type: ignore[no-untyped-def]
    from supervisor.controlplane._store._postgres import PostgresStore

    return PostgresStore(url)


def bench_postgres_store(url: str, ops: int) -> LayerFigures:
    store = _postgres_store(url)
    try:
        return bench_store_calls(store, ops)
    finally:
        store.close()


async def _pg_store_layer(url: str, ops: int) -> LayerFigures:
    return await trio.to_thread.run_sync(bench_postgres_store, url, ops)


async def bench_postgres_embedded(url: str, ops: int) -> LayerFigures:
    store = await trio.to_thread.run_sync(_postgres_store, url)
    try:
        async with EmbeddedControlPlane(store) as cp:
            return await bench_control_plane(cp, ops)
    finally:
        await trio.to_thread.run_sync(store.close)


@contextlib.asynccontextmanager
async def _replicas(url: str, count: int) -> AsyncIterator[list[str]]:
    """``count`` reference servers, each over its own PostgresStore on one database."""
    stores = [await trio.to_thread.run_sync(_postgres_store, url) for _ in range(count)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = [
                await stack.enter_async_context(open_control_plane_server(s, key_provider=KEY))
                for s in stores
            ]
            yield urls
    finally:
        for s in stores:
            await trio.to_thread.run_sync(s.close)


async def bench_concurrent(planes: list[ControlPlane], ops: int) -> LayerFigures:
    """``ops`` claims and heartbeats spread over concurrent callers, one per plane; aggregate."""
    per = ops // len(planes)
    ids = [(await planes[0].submit(f"item {n}")).id for n in range(per * len(planes))]
    del ids

    async def claims(cp: ControlPlane) -> None:
        for _ in range(per):
            item = await cp.poll(worker_id="bench")
            assert item is not None
            await cp.ack(item.id, worker_id="bench")

    async def beats(cp: ControlPlane, work_id: str) -> None:
        token = NO_HEARTBEAT
        for _ in range(per):
            token = (await cp.heartbeat(work_id, expected_last_heartbeat=token)).last_heartbeat

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for cp in planes:
            nursery.start_soon(claims, cp)
    claim = (time.perf_counter() - start) / (per * len(planes))
    held = [i.id for i in await planes[0].list_work(state=None, limit=len(planes))]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for cp, work_id in zip(planes, held, strict=True):
            nursery.start_soon(beats, cp, work_id)
    heartbeat = (time.perf_counter() - start) / (per * len(planes))
    return LayerFigures(claim=claim, heartbeat=heartbeat)


def _served(replicas: int, callers: int = 4) -> Callable[[str, int], Awaitable[LayerFigures]]:
    async def bench(url: str, ops: int) -> LayerFigures:
        async with _replicas(url, replicas) as urls, contextlib.AsyncExitStack() as stack:
            planes: list[ControlPlane] = [
                await stack.enter_async_context(HttpControlPlane.open(urls[n % replicas], key=KEY))
                for n in range(callers)
            ]
            return await bench_concurrent(planes, ops)

    return bench


async def bench_postgres_http(url: str, ops: int) -> LayerFigures:
    async with _replicas(url, 1) as urls, HttpControlPlane.open(urls[0], key=KEY) as cp:
        return await bench_control_plane(cp, ops)


POSTGRES_LAYERS: list[tuple[str, Callable[[str, int], Awaitable[LayerFigures]]]] = [
    ("pg store (sync, no async layer)", _pg_store_layer),
    ("pg embedded (direct, threaded)", bench_postgres_embedded),
    ("pg HTTP, 1 replica, 1 caller", bench_postgres_http),
    ("pg HTTP, 1 replica, 4 callers", _served(1)),
    ("pg HTTP, 2 replicas, 4 callers", _served(2)),
]


def bench_cycle_store(url: str, ops: int) -> float:
    """Seconds per claim/complete cycle on PostgresStore: poll, ack, stop with an outcome."""
    store = _postgres_store(url)
    done = Outcome(OutcomeStatus.COMPLETED, exit_code=0)
    try:
        now = time.time()
        for n in range(ops):
            store.submit(ENV, f"item {n}", now=now)
        start = time.perf_counter()
        for _ in range(ops):
            item = store.poll(ENV, worker_id="bench", now=time.time())
            assert item is not None
            store.ack(ENV, item.id, worker_id="bench", now=time.time())
            store.stop(ENV, item.id, now=time.time(), outcome=done)
        return (time.perf_counter() - start) / ops
    finally:
        store.close()


def bench_cycle_procrastinate(database: str, schema: str, ops: int) -> float | str:
    """Seconds per ``fetch_job`` + ``finish_job`` on procrastinate, the same database."""
    try:
        import procrastinate
        from procrastinate import jobs
    except ImportError:
        return "procrastinate not installed (pip install -e '.[bench]')"

    # It warns that the App is defined in __main__ (a concern for its workers, not here).
    logging.getLogger("procrastinate").setLevel(logging.ERROR)

    async def run() -> float:
        connector = procrastinate.PsycopgConnector(
            conninfo=database, kwargs={"options": f"-c search_path={schema}"}
        )
        app = procrastinate.App(connector=connector)

        @app.task(name="bench")
        def bench_task(n: int) -> None:
            del n

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for n in range(ops):
                await bench_task.defer_async(n=n)
            manager = app.job_manager
            worker_id = await manager.register_worker()
            start = time.perf_counter()
            for _ in range(ops):
                job = await manager.fetch_job(queues=None, worker_id=worker_id)
                assert job is not None
                await manager.finish_job(job, status=jobs.Status.SUCCEEDED, delete_job=False)
            return (time.perf_counter() - start) / ops

    return asyncio.run(run())


def postgres_section(database: str, ops: int, rounds: int) -> None:
    try:
        import psycopg

        with psycopg.connect(database, connect_timeout=3) as conn:
            version = conn.execute("SHOW server_version").fetchone()
    except Exception as exc:
        print(f"\nPostgreSQL rows skipped: no server at {database} ({exc})")
        return
    print(f"\nPostgreSQL {version[0] if version else '?'} at {database}, one schema per round")
    header = f"{'layer':<36}{'claims (poll+ack)':>29}{'heartbeats':>29}"
    print(header)
    print("-" * len(header))
    for label, bench in POSTGRES_LAYERS:
        figures: list[LayerFigures] = []
        for _ in range(rounds):
            with fresh_schema(database) as (url, _schema):
                figures.append(trio.run(bench, url, ops))
        claim = statistics.median(f.claim for f in figures)
        beat = statistics.median(f.heartbeat for f in figures)
        print(f"{label:<36}{_rate(claim):>29}{_rate(beat):>29}")
    print(f"\n{'claim/complete cycle, one caller':<36}{'cycles':>29}")
    print("-" * 65)
    ours: list[float] = []
    peer: list[float] = []
    note = ""
    for _ in range(rounds):
        with fresh_schema(database) as (url, _schema):
            ours.append(bench_cycle_store(url, ops))
        with fresh_schema(database) as (_url, schema):
            result = bench_cycle_procrastinate(database, schema, ops)
            if isinstance(result, str):
                note = result
            else:
                peer.append(result)
    print(f"{'pg store: poll+ack+stop':<36}{_rate(statistics.median(ours)):>29}")
    if peer:
        print(f"{'procrastinate: fetch_job+finish_job':<36}{_rate(statistics.median(peer)):>29}")
    else:
        print(f"{'procrastinate':<36}{'skipped: ' + note:>29}")


# --- running and printing ------------------------------------------------------------------


def _rate(seconds: float) -> str:
    return f"{1 / seconds:>12,.0f}/s {seconds * 1e6:>9.1f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=500, help="operations per round (500)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is shown (5)")
    parser.add_argument(
        "--routing",
        type=int,
        default=1000,
        metavar="N",
        help="items queued for the routing-label rows (1000; 0 skips them)",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="PostgreSQL for the pg rows (default: %(default)s); 'none' skips them",
    )
    args = parser.parse_args(argv)
    ops, rounds = args.ops, args.rounds
    started = time.perf_counter()

    bare: list[tuple[float, float]] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
            bare.append(bench_sqlite(Path(tmp), ops))
    select = statistics.median(b[0] for b in bare)
    update = statistics.median(b[1] for b in bare)

    print(f"control-plane throughput: {ops} ops per round, median of {rounds} rounds")
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, WAL, NORMAL\n")
    print("bare SQLite round trip")
    print(f"  {'SELECT 1':<44}{_rate(select)}")
    print(f"  {'BEGIN IMMEDIATE; UPDATE 1 row; COMMIT':<44}{_rate(update)}\n")
    header = f"{'layer':<36}{'claims (poll+ack)':>29}{'heartbeats':>29}"
    print(header)
    print("-" * len(header))
    for label, bench in LAYERS:
        figures: list[LayerFigures] = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
                figures.append(trio.run(bench, Path(tmp), ops))
        claim = statistics.median(f.claim for f in figures)
        beat = statistics.median(f.heartbeat for f in figures)
        print(f"{label:<36}{_rate(claim):>29}{_rate(beat):>29}")
    print(
        f"\none claim is two store calls (poll, ack); each store call is one write "
        f"transaction (~{update * 1e6:.0f} µs bare)."
    )
    if args.routing > 0:
        routing_section(args.routing, rounds, args.database)
    if args.database != "none":
        postgres_section(args.database, ops, rounds)
    print(f"\nTook {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
