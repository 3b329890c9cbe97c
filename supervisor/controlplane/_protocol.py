"""The ``ControlPlane`` protocol: what a worker needs from its control plane.

Two implementations pass one conformance suite (``tests/controlplane``): the
embedded SQLite store and ``HttpControlPlane`` talking to the reference server.
Each instance is bound to one environment (``environment_id``).

Every method raises only this package's exceptions (``supervisor._exceptions``):
``TransientError`` for what is worth retrying, a ``FatalError`` subclass for
what is not (``FencingConflict`` for a stale token, ``Conflict`` for a call
that does not fit the state, ``NotFound`` for unknown ids, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from ._models import (
    Delegation,
    DelegationStatus,
    HeartbeatResult,
    Outcome,
    PresenceReport,
    RetryPolicy,
    SessionMessage,
    WorkerRecord,
    WorkItem,
    WorkState,
    WorkStats,
)

__all__ = ["ClaimsBatches", "ClaimsLeases", "ControlPlane", "LeasedClaim"]


@runtime_checkable
class ControlPlane(Protocol):
    """A work-lease control plane, bound to one environment."""

    @property
    def environment_id(self) -> str: ...

    # --- work ---------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: float | None = None,
        key: str | None = None,
        labels: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the item's, not this call's)
    ) -> WorkItem:
        """Queue a new session work item (``session_id`` defaults to a fresh id).

        ``retry`` makes its failed sessions retry with backoff (DESIGN §4.2).
        ``priority``: higher is claimed first (FIFO within one priority);
        ``delay`` in seconds or ``not_before`` (POSIX time): not claimed before.
        ``key``: idempotency; a key already used in the environment returns
        that item (``duplicate=True``, HTTP 200) instead of queueing another.
        ``labels``: routing; only a worker polling with all of them claims it.
        ``timeout``: seconds of execution its session may take (in place of
        the worker's ``session_timeout``).
        """
        ...

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        """Claim the oldest claimable item, waiting up to ``block_ms``; ``None`` if none.

        ``worker_id`` names the poller; an anonymous poll (``None``) is bound at ack.
        ``labels`` are the poller's: it gets only items whose required labels it
        all has (none: only unlabelled items).
        """
        ...

    async def ack(self, work_id: str, *, worker_id: str | None = None) -> WorkItem:
        """``queued -> starting``, binding the item to a worker; 409 the second time.

        The item is bound to the worker the poll named, or else to the one the ack
        names; when neither named one it is left unbound. An ack naming a worker
        other than the one the poll named is a 409.
        """
        ...

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        """Renew the lease with compare-and-swap on the fencing token (412 when stale)."""
        ...

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """Move a live item to ``stopped`` with its outcome (409 if stopped, 412 if stale)."""
        ...

    async def requeue(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """The holder gives a live item back: ``queued`` again with ``attempts + 1``.

        Used instead of ``stop`` when the session could not be served here (it
        wedged), so another worker may try. A ``stopping`` item, or one on its
        last attempt, is stopped with ``outcome`` instead. 409 if stopped, 412 if stale.
        """
        ...

    async def request_stop(self, work_id: str) -> WorkItem:
        """Operator cancel: the next heartbeat answers ``state: stopping``."""
        ...

    async def retry(self, work_id: str) -> WorkItem:
        """Put a stopped item (typically out of dead letter) back with fresh attempts."""
        ...

    async def get(self, work_id: str) -> WorkItem: ...

    async def list_work(
        self,
        *,
        state: WorkState | None = None,
        limit: int = 100,
        page: int = 0,
        dead: bool = False,
    ) -> Sequence[WorkItem]:
        """Items oldest first, ``limit`` per page; ``dead=True``: only the dead letter."""
        ...

    async def stats(self) -> WorkStats: ...

    # --- workers ------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, *, metadata: Mapping[str, object] | None = None
    ) -> WorkerRecord:
        """Register (or re-register) a worker; a new one starts ``provisioning``."""
        ...

    async def worker_heartbeat(self, report: PresenceReport) -> WorkerRecord:
        """Record a presence report and return the worker's evaluated status (410 if removed)."""
        ...

    async def get_worker(self, worker_id: str) -> WorkerRecord: ...

    async def list_workers(self) -> Sequence[WorkerRecord]: ...

    async def deregister_worker(self, worker_id: str) -> WorkerRecord:
        """Mark a worker ``removed`` (terminal)."""
        ...

    # --- delegations and messages -------------------------------------------

    async def delegate(self, source_id: str, task: str) -> Delegation:
        """Create a delegation from session ``source_id``: a new work item linked to it."""
        ...

    async def list_delegations(
        self,
        worker_id: str,
        *,
        status: DelegationStatus | None = None,
        uncollected: bool = False,
    ) -> Sequence[Delegation]:
        """Delegations whose source session is (or was) served by ``worker_id``.

        ``uncollected=True`` leaves out results already passed to `collect_delegation`.
        """
        ...

    async def record_delegation_result(
        self, delegation_id: str, *, status: DelegationStatus, response_preview: str | None = None
    ) -> Delegation:
        """Record a delegation's result (the store also does so when a delegate item stops)."""
        ...

    async def collect_delegation(self, delegation_id: str) -> Delegation:
        """Mark a result as collected by its worker (idempotent; 409 while pending)."""
        ...

    async def post_message(self, session_id: str, body: str) -> SessionMessage: ...

    async def notify(self, session_id: str, body: str) -> SessionMessage: ...

    async def list_messages(self, session_id: str) -> Sequence[SessionMessage]: ...

    # --- lifecycle -----------------------------------------------------------

    async def aclose(self) -> None:
        """Release connections or threads; idempotent."""
        ...


@runtime_checkable
class ClaimsBatches(Protocol):
    """A control plane that can poll and acknowledge several items in one call.

    Optional: the worker's poller uses `claim` when its control plane has it
    (the embedded SQLite and direct PostgreSQL planes) and holds more than one
    free session slot, and ``poll`` + ``ack`` otherwise.
    """

    async def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[WorkItem]:
        """Up to ``limit`` items, acknowledged for ``worker_id``; empty after ``block_ms``.

        ``labels`` are the claimer's routing labels, as for ``poll``.
        """
        ...


@attrs.frozen
class LeasedClaim:
    """An item claimed with its first lease granted in the same transaction (`ClaimsLeases`).

    Attributes:
        item: the item, ``active`` and bound to the claiming worker.
        heartbeat: the answer its first heartbeat would have had: the fencing
            token to renew with, and the ttl.
        asked_at: when the transaction that granted the lease was asked for, on
            the caller's Trio clock: the lease's deadline counts from here, as
            a heartbeat's counts from its send. (Only an in-process control
            plane can say this, which is why only one offers the protocol.)
    """

    item: WorkItem
    heartbeat: HeartbeatResult
    asked_at: float


@runtime_checkable
class ClaimsLeases(Protocol):
    """A control plane that can claim items and grant their first leases in one call.

    Optional, like `ClaimsBatches`: the worker's poller uses `claim_leased`
    when its control plane has it (the embedded SQLite and direct PostgreSQL
    planes), and each session's lease keeper starts from the grant instead of
    sending the first heartbeat itself.
    """

    async def claim_leased(
        self,
        *,
        worker_id: str,
        limit: int,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
        desired_ttl_seconds: float | None = None,
    ) -> list[LeasedClaim]:
        """Up to ``limit`` items, ``active`` for ``worker_id``, each with its first
        heartbeat's answer; empty after ``block_ms``."""
        ...
