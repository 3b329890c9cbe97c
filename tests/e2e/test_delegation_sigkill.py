"""The delegation journal survives a SIGKILL of the worker process in mid-stream.

A real ``python -m supervisor run`` process claims two long-running source
sessions; this test then streams delegation results for them into the same
SQLite file as fast as it can. Once the worker has collected (acknowledged) a
good number, it is killed with SIGKILL. Every result it acknowledged before
the kill must be in its journal, none twice; a second worker process on the
same state directory then collects the rest, and the journal ends up holding
every result exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from supervisor._worker._journal import journal_path
from supervisor._worker._process import process_group_members
from supervisor.controlplane import Outcome, OutcomeStatus, SQLiteStore, WorkState
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.controlplane._store import DEFAULT_ENVIRONMENT_ID as ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HANG = Path(__file__).resolve().parents[1] / "agents" / "hang.py"
WORKER = "worker-sigkill"
#: Results the first worker must have acknowledged before it is killed.
BEFORE_KILL = 150


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        {
            "SUPERVISOR_DELEGATION_POLL_INTERVAL": "0.01",
            "SUPERVISOR_DELEGATION_COOLDOWN": "0",
            "SUPERVISOR_API_ENABLED": "false",
        }
    )
    return env


async def start_worker(state: Path, name: str) -> trio.Process:
    argv = [
        sys.executable,
        "-m",
        "supervisor",
        "run",
        "--state-dir",
        str(state),
        "--worker-id",
        WORKER,
        "--max-concurrency",
        "2",
        "--agent",
        f"{sys.executable} {HANG}",
    ]
    with (state.parent / f"{name}.out").open("wb") as out:
        return await trio.lowlevel.open_process(
            argv, cwd=state.parent, env=worker_env(), stdout=out, stderr=subprocess.STDOUT
        )


def collected(store: SQLiteStore) -> set[str]:
    return {d.id for d in store.list_delegations(ENV, WORKER) if d.collected_at is not None}


def journal_results(state: Path) -> Counter[str]:
    path = journal_path(state.absolute(), WORKER)
    counts: Counter[str] = Counter()
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by the kill
        if record.get("kind") == "result":
            counts[record["delegation_id"]] += 1
    return counts


async def kill_agents(state: Path) -> None:
    """The killed worker could not stop its agents: stop them (they print their group)."""
    for log in (state / "logs").glob("*.log"):
        match = re.search(r"pgid=(\d+)", log.read_text(errors="replace"))
        if match is None:
            continue
        pgid = int(match.group(1))
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        with trio.fail_after(10):
            while [p for p, s in process_group_members(pgid) or [] if s != "Z"]:
                await trio.sleep(0.02)


async def stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                return
            process.send_signal(sig)
            with trio.move_on_after(10):
                await process.wait()


async def test_every_acknowledged_result_is_in_the_journal_after_a_sigkill_and_none_twice(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = SQLiteStore(state / STORE_FILENAME)
    sources = [store.submit(ENV, f"source {n}", now=time.time()).data.id for n in range(2)]
    first = await start_worker(state, "first")
    made: list[str] = []
    try:
        with trio.fail_after(30):
            while not all(
                i.state is WorkState.ACTIVE and i.worker_id == WORKER
                for i in store.list_work(ENV, now=time.time())
            ):
                await trio.sleep(0.05)

        async def stream(stop_streaming: trio.Event) -> None:
            n = 0
            while not stop_streaming.is_set():
                delegation = store.delegate(ENV, sources[n % 2], f"task {n}", now=time.time())
                # An operator stop with an outcome settles the result at once; the
                # delegate item is never claimed, so no agent runs for it.
                store.stop(
                    ENV,
                    delegation.work_id,
                    now=time.time(),
                    outcome=Outcome(OutcomeStatus.COMPLETED, result=f"result {n}"),
                )
                made.append(delegation.id)
                n += 1
                await trio.sleep(0.001)

        done_streaming = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, done_streaming)
            with trio.fail_after(60):
                while len(collected(store)) < BEFORE_KILL:
                    await trio.sleep(0.005)
            first.send_signal(signal.SIGKILL)  # mid-stream: results keep coming
            assert await first.wait() == -signal.SIGKILL
            acknowledged = collected(store)  # nobody collects after the kill
            await trio.sleep(0.1)
            done_streaming.set()
        journal = journal_results(state)
        assert len(acknowledged) >= BEFORE_KILL
        assert acknowledged <= set(journal)  # every acknowledged result survived the kill
        assert max(journal.values()) == 1  # none twice
        assert len(made) > len(acknowledged)  # the kill really was mid-stream
    finally:
        await stop(first)
        await kill_agents(state)

    second = await start_worker(state, "second")
    try:
        with trio.fail_after(60):
            while collected(store) != set(made):
                await trio.sleep(0.05)
    finally:
        await stop(second)
        await kill_agents(state)
        store.close()
    journal = journal_results(state)
    assert set(journal) == set(made)  # every result, after the restart too
    assert max(journal.values()) == 1  # and still none twice
