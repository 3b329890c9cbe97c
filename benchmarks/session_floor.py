"""Usage: python benchmarks/session_floor.py [--items 300] [--rounds 5] [--concurrency 8]

What the protocol alone costs per session, with none of the worker around it:
the floor under `throughput.py`'s worker rows on this machine.

Each "floor" row runs the steps every session must take, written as plainly
as Trio allows, against a bare ``trio.run_process`` loop in the same run:

* one poller task takes a slot (a ``CapacityLimiter``), polls, acks and
  starts the session in a task;
* the session runs its lease keeper in a nursery (first heartbeat, then
  sleep); once that beat succeeded the agent runs through
  ``AgentRunner.run`` (``/bin/true``, log-less, pipes, process group,
  teardown); the keeper is cancelled, the final ``stop`` is sent shielded,
  the slot released.

Nothing else: no supervision tree, no retries or deadlines, no workspace, log
file or journal, no metrics. The rows differ only in where the four store
calls (poll, ack, heartbeat, stop) go:

* **in memory**: a dict, one checkpoint per call;
* **SQLite, store thread**: ``SQLiteStore`` on a real file, its calls in one
  ``ThreadLane``, as the embedded control plane runs them;
* **SQLite, event loop**: the same store called on the event loop.

Medians over ``--rounds``; ratios over the bare rate; figures printed, never
asserted. The state lives in ``TMPDIR``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import AGENT, Cpu, Round, bare_round

from supervisor import AgentSpec
from supervisor.controlplane import NO_HEARTBEAT, Outcome, OutcomeStatus, SQLiteStore
from supervisor.lowlevel import AgentRunner, SessionOutput, ThreadLane

Call = Callable[[Callable[[], Any]], Awaitable[Any]]


class MemoryPlane:
    """Four calls on a list of item ids; a checkpoint each, as any async call has."""

    def __init__(self, items: int) -> None:
        self.queue = list(range(items))

    async def poll(self) -> object | None:
        await trio.lowlevel.checkpoint()
        return self.queue.pop() if self.queue else None

    async def ack(self, item: object) -> None:
        await trio.lowlevel.checkpoint()

    async def heartbeat(self, item: object) -> str:
        await trio.lowlevel.checkpoint()
        return "token"

    async def stop(self, item: object, token: str) -> None:
        await trio.lowlevel.checkpoint()


class StorePlane:
    """The same four calls on a real SQLite store, each through ``call``."""

    def __init__(self, path: Path, items: int, call: Call) -> None:
        self.store = SQLiteStore(path)
        self.call = call
        for n in range(items):
            self.store.submit("default", f"task {n}", now=time.time())

    async def poll(self) -> object | None:
        return await self.call(lambda: self.store.poll("default", worker_id="w", now=time.time()))

    async def ack(self, item: Any) -> None:
        await self.call(lambda: self.store.ack("default", item.id, worker_id="w", now=time.time()))

    async def heartbeat(self, item: Any) -> str:
        result = await self.call(
            lambda: self.store.heartbeat(
                "default", item.id, expected_last_heartbeat=NO_HEARTBEAT, now=time.time()
            )
        )
        return str(result.last_heartbeat)

    async def stop(self, item: Any, token: str) -> None:
        outcome = Outcome(OutcomeStatus.COMPLETED)
        await self.call(
            lambda: self.store.stop(
                "default",
                item.id,
                now=time.time(),
                expected_last_heartbeat=token,
                outcome=outcome,
            )
        )


async def on_loop(function: Callable[[], Any]) -> Any:
    await trio.lowlevel.checkpoint()
    return function()


async def floor_round(plane: Any, items: int, concurrency: int, workspace: Path) -> Round:
    agent = AgentRunner(AgentSpec.from_argv([AGENT]), reap_orphans=True)
    slots = trio.CapacityLimiter(concurrency)
    ended = 0
    all_ended = trio.Event()

    async def session(item: object, slot: object) -> None:
        nonlocal ended
        try:
            confirmed = trio.Event()
            token = ""

            async def keeper() -> None:
                nonlocal token
                token = await plane.heartbeat(item)
                confirmed.set()
                await trio.sleep(20)  # the next beat; never due in a round

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keeper)
                await confirmed.wait()
                await agent.run(
                    prompt="p",
                    work_id="w",
                    session_id="s",
                    workspace=workspace,
                    output=SessionOutput(),
                )
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await plane.stop(item, token)
        finally:
            slots.release_on_behalf_of(slot)
            ended += 1
            if ended == items:
                all_ended.set()

    async def poller(nursery: trio.Nursery) -> None:
        while True:
            slot = object()
            await slots.acquire_on_behalf_of(slot)
            item = await plane.poll()
            if item is None:
                slots.release_on_behalf_of(slot)
                await trio.sleep(0.01)
                continue
            await plane.ack(item)
            nursery.start_soon(session, item, slot)

    cpu = Cpu.now()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller, nursery)
        await all_ended.wait()
        nursery.cancel_scope.cancel()
    return Round(time.perf_counter() - start, Cpu.now() - cpu)


ROWS = (
    ("bare", "bare trio.run_process loop"),
    ("memory", "floor session, in-memory plane"),
    ("thread", "floor session, SQLite, store thread"),
    ("loop", "floor session, SQLite, event loop"),
)


async def run(args: argparse.Namespace) -> None:
    items, concurrency = args.items, args.concurrency
    results: dict[str, list[Round]] = {key: [] for key, _ in ROWS}
    lane = ThreadLane("supervisor-store")
    try:
        for _ in range(args.rounds):
            results["bare"].append(await bare_round(items, concurrency))
            with tempfile.TemporaryDirectory(prefix="floor-bench-") as tmp:
                directory = Path(tmp)
                results["memory"].append(
                    await floor_round(MemoryPlane(items), items, concurrency, directory)
                )
                for key, call in (("thread", lane.run), ("loop", on_loop)):
                    plane = StorePlane(directory / f"{key}.sqlite3", items, call)
                    try:
                        results[key].append(await floor_round(plane, items, concurrency, directory))
                    finally:
                        plane.store.close()
    finally:
        await lane.aclose()

    bare_rate = items / statistics.median(r.seconds for r in results["bare"])
    header = f"{'row':<40}{'sessions/s':>11}{'ratio':>7}{'loop ms':>9}{'other ms':>10}"
    print(header)
    print("-" * len(header))
    for key, label in ROWS:
        rows = results[key]
        rate = items / statistics.median(r.seconds for r in rows)
        loop = statistics.median(r.cpu.loop for r in rows) / items * 1000
        other = statistics.median(r.cpu.process - r.cpu.loop for r in rows) / items * 1000
        print(f"{label:<40}{rate:>11.0f}{rate / bare_rate:>7.2f}{loop:>9.2f}{other:>10.2f}")
    print(
        "\nloop = CPU of the event-loop thread per session; other = the process's other"
        "\nthreads (the store thread, Trio's spawn threads). Compare with throughput.py's"
        "\nworker rows: what they cost beyond these is the worker itself."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--items", type=int, default=300, help="sessions per round (300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians shown (5)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent sessions (8)")
    args = parser.parse_args(argv)
    print(
        f"session floor: {args.items} sessions per round, concurrency {args.concurrency}, "
        f"median of {args.rounds} rounds, agent {AGENT}, {sys.version.split()[0]}\n"
    )
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
