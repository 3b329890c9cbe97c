"""Control-plane throughput, layer by layer: bare SQLite, the store, the embedded control plane.

Run from the repository root::

    python benchmarks/controlplane.py [--ops 500] [--rounds 5]

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
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.controlplane import (
    NO_HEARTBEAT,
    ControlPlane,
    EmbeddedControlPlane,
    HttpControlPlane,
    SQLiteStore,
    open_control_plane_server,
)

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
    finally:
        store.close()
    return LayerFigures(claim=claim, heartbeat=heartbeat)


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


# --- running and printing ------------------------------------------------------------------


def _rate(seconds: float) -> str:
    return f"{1 / seconds:>12,.0f}/s {seconds * 1e6:>9.1f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=500, help="operations per round (500)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is shown (5)")
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
        f"transaction (~{update * 1e6:.0f} µs bare). Took {time.perf_counter() - started:.1f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
