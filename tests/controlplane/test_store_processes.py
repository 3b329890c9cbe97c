"""Concurrency on one SQLite file: real processes, and Trio tasks on worker threads.

These use real time and real processes (they test the locking, which a fake
cannot); every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from supervisor.controlplane import EmbeddedControlPlane, SQLiteStore, WorkState

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("store_process.py")
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


async def _run(*args: str) -> list[str]:
    """Run the helper script to completion and return its stdout lines."""
    done = await trio.run_process(
        [sys.executable, str(SCRIPT), *args], capture_stdout=True, env=_env(), check=True
    )
    return done.stdout.decode().split()


async def _submitters_then_claimers(
    db: Path, *, submitters: int, per_submitter: int, claimers: int
) -> tuple[list[list[str]], list[list[str]]]:
    done_file = db.with_suffix(".submitted")
    submitted: list[list[str]] = [[] for _ in range(submitters)]
    claimed: list[list[str]] = [[] for _ in range(claimers)]

    async def submit(n: int) -> None:
        submitted[n] = await _run("submit", str(db), f"p{n}", str(per_submitter))

    async def claim(n: int) -> None:
        claimed[n] = await _run("claim", str(db), f"worker-{n}", str(done_file))

    SQLiteStore(db).close()  # create the schema once, so the race is about items only
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for n in range(claimers):
                nursery.start_soon(claim, n)
            async with trio.open_nursery() as submitting:
                for n in range(submitters):
                    submitting.start_soon(submit, n)
            done_file.touch()
    return submitted, claimed


async def test_two_processes_submit_into_one_file_while_a_third_claims_each_item_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "controlplane.sqlite3"
    submitted, claimed = await _submitters_then_claimers(
        db, submitters=2, per_submitter=150, claimers=1
    )
    every_submitted = submitted[0] + submitted[1]
    assert len(every_submitted) == 300
    assert len(set(every_submitted)) == 300
    (claims,) = claimed
    assert Counter(claims) == Counter(every_submitted)  # each exactly once, none lost
    store = SQLiteStore(db)
    try:
        items = store.list_work("default", now=0.0, limit=1000)
    finally:
        store.close()
    assert {i.id for i in items} == set(every_submitted)
    assert {i.state for i in items} == {WorkState.STARTING}


async def test_two_claiming_processes_never_receive_the_same_item(tmp_path: Path) -> None:
    db = tmp_path / "controlplane.sqlite3"
    submitted, claimed = await _submitters_then_claimers(
        db, submitters=1, per_submitter=300, claimers=2
    )
    claims = claimed[0] + claimed[1]
    assert not set(claimed[0]) & set(claimed[1])
    assert Counter(claims) == Counter(submitted[0])


async def test_four_trio_tasks_on_threads_claim_500_items_each_exactly_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "controlplane.sqlite3"
    async with EmbeddedControlPlane(db, threaded=True) as cp:
        ids = [(await cp.submit(f"item {n}")).id for n in range(500)]
        claims: dict[str, list[str]] = {f"worker-{n}": [] for n in range(4)}

        async def claimer(worker: str) -> None:
            while (item := await cp.poll(worker_id=worker)) is not None:
                await cp.ack(item.id, worker_id=worker)
                claims[worker].append(item.id)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for worker in claims:
                    nursery.start_soon(claimer, worker)
        every_claim = [i for got in claims.values() for i in got]
        assert Counter(every_claim) == Counter(ids)
        assert sum(1 for got in claims.values() if got) > 1  # the work really was shared
        assert (await cp.stats()).depth == 0
