"""Usage: python benchmarks/cancel_latency.py [--runs 200] [--grace 5]

How long from cancelling a running agent to its whole process group being
gone (SIGTERM sent, the leader reaped, the group verified empty, the output
pipes drained, ``run_agent_process`` unwound with ``trio.Cancelled``).

Two agents, each measured two ways in the same ``trio.run``, interleaved run
by run so that a machine getting busier shifts both alike:

* **sh + exec sleep**: ``sh -c 'echo ready; exec sleep 1000'``, whose SIGTERM
  is the kernel's default action: the agent itself spends ~nothing on it.
* **python handler**: ``tests/agents/term_handler.py``, a Python handler that
  writes a line and exits: the common shape of a well-behaved agent.

* **runner**: the run is started with ``run_agent_process`` (as a session
  does); once the agent printed ``ready``, the clock starts and the run's
  cancel scope is cancelled; the clock stops when the cancelled call has
  returned control to its caller.
* **bare**: the same agent started with ``trio.lowlevel.open_process``; once
  it printed ``ready``, the clock starts, SIGTERM is sent to it directly, and
  the clock stops when ``Process.wait()`` returns. This is the agent's own
  SIGTERM handling plus the kernel and Trio's wake-up, the floor that no
  runner can beat.

The target is p99(runner) - p99(bare) <= 50 ms. Figures are printed, never
asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor._worker._process import run_agent_process
from supervisor.lowlevel import SessionOutput

AGENTS = Path(__file__).resolve().parents[1] / "tests" / "agents"
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def shell_agent() -> list[str]:
    return ["sh", "-c", "echo ready; exec sleep 1000"]


def python_agent() -> list[str]:
    return [sys.executable, str(AGENTS / "term_handler.py")]


async def runner_once(argv: list[str], cwd: Path, grace: float) -> float:
    ready = trio.Event()

    def on_line(line: str) -> None:
        if line.startswith("ready"):
            ready.set()

    scope = trio.CancelScope()
    started = ended = 0.0
    async with trio.open_nursery() as nursery:

        async def session() -> None:
            nonlocal ended
            with scope:
                await run_agent_process(
                    argv,
                    cwd=cwd,
                    env=ENV,
                    output=SessionOutput(on_line=on_line),
                    grace=grace,
                    reap_orphans=True,
                )
            ended = time.perf_counter()

        nursery.start_soon(session)
        await ready.wait()
        started = time.perf_counter()
        scope.cancel()
    return ended - started


async def bare_once(argv: list[str], cwd: Path) -> float:
    proc = await trio.lowlevel.open_process(
        argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    async with proc.stdout:
        buffer = b""
        while b"ready" not in buffer:
            buffer += await proc.stdout.receive_some(4096)
        started = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        await proc.wait()
        ended = time.perf_counter()
    return ended - started


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "median": statistics.median(ordered),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def row(label: str, figures: dict[str, float]) -> str:
    cells = "".join(f"{figures[k] * 1000:>10.2f}" for k in ("median", "p90", "p99", "max"))
    return f"{label:<32}{cells}"


async def main(runs: int, grace: float) -> None:
    agents: dict[str, Callable[[], list[str]]] = {
        "sh + exec sleep": shell_agent,
        "python handler": python_agent,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        results: dict[str, dict[str, list[float]]] = {
            name: {"runner": [], "bare": []} for name in agents
        }
        for make in agents.values():  # warm-up: page cache, interpreter start
            await runner_once(make(), cwd, grace)
            await bare_once(make(), cwd)
        for _ in range(runs):
            for name, make in agents.items():
                results[name]["runner"].append(await runner_once(make(), cwd, grace))
                results[name]["bare"].append(await bare_once(make(), cwd))

    print(f"cancel -> process group gone, {runs} runs per row, grace {grace:g}s (ms)")
    print(f"{'':<32}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name in agents:
        runner = quantiles(results[name]["runner"])
        bare = quantiles(results[name]["bare"])
        print(row(f"{name}: runner", runner))
        print(row(f"{name}: bare SIGTERM", bare))
        over = {k: runner[k] - bare[k] for k in runner}
        print(row(f"{name}: runner - bare", over))
        verdict = "meets" if over["p99"] <= 0.050 else "MISSES"
        print(f"  -> p99 overhead {over['p99'] * 1000:.2f} ms: {verdict} the 50 ms target")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    trio.run(main, args.runs, args.grace)
