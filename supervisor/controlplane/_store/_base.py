"""`Store`: the whole store contract, one class per record kind, no engine yet."""

from __future__ import annotations

from ._delegations import DelegationRecords
from ._items import ItemRecords
from ._workers import WorkerRecords

__all__ = ["Store"]


class Store(ItemRecords, WorkerRecords, DelegationRecords):
    """The control plane's state: work items, workers, delegations and messages.

    Every public method is synchronous, runs in one transaction, takes the
    current time as ``now`` and raises only the package's exceptions. An async
    caller runs the methods off its event loop (see `EmbeddedControlPlane`);
    an instance may be shared by any number of threads. The engines
    (`SQLiteStore`, ``PostgresStore``) differ only in how they connect, which
    SQL dialect they speak and whose clock is ``now``.
    """
