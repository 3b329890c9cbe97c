"""The retention sweep: what an environment's ``retention`` says has ended long ago goes.

One task per process that owns a store (the reference server, a worker on the
embedded or direct PostgreSQL plane). Every ``interval`` it deletes, in
batches of at most ``batch`` rows (each one short transaction, so no lock is
held for long and live traffic interleaves), what `Store.purge_expired`
finds, until a batch comes back short. Several processes sweeping one
database at once is harmless: a row is deleted once, and on PostgreSQL a row
another sweep holds is skipped, never waited for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio
import trio.lowlevel

from ._exceptions import ControlPlaneError

__all__ = ["SWEEP_BATCH", "SWEEP_INTERVAL", "run_retention_sweep"]

log = logging.getLogger("supervisor.controlplane.retention")

#: Seconds between sweeps, and the most rows one batch (one transaction) deletes.
SWEEP_INTERVAL: Final = 60.0
SWEEP_BATCH: Final = 500

#: Deletes one batch of at most ``limit`` rows; returns how many it deleted.
PurgeBatch = Callable[[int], Awaitable[int]]


async def sweep_once(purge: PurgeBatch, *, batch: int = SWEEP_BATCH) -> int:
    """Batches until one comes back short; returns the rows deleted in all.

    Yields to the scheduler between batches, so a long backlog never starves
    the rest of the process.
    """
    total = 0
    while True:
        deleted = await purge(batch)
        total += deleted
        if deleted < batch:
            return total
        await trio.lowlevel.checkpoint()


async def run_retention_sweep(
    purge: PurgeBatch,
    *,
    interval: float = SWEEP_INTERVAL,
    batch: int = SWEEP_BATCH,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep now, then every ``interval`` seconds, until cancelled.

    A failed batch (the database unreachable for a moment) is logged and tried
    again at the next interval: retention is housekeeping, never a reason to
    stop serving.
    """
    if not interval > 0 or batch < 1:
        raise ValueError(f"need interval > 0 and batch >= 1, got {interval!r} and {batch!r}")
    task_status.started()
    while True:
        try:
            deleted = await sweep_once(purge, batch=batch)
        except ControlPlaneError as exc:
            log.warning("retention sweep failed; trying again in %gs: %s", interval, exc)
        else:
            if deleted:
                log.info("retention sweep deleted %d old records", deleted)
        await trio.sleep(interval)
