"""Usage: python benchmarks/soak.py [--sessions 10000] [--agent inprocess|true] [--concurrency 8]

Soak: many sessions through one long-lived worker, watching for slow leaks.

One :class:`~supervisor.Worker` on an ``EmbeddedControlPlane`` over a real
SQLite file in a temporary directory (store calls in worker threads, as in
production), ``none`` workspaces, runs ``--sessions`` sessions; items are
queued in batches so the queue never runs dry. The agent is an in-process
async function that returns at once (``inprocess``, the default: the
worker's own cost is what leaks, if anything does) or ``/bin/true`` (``true``:
adds a process, its pipes and its process group per session).

Every ``--every`` finished sessions the script collects garbage and samples
the process's resident set size (``VmRSS``) and open file descriptors
(``/proc/self/fd``), then prints the samples and their least-squares slopes
per 1000 sessions, over the whole run and over its second half (after the
caches warmed up). A flat second-half slope is what "no leak" looks like;
the figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor import AgentContext, Worker, WorkerConfig
from supervisor.controlplane import EmbeddedControlPlane, WorkState


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


async def instant(ctx: AgentContext) -> str:
    return "ok"


async def soak(args: argparse.Namespace, root: Path) -> list[tuple[int, float, int, int]]:
    config = WorkerConfig(
        state_dir=root / "state",
        worker_id="soak",
        max_concurrency=args.concurrency,
        poll_block_ms=200,
        api_enabled=False,
        agent="/bin/true",
    )
    plane = EmbeddedControlPlane(root / "cp.sqlite3")
    agent = instant if args.agent == "inprocess" else None
    worker = Worker(config, control_plane=plane, agent=agent)
    samples: list[tuple[int, float, int, int]] = []
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            submitted = 0
            next_sample = 0
            while True:
                done = sum(worker.stats().outcomes.values())
                if done >= next_sample:
                    gc.collect()
                    samples.append((done, time.monotonic() - started, rss_kib(), open_fds()))
                    print(
                        f"{done:>7} sessions {samples[-1][1]:7.1f}s "
                        f"rss {samples[-1][2] / 1024:7.1f} MiB  fds {samples[-1][3]:4}",
                        flush=True,
                    )
                    next_sample += args.every
                if done >= args.sessions:
                    break
                queued = submitted - done
                if queued < args.batch and submitted < args.sessions:
                    for _ in range(min(args.batch, args.sessions - submitted)):
                        await plane.submit("soak")
                        submitted += 1
                await trio.sleep(0.05)
            await worker.drain(timeout=10)
            nursery.cancel_scope.cancel()
        stopped = await plane.list_work(state=WorkState.STOPPED, limit=1)
        assert stopped, "no session reached the control plane"
    finally:
        await plane.aclose()
    return samples


def report(samples: list[tuple[int, float, int, int]], elapsed: float) -> None:
    sessions = [float(s[0]) for s in samples]
    rss = [float(s[2]) for s in samples]
    fds = [float(s[3]) for s in samples]
    half = len(samples) // 2
    done = samples[-1][0]
    print()
    print(f"{done} sessions in {elapsed:.1f}s ({done / elapsed:.0f} sessions/s)")
    print(
        f"rss: {rss[0] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB; slope "
        f"{slope(sessions, rss) * 1000:+.0f} KiB/1000 sessions overall, "
        f"{slope(sessions[half:], rss[half:]) * 1000:+.0f} KiB/1000 sessions in the second half"
    )
    print(
        f"fds: {int(fds[0])} -> {int(fds[-1])}; slope "
        f"{slope(sessions, fds) * 1000:+.3f}/1000 sessions overall, "
        f"{slope(sessions[half:], fds[half:]) * 1000:+.3f}/1000 sessions in the second half"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--agent", choices=("inprocess", "true"), default="inprocess")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--every", type=int, default=500, help="sample every N sessions")
    parser.add_argument("--batch", type=int, default=200, help="items queued at a time")
    args = parser.parse_args()
    logging.getLogger("supervisor").setLevel(logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="supervisor-soak-") as root:
        samples = trio.run(soak, args, Path(root))
    report(samples, time.monotonic() - started)


if __name__ == "__main__":
    main()
