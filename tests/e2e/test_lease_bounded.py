"""No agent outlives its lease (DESIGN §3.8), shown with real processes.

The reference HTTP server runs in its own process on a SQLite file; the workers
are real ``python -m supervisor run`` processes; the agents
(``tests/agents/lease_bound.py``) are real subprocesses that log every process
they start, with its pid and wall time. The workers are then killed with SIGKILL
or frozen with SIGSTOP, and ``/proc`` says which processes are still alive.

Set ``SUPERVISOR_E2E_REPS=N`` to repeat the SIGKILL round N times (one round
runs its 20 repetitions concurrently, as 20 items on one worker).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.controlplane import WorkState
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.controlplane._http import HttpControlPlane
from supervisor.controlplane._models import WorkItem
from supervisor.testing._proxy import ChaosProxy, ProxyFaults, ProxyRecord

pytestmark = pytest.mark.slow

AGENT = Path(__file__).resolve().parents[1] / "agents" / "lease_bound.py"
KEY = "e2e-lease-bound-key-0123456789"
TTL = 2.0
MODES = ("plain", "grandchild", "setsid")


def env(**extra: str) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    values["SUPERVISOR_ENVIRONMENT_KEY"] = KEY
    values.update(extra)
    return values


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@asynccontextmanager
async def server(root: Path) -> AsyncIterator[str]:
    """The reference server with a short ack lease, on a fresh SQLite file."""
    argv = [
        sys.executable, "-m", "supervisor.testing.chaos", "serve",
        "--state-dir", str(root / "server"), "--ack-ttl", str(TTL),
        "--reclaim-ms", "1000", "--max-attempts", "5",
    ]  # fmt: skip
    with (root / "server.log").open("wb") as errors:
        process = await trio.lowlevel.open_process(argv, stdout=-1, stderr=errors, env=env())
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the server exited"
                line += chunk
        yield line.decode().strip()
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def start_worker(root: Path, name: str, url: str, *, concurrency: int) -> trio.Process:
    argv = [
        sys.executable, "-m", "supervisor", "run", "--control-plane", url,
        "--state-dir", str(root / name), "--worker-id", name,
        "--agent", f"{sys.executable} {AGENT} {{prompt}}",
        "--lease-ttl", str(TTL), "--max-concurrency", str(concurrency),
        "--drain-timeout", "1",
    ]  # fmt: skip
    with (root / f"{name}.log").open("wb") as out:
        return await trio.lowlevel.open_process(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(SUPERVISOR_API_ENABLED="false", SUPERVISOR_POLL_BLOCK_MS="200"),
        )


async def stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def kill_leftovers(log: Path) -> None:
    for event in events(log):
        if event["event"] == "start" and alive(event["pid"]):
            os.kill(event["pid"], signal.SIGKILL)


async def all_stopped(url: str, count: int) -> Sequence[WorkItem]:
    async with HttpControlPlane.open(url, key=KEY) as plane:
        with trio.fail_after(60):
            while True:
                items = await plane.list_work(limit=1000)
                if len(items) == count and all(i.state is WorkState.STOPPED for i in items):
                    return items
                await trio.sleep(0.2)


async def sigkill_round(root: Path, items: int) -> list[float]:
    """One worker serving ``items`` agents is SIGKILLed; returns kill -> group dead, per item."""
    root.mkdir()
    log = root / "agents.jsonl"
    async with server(root) as url:
        async with HttpControlPlane.open(url, key=KEY) as plane:
            ids = [
                (await plane.submit(f"{MODES[n % 3]} {log}", session_id=f"s{n}")).id
                for n in range(items)
            ]
        first = await start_worker(root, "w1", url, concurrency=items)
        second: trio.Process | None = None
        try:
            expected = {i: 1 + (MODES[n % 3] != "plain") for n, i in enumerate(ids)}
            with trio.fail_after(90):
                while True:
                    started: dict[str, int] = defaultdict(int)
                    for event in events(log):
                        if event["event"] == "start":
                            started[event["work_id"]] += 1
                    if all(started[i] >= expected[i] for i in ids):
                        break
                    await trio.sleep(0.05)
            first_run = defaultdict(list)
            for event in events(log):
                first_run[event["work_id"]].append(event["pid"])
            first.send_signal(signal.SIGKILL)
            killed_at = time.time()
            await first.wait()
            dead_at: dict[str, float] = {}
            with trio.fail_after(10):
                while len(dead_at) < len(ids):
                    now = time.time()
                    for work_id, pids in first_run.items():
                        if work_id not in dead_at and not any(alive(p) for p in pids):
                            dead_at[work_id] = now
                    await trio.sleep(0.002)
            latencies = [dead_at[i] - killed_at for i in ids]
            assert max(latencies) < 1.0, latencies  # every group, the escaped ones too

            second = await start_worker(root, "w2", url, concurrency=items)
            final = await all_stopped(url, len(ids))
        finally:
            await stop(first)
            if second is not None:
                await stop(second)
            kill_leftovers(log)
    for item in final:
        assert item.outcome is not None
        assert (item.worker_id, item.outcome.status.value) == ("w2", "completed"), item
        assert item.outcome.result == "second run"
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events(log):
        if event["event"] == "start" and event["role"] == "agent":
            runs[event["work_id"]].append(event)
    for work_id in ids:
        assert [e["second"] for e in runs[work_id]] == [False, True]  # one run each, no more
        # the reclaimed run started only after every process of the first was gone
        assert runs[work_id][1]["time"] > dead_at[work_id], work_id
    return latencies


async def test_sigkill_of_a_worker_kills_every_agent_group_at_once_and_runs_never_overlap(
    tmp_path: Path,
) -> None:
    """20 agents (plain, with a SIGTERM-ignoring grandchild, with a setsid() escapee) on a
    worker that is SIGKILLed: all dead within 1 s; a second worker reclaims after the ttl."""
    reps = int(os.environ.get("SUPERVISOR_E2E_REPS", "1"))
    latencies: list[float] = []
    for rep in range(reps):
        latencies += await sigkill_round(tmp_path / f"round{rep}", items=20)
    median = statistics.median(latencies) * 1000
    print(f"\nkill -> agent group dead: median {median:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"over {len(latencies)} groups")  # fmt: skip


async def test_a_frozen_workers_agent_dies_before_the_server_expiry_and_it_sends_no_stop(
    tmp_path: Path,
) -> None:
    """SIGSTOP for 2 x ttl: the reaper kills the agent (SIGTERM ignored by its grandchild,
    so after the grace SIGKILL) before the lease expires on the server; after SIGCONT the
    worker sends no stop; the item completes once, on the second worker."""
    log = tmp_path / "agents.jsonl"
    records: list[tuple[float, ProxyRecord]] = []
    async with server(tmp_path) as url, trio.open_nursery() as nursery:
        port = int(url.rsplit(":", 1)[1])
        calm = ProxyFaults(
            latency=(0.0, 0.0), error_rate=0, burst_rate=0, drop_rate=0, reset_rate=0,
            truncate_rate=0,
        )  # fmt: skip
        proxy = ChaosProxy(port, calm, observer=lambda r: records.append((time.time(), r)))
        proxy_url = await nursery.start(proxy.run)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            item_id = (await plane.submit(f"grandchild {log}", session_id="frozen")).id
        first = await start_worker(tmp_path, "w1", proxy_url, concurrency=1)
        second: trio.Process | None = None
        try:
            with trio.fail_after(60):
                while len([e for e in events(log) if e["event"] == "start"]) < 2:
                    await trio.sleep(0.05)
            await trio.sleep(TTL)  # a few heartbeats
            pids = [e["pid"] for e in events(log)]
            first.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            await trio.sleep(0.3)  # a beat in flight lands
            store = sqlite3.connect(
                f"file:{tmp_path / 'server' / STORE_FILENAME}?mode=ro", uri=True
            )
            try:
                (expires_at,) = store.execute(
                    "SELECT lease_expires_at FROM work_items WHERE id = ?", (item_id,)
                ).fetchone()
            finally:
                store.close()
            with trio.fail_after(2 * TTL):
                while any(alive(p) for p in pids):
                    await trio.sleep(0.002)
            dead_at = time.time()
            margin = expires_at - dead_at
            print(f"\nfrozen worker: agent dead {margin * 1000:.0f} ms before the server's expiry")
            assert margin > 0
            second = await start_worker(tmp_path, "w2", url, concurrency=1)
            await trio.sleep_until(
                trio.current_time() + max(0.0, stopped_at + 2 * TTL - time.time())
            )
            first.send_signal(signal.SIGCONT)
            resumed_at = time.time()
            [item] = await all_stopped(url, 1)
            await trio.sleep(TTL)  # time for the resumed worker to do anything it would
            assert first.returncode is None  # it lives on, and serves again
        finally:
            await stop(first)
            if second is not None:
                await stop(second)
            kill_leftovers(log)
            nursery.cancel_scope.cancel()
    late = [r for at, r in records if at >= resumed_at and r.method == "POST"]
    assert not [r for r in late if r.path.split("?")[0].endswith(("/stop", "/requeue"))], late
    assert item.outcome is not None
    assert (item.worker_id, item.outcome.status.value, item.attempts) == ("w2", "completed", 1)
    starts = [e for e in events(log) if e["event"] == "start" and e["role"] == "agent"]
    assert [e["second"] for e in starts] == [False, True]  # exactly one more run
    assert starts[1]["time"] > dead_at
    ends = [e for e in events(log) if e["event"] == "end"]
    assert [e["code"] for e in ends] == [0]  # completed exactly once
