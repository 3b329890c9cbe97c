"""Usage: python benchmarks/delegations.py [--results 20000] [--batch 500]

How fast delegation results get from the control plane into a source session,
and what each result costs:

* **watcher**: ``--results`` finished delegations stream through a
  `DelegationWatcher` from an in-memory control plane, ``--batch`` per poll,
  into a real journal file (flush + fsync per poll) and on as follow-up
  messages. This is the watcher's own cost: JSON lines, the LRU, one fsync per
  batch, a notification per result.
* **store**: the same path on the embedded SQLite store: a delegate item is
  stopped with its outcome (which records the result), the watcher lists,
  journals, collects and delivers it. This adds the store's transactions: one
  per stop, one per collection.
* **replay**: opening (replaying) the journal the first run wrote, as a
  restarted watcher does.

Figures are printed, never asserted: they depend on the disk and the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor._worker._journal import DelegationJournal
from supervisor.controlplane import (
    NO_HEARTBEAT,
    Delegation,
    DelegationStatus,
    EmbeddedControlPlane,
    Outcome,
)
from supervisor.lowlevel import DelegationWatcher

WORKER = "bench-worker"
SOURCE = "bench-source"


class _Finished:
    inbox = None


class Stream:
    """An in-memory control plane that hands out ``total`` results, ``batch`` per poll."""

    def __init__(self, total: int, batch: int) -> None:
        self.total = total
        self.batch = batch
        self.next = 0
        self.delivered = 0
        self.all_delivered = trio.Event()

    async def list_delegations(self, worker_id: str, **options: object) -> list[Delegation]:
        await trio.lowlevel.checkpoint()
        start, self.next = self.next, min(self.total, self.next + self.batch)
        return [
            Delegation(
                id=f"dlg-{n}",
                source_id=SOURCE,
                work_id=f"work-{n}",
                task="t",
                status=DelegationStatus.COMPLETED,
                response_preview=f"output of delegate {n}",
                worker_id=WORKER,
            )
            for n in range(start, self.next)
        ]

    async def collect_delegation(self, delegation_id: str) -> None:
        await trio.lowlevel.checkpoint()

    async def notify(self, session_id: str, body: str) -> None:
        await trio.lowlevel.checkpoint()

    async def post_message(self, session_id: str, body: str) -> None:
        await trio.lowlevel.checkpoint()
        self.delivered += int(body.split(" ", 1)[0])
        if self.delivered >= self.total:
            self.all_delivered.set()


def lookup(session_id: str) -> _Finished | None:
    return _Finished()


async def bench_watcher(directory: Path, total: int, batch: int) -> float:
    stream = Stream(total, batch)
    watcher = DelegationWatcher(
        stream,  # type: ignore[arg-type]
        worker_id=WORKER,
        journal_path=directory / "watcher.jsonl",
        sessions=lookup,
        poll_interval=0.001,
        cooldown=0.0,
    )
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        await stream.all_delivered.wait()
        nursery.cancel_scope.cancel()
    return time.perf_counter() - started


class _Counting:
    """The embedded control plane, counting the results its follow-up messages announce."""

    def __init__(self, plane: EmbeddedControlPlane, total: int) -> None:
        self.plane = plane
        self.total = total
        self.delivered = 0
        self.all_delivered = trio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.plane, name)

    async def post_message(self, session_id: str, body: str) -> object:
        message = await self.plane.post_message(session_id, body)
        self.delivered += int(body.split(" ", 1)[0])
        if self.delivered >= self.total:
            self.all_delivered.set()
        return message


async def bench_store(directory: Path, total: int) -> tuple[float, float]:
    """Seconds to settle ``total`` results in the store, and for the watcher to deliver them."""
    async with EmbeddedControlPlane(directory / "cp.sqlite3", threaded=False) as plane:
        source = await plane.submit("source")
        await plane.poll(worker_id=WORKER)
        await plane.ack(source.id, worker_id=WORKER)
        await plane.heartbeat(
            source.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=3600
        )
        delegations = [await plane.delegate(source.data.id, f"task {n}") for n in range(total)]
        started = time.perf_counter()
        for n, delegation in enumerate(delegations):
            await plane.stop(delegation.work_id, outcome=Outcome("completed", result=f"output {n}"))
        settled = time.perf_counter() - started

        def known(session_id: str) -> _Finished | None:
            return _Finished() if session_id == source.data.id else None

        counting = _Counting(plane, total)
        watcher = DelegationWatcher(
            counting,  # type: ignore[arg-type]
            worker_id=WORKER,
            journal_path=directory / "store.jsonl",
            sessions=known,
            poll_interval=0.001,
            cooldown=0.0,
        )
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await counting.all_delivered.wait()
            nursery.cancel_scope.cancel()
        return settled, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--store-results", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        seconds = trio.run(bench_watcher, directory, args.results, args.batch)
        print(
            f"watcher: {args.results} results in {seconds:.2f}s = "
            f"{args.results / seconds:,.0f} results/s ({seconds / args.results * 1e6:.0f} us each, "
            f"batch {args.batch}, one fsync per batch)"
        )
        settled, delivered = trio.run(bench_store, directory, args.store_results)
        print(
            f"store:   {args.store_results} results settled by stop in {settled:.2f}s "
            f"({args.store_results / settled:,.0f}/s); listed, journalled, collected and "
            f"delivered in {delivered:.2f}s ({args.store_results / delivered:,.0f}/s)"
        )
        path = directory / "watcher.jsonl"
        started = time.perf_counter()
        DelegationJournal.open(path, lru_size=10_000).close()
        replay = time.perf_counter() - started
        size = path.stat().st_size
        print(
            f"replay:  {size / 1e6:.1f} MB journal ({args.results} results) opened in "
            f"{replay * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
