"""The watcher's memory stays bounded while 100,000 delegation results stream through it.

A streaming fake stands in for the control plane (a layer-above unit test:
the SQLite store is exercised by the other delegation tests); the journal is a
real file. Fake time (autojump_clock) keeps it fast.
"""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import trio
import trio.testing

from supervisor._worker._journal import DelegationJournal
from supervisor.controlplane import Delegation, DelegationStatus
from supervisor.lowlevel import DelegationWatcher

WORKER = "worker-1"
SOURCE = "sess-source"
TOTAL = 100_000
BATCH = 1_000
LRU = 1_000
#: Each answer repeats this many ids of the previous one (lost collections).
REPEATS = 50
_COUNT = re.compile(r"^(\d+) delegated task")


class Stream:
    """Hands out ``TOTAL`` finished delegations, ``BATCH`` per poll, with repeats."""

    def __init__(self) -> None:
        self.next = 0
        self.delivered = 0
        self.leaked_output = False

    def _record(self, n: int) -> Delegation:
        return Delegation(
            id=f"dlg-{n}",
            source_id=SOURCE,
            work_id=f"work-{n}",
            task="t",
            status=DelegationStatus.COMPLETED,
            response_preview=f"PREVIEW-{n}",
            worker_id=WORKER,
        )

    async def list_delegations(self, worker_id: str, **options: object) -> list[Delegation]:
        await trio.lowlevel.checkpoint()
        start = self.next
        if start >= TOTAL:
            return []
        self.next = min(TOTAL, start + BATCH)
        repeated = range(max(0, start - REPEATS), start)
        return [self._record(n) for n in (*repeated, *range(start, self.next))]

    async def collect_delegation(self, delegation_id: str) -> None:
        await trio.lowlevel.checkpoint()

    async def notify(self, session_id: str, body: str) -> None:
        await trio.lowlevel.checkpoint()
        self.leaked_output |= "PREVIEW" in body

    async def post_message(self, session_id: str, body: str) -> None:
        await trio.lowlevel.checkpoint()
        self.leaked_output |= "PREVIEW" in body
        match = _COUNT.match(body)
        assert match is not None
        self.delivered += int(match.group(1))


class _Finished:
    inbox = None


def sessions(session_id: str) -> _Finished | None:
    return _Finished() if session_id == SOURCE else None


async def test_a_hundred_thousand_results_stream_through_in_bounded_memory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stream = Stream()
    watcher = DelegationWatcher(
        stream,  # type: ignore[arg-type]
        worker_id=WORKER,
        journal_path=tmp_path / "journal.jsonl",
        sessions=sessions,
        poll_interval=1.0,
        cooldown=0.0,
        lru_size=LRU,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        journal = watcher.journal
        assert journal is not None

        async def until(count: int) -> None:
            while stream.next < count:
                await trio.sleep(1)
                assert journal.seen_count <= LRU
                assert journal.memory_size <= LRU + BATCH + 1  # ids, a batch in flight, a session

        await until(TOTAL // 2)
        # A leak of even one small object per result (>= 50 bytes) would show as
        # >= 500 KB over the next 10,000 results; tracing only this window keeps it fast.
        tracemalloc.start()
        try:
            await until(TOTAL // 2 + 10 * BATCH)
            await trio.sleep(1)
            growth, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await until(TOTAL)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    stats = watcher.stats()
    assert stream.delivered == TOTAL  # every result once, none twice
    assert stats.accepted == TOTAL
    assert stats.duplicates == REPEATS * (TOTAL // BATCH - 1)
    assert not stream.leaked_output
    assert growth < 256 << 10, growth


def test_replaying_a_long_journal_keeps_only_the_lru_in_memory(tmp_path: Path) -> None:
    """A restart after 100,000 results: the replay holds the last ``lru_size`` ids, no more."""
    path = tmp_path / "journal.jsonl"
    lines = []
    for n in range(TOTAL):
        lines.append(
            f'{{"kind": "result", "delegation_id": "dlg-{n}", "source_id": "{SOURCE}", '
            f'"work_id": "work-{n}", "status": "completed", "response_preview": "x", "at": 1}}\n'
            f'{{"kind": "delivered", "delegation_id": "dlg-{n}", "via": "message", "at": 1}}\n'
        )
    path.write_text("".join(lines))
    del lines
    tracemalloc.start()
    try:
        journal = DelegationJournal.open(path, lru_size=LRU)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert journal.seen_count == LRU
        assert journal.memory_size == LRU
        assert journal.seen(f"dlg-{TOTAL - 1}") and journal.seen(f"dlg-{TOTAL - LRU}")
        assert not journal.seen(f"dlg-{TOTAL - LRU - 1}")
    finally:
        journal.close()
    assert peak < 4 << 20, peak  # streamed line by line, never the whole file
