"""``ScriptedControlPlane``: an in-memory control plane with fault injection.

A test double, not an implementation: it follows the work-item lifecycle of
DESIGN §4 closely enough for unit tests of the layers built on the control
plane (lease keeper, poller, runner), and adds what the real ones cannot do on
demand: scripted heartbeat answers, injected errors, calls that hang, latency,
a record of every call with its time, and a re-grant of an item to another
worker at the very instant its lease expires server-side.

All times (in records and in the items it returns) are trio clock times
(``trio.current_time()``), not POSIX times, so that tests under
``autojump_clock`` can compare them with the times the code under test saw.
Tests of the control-plane boundary itself use the real store and server.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeAlias

import attrs
import trio

from ..controlplane._exceptions import (
    Conflict,
    ControlPlaneUnavailable,
    FencingConflict,
    Gone,
    NotFound,
    QueueFull,
)
from ..controlplane._models import (
    NO_HEARTBEAT,
    Attempt,
    Delegation,
    DelegationStatus,
    HeartbeatResult,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    RetryPolicy,
    SessionData,
    SessionMessage,
    WorkerRecord,
    WorkerStatus,
    WorkItem,
    WorkState,
    WorkStats,
)
from ..controlplane._status import StatusPolicy, evaluate, new_worker
from ..controlplane._store._common import QUEUE_FULL_RETRY_AFTER, check_labels, check_timeout
from ..controlplane._store._items import backoff_delay, stop_decision

__all__ = [
    "HANG",
    "Call",
    "Fail",
    "Hang",
    "Regrant",
    "Reply",
    "ScriptEntry",
    "ScriptedControlPlane",
]

_LIVE: Final = frozenset({WorkState.STARTING, WorkState.ACTIVE, WorkState.STOPPING})


@attrs.frozen
class Reply:
    """A scripted heartbeat answer, applied honestly to the server state.

    The fencing-token check still happens (a stale token gets 412 whatever the
    script says); the overrides only shape a successful answer.

    Attributes:
        ttl: the ttl granted (default: the desired ttl, clamped, else ``default_ttl``).
        state: move the item to this state first (``stopping`` = an operator cancel).
        lease_extended: ``False`` answers without extending the server-side expiry.
        request_delay: seconds the request travels before the server processes it.
        answer_delay: seconds the answer travels back after processing.
    """

    ttl: float | None = None
    state: WorkState | None = None
    lease_extended: bool = True
    request_delay: float = 0.0
    answer_delay: float = 0.0


@attrs.frozen
class Fail:
    """A scripted failure: raise ``error`` after ``delay`` seconds, without processing."""

    error: Exception
    delay: float = 0.0


@attrs.frozen
class Hang:
    """A scripted call that never answers (it blocks until the caller cancels it)."""


#: The ready-made :class:`Hang` entry.
HANG: Final = Hang()

#: What :meth:`ScriptedControlPlane.script_heartbeats` accepts (an exception = ``Fail(exc)``).
ScriptEntry: TypeAlias = Reply | Fail | Hang | Exception


@attrs.define(eq=False)
class Call:
    """One call made to the fake, as it happened.

    Attributes:
        method: the protocol method name (``"heartbeat"``, ``"stop"``, ...).
        args: its arguments by name.
        started_at: trio time the call was made.
        processed_at: trio time the fake changed its state for it (``None`` if it never did).
        ended_at: trio time it returned, raised or was cancelled.
        result: what it returned.
        error: the exception it raised (``None`` when it returned or was cancelled).
        cancelled: the caller cancelled it before it answered.
        script: the scripted heartbeat entry it consumed, if any.
    """

    method: str
    args: Mapping[str, object]
    started_at: float
    processed_at: float | None = None
    ended_at: float | None = None
    result: object = None
    error: Exception | None = None
    cancelled: bool = False
    script: ScriptEntry | None = None

    @property
    def ok(self) -> bool:
        """Returned normally."""
        return self.ended_at is not None and self.error is None and not self.cancelled


@attrs.frozen
class Regrant:
    """An item handed to another worker when its lease expired (see ``regrant_at_expiry``)."""

    work_id: str
    worker_id: str
    at: float
    token: str


@attrs.define(eq=False)
class _Record:
    item: WorkItem
    token: str | None = None
    expires_at: float | None = None
    delivered_at: float | None = None
    delivered_to: str | None = None
    #: Every token of the current lease (what a 412 may name the current token for).
    lease_tokens: set[str] = attrs.field(factory=set)

    def stale(self, work_id: str, presented: str) -> FencingConflict:
        """The 412 for ``presented``; it names the current token to the same lease only."""
        same = self.token is not None and presented in self.lease_tokens
        return FencingConflict(
            f"stale fencing token for work item {work_id}",
            current_token=self.token if same else None,
        )

    def new_lease(self) -> None:
        self.lease_tokens.clear()


def _attempt(item: WorkItem, outcome: Outcome, ended: float, retry_at: float | None) -> Attempt:
    return Attempt(
        attempt=item.attempts + 1,
        outcome=outcome,
        ended_at=ended,
        worker_id=item.worker_id,
        started_at=item.started_at,
        retry_at=retry_at,
    )


class ScriptedControlPlane:
    """An in-memory ``ControlPlane`` with fault injection, for unit tests.

    Args:
        environment_id: the environment this instance is bound to.
        default_ttl: the ttl granted when none is asked for.
        min_ttl: lower clamp of a desired ttl.
        max_ttl: upper clamp of a desired ttl.
        max_attempts: expired leases before an item ends ``stopped`` (failed), for an
            item without a retry policy.
        reclaim_ms: how long a polled but never acknowledged item stays
            hidden when the poller names no ``reclaim_older_than_ms``.
        max_queue_depth: the environment's queue cap (``None``: none); a submit past it
            raises `QueueFull`, as the store does.

    The policy rules follow the store's, small: the retry rule (the same pure
    `stop_decision` and `backoff_delay`), dead letter, each ended attempt in the
    item's history, priority then age for claims, ``not_before``, idempotency keys
    and the queue cap. Retention is the store's alone (nothing is purged here).
    """

    def __init__(
        self,
        environment_id: str = "default",
        *,
        default_ttl: float = 60.0,
        min_ttl: float = 0.1,
        max_ttl: float = 3600.0,
        max_attempts: int = 3,
        reclaim_ms: int = 60_000,
        max_queue_depth: int | None = None,
    ) -> None:
        self._environment_id = environment_id
        self.default_ttl = default_ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_attempts = max_attempts
        self.reclaim_ms = reclaim_ms
        self.max_queue_depth = max_queue_depth
        #: Every call, in the order made.
        self.calls: list[Call] = []
        #: Leases that expired server-side: ``(work_id, trio time)``.
        self.expirations: list[tuple[str, float]] = []
        #: Items handed to another worker by :meth:`regrant_at_expiry`.
        self.regrants: list[Regrant] = []
        self._records: dict[str, _Record] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._script: collections.deque[ScriptEntry] = collections.deque()
        self._fail_next: dict[str, collections.deque[Exception]] = collections.defaultdict(
            collections.deque
        )
        self._hung: dict[str, trio.Event] = {}
        self._latency: dict[str, tuple[float, float]] = {}
        self._changed = trio.Event()
        self._workers: dict[str, WorkerRecord] = {}
        #: Worker status thresholds; presence reports go through the real §4 table.
        self.status_policy = StatusPolicy()
        self._polled_by: dict[str, float] = {}
        self._delegations: dict[str, Delegation] = {}
        self._messages: dict[str, list[SessionMessage]] = collections.defaultdict(list)
        self._closed = False

    def __repr__(self) -> str:
        return f"<ScriptedControlPlane {self._environment_id!r} items={len(self._records)}>"

    @property
    def environment_id(self) -> str:
        return self._environment_id

    # --- fault injection -----------------------------------------------------

    def script_heartbeats(self, entries: Iterable[ScriptEntry]) -> None:
        """Queue answers for the next heartbeats, in order (any work item).

        Once the queue is empty, heartbeats are answered normally.
        """
        self._script.extend(entries)

    def clear_script(self) -> None:
        """Drop the heartbeat answers not consumed yet (answers are normal again)."""
        self._script.clear()

    @property
    def scripted_left(self) -> int:
        """Scripted heartbeat entries not consumed yet."""
        return len(self._script)

    def fail_next(self, method: str, error: Exception, *, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error`` without processing."""
        self._fail_next[method].extend([error] * times)

    def hang(self, *methods: str) -> None:
        """Make calls of ``methods`` (``"*"`` = every method) block until :meth:`release`."""
        for method in methods:
            self._hung.setdefault(method, trio.Event())

    def release(self, *methods: str) -> None:
        """Let hung calls of ``methods`` through (no argument: all of them)."""
        for method in methods or tuple(self._hung):
            event = self._hung.pop(method, None)
            if event is not None:
                event.set()

    def set_latency(self, method: str, *, request: float = 0.0, answer: float = 0.0) -> None:
        """Delay every call of ``method``: ``request`` before processing, ``answer`` after."""
        self._latency[method] = (request, answer)

    # --- inspection ----------------------------------------------------------

    def calls_to(
        self, method: str, *, work_id: str | None = None, since: float | None = None
    ) -> list[Call]:
        """The recorded calls of ``method`` (for one item, from a time on)."""
        return [
            call
            for call in self.calls
            if call.method == method
            and (work_id is None or call.args.get("work_id") == work_id)
            and (since is None or call.started_at >= since)
        ]

    def expires_at(self, work_id: str) -> float | None:
        """The server-side expiry of the item's current lease (``None`` without one)."""
        return self._get(work_id).expires_at

    def token_of(self, work_id: str) -> str | None:
        """The item's current fencing token (``None`` before its first heartbeat)."""
        return self._get(work_id).token

    async def regrant_at_expiry(self, work_id: str, *, worker_id: str) -> Regrant | None:
        """Wait for the item's lease to expire, then grant it to ``worker_id`` at that instant.

        Follows renewals (the expiry moves on with each good heartbeat).
        Returns ``None`` if the item is stopped first.
        """
        while True:
            record = self._get(work_id)
            if record.item.state is WorkState.STOPPED:
                return None
            if record.expires_at is None:
                await self._wait_changed()
                continue
            await trio.sleep_until(record.expires_at)
            now = trio.current_time()
            if record.expires_at is not None and record.expires_at > now:
                continue  # renewed meanwhile
            self._expire(now)
            if record.item.state is not WorkState.QUEUED:
                return None
            token = self._new_token()
            record.token = token
            record.new_lease()
            record.lease_tokens.add(token)
            record.expires_at = now + self.default_ttl
            record.delivered_at = now
            record.delivered_to = worker_id
            record.item = attrs.evolve(
                record.item,
                state=WorkState.ACTIVE,
                worker_id=worker_id,
                acknowledged_at=now,
                started_at=now,
                latest_heartbeat_at=now,
            )
            regrant = Regrant(work_id=work_id, worker_id=worker_id, at=now, token=token)
            self.regrants.append(regrant)
            self._notify()
            return regrant

    # --- work ----------------------------------------------------------------

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
        async with self._recording("submit", prompt=prompt, session_id=session_id) as call:
            for known in self._records.values():
                if key is not None and known.item.key == key:
                    item = attrs.evolve(known.item, duplicate=True)
                    self._processed(call)
                    call.result = item
                    return item
            self._expire(trio.current_time())
            depth = sum(r.item.state is WorkState.QUEUED for r in self._records.values())
            if self.max_queue_depth is not None and depth >= self.max_queue_depth:
                raise QueueFull(
                    self._environment_id, depth, self.max_queue_depth, QUEUE_FULL_RETRY_AFTER
                )
            n = next(self._ids)
            item = WorkItem(
                id=f"work-{n}",
                environment_id=self._environment_id,
                state=WorkState.QUEUED,
                data=SessionData(id=session_id or f"session-{n}", prompt=prompt),
                metadata=metadata or {},
                created_at=trio.current_time(),
                retry=retry,
                priority=priority,
                not_before=not_before if delay is None else trio.current_time() + delay,
                key=key,
                labels=check_labels(labels),
                timeout=check_timeout(timeout),
            )
            self._records[item.id] = _Record(item)
            self._processed(call)
            call.result = item
        return item

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        async with self._recording(
            "poll",
            worker_id=worker_id,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=tuple(labels or ()),
        ) as call:
            wanted = frozenset(check_labels(labels))
            give_up_at = trio.current_time() + max(0, block_ms) / 1000
            item: WorkItem | None = None
            reclaim = (
                reclaim_older_than_ms if reclaim_older_than_ms is not None else self.reclaim_ms
            ) / 1000
            while True:
                now = trio.current_time()
                self._expire(now)
                if worker_id is not None:
                    self._polled_by[worker_id] = now
                record = self._claimable(now, reclaim, wanted)
                if record is not None:
                    record.delivered_at = now
                    record.delivered_to = worker_id
                    self._processed(call)
                    item = attrs.evolve(record.item, secret=f"scripted-secret-{record.item.id}")
                    call.result = item
                    break
                if now >= give_up_at:
                    self._processed(call)
                    break
                with trio.move_on_at(give_up_at):
                    await self._wait_changed()
        return item

    async def ack(self, work_id: str, *, worker_id: str | None = None) -> WorkItem:
        async with self._recording("ack", work_id=work_id, worker_id=worker_id) as call:
            record = self._live_record(work_id)
            if record.item.state is not WorkState.QUEUED:
                raise Conflict(f"work item {work_id} is {record.item.state.value}, not queued")
            now = trio.current_time()
            record.item = attrs.evolve(
                record.item,
                state=WorkState.STARTING,
                worker_id=record.delivered_to or worker_id,
                acknowledged_at=now,
            )
            self._processed(call)
            call.result = record.item
        return record.item

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        async with self._recording(
            "heartbeat",
            work_id=work_id,
            expected_last_heartbeat=expected_last_heartbeat,
            desired_ttl_seconds=desired_ttl_seconds,
        ) as call:
            entry = self._script.popleft() if self._script else Reply()
            call.script = entry if isinstance(entry, (Reply, Hang, Fail)) else Fail(entry)
            reply: Reply
            match call.script:
                case Hang():
                    await trio.sleep_forever()
                case Fail(error=error, delay=delay):
                    await trio.sleep(delay)
                    raise error
                case Reply() as reply:
                    pass
            await trio.sleep(reply.request_delay)
            result = self._process_heartbeat(
                call, work_id, expected_last_heartbeat, desired_ttl_seconds, reply
            )
            await trio.sleep(reply.answer_delay)
            call.result = result
        return result

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        async with self._recording(
            "stop",
            work_id=work_id,
            force=force,
            expected_last_heartbeat=expected_last_heartbeat,
            outcome=outcome,
        ) as call:
            record = self._live_record(work_id)
            if record.item.state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id} is already stopped")
            if expected_last_heartbeat is not None:
                current = record.token if record.token is not None else NO_HEARTBEAT
                if record.item.state is WorkState.QUEUED or expected_last_heartbeat != current:
                    raise record.stale(work_id, expected_last_heartbeat)
            now = trio.current_time()
            record.expires_at = None
            recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="stopped")
            item = record.item
            decision = stop_decision(item.retry, item.state, recorded, item.attempts)
            retry_at = (
                now + backoff_delay(item.retry, decision.attempts)
                if decision.requeue and item.retry is not None
                else None
            )
            history = (*item.history, _attempt(item, recorded, now, retry_at))
            if retry_at is not None:
                record.token = None
                record.new_lease()
                record.delivered_at = None
                record.delivered_to = None
                record.item = attrs.evolve(
                    item,
                    state=WorkState.QUEUED,
                    attempts=decision.attempts,
                    worker_id=None,
                    acknowledged_at=None,
                    started_at=None,
                    latest_heartbeat_at=None,
                    not_before=retry_at,
                    history=history,
                )
                self._notify()
            else:
                record.item = attrs.evolve(
                    item,
                    state=WorkState.STOPPED,
                    stopped_at=now,
                    outcome=outcome,
                    attempts=decision.attempts,
                    dead=decision.dead,
                    history=history,
                )
            self._processed(call)
            call.result = record.item
        return record.item

    async def requeue(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        async with self._recording(
            "requeue",
            work_id=work_id,
            expected_last_heartbeat=expected_last_heartbeat,
            outcome=outcome,
        ) as call:
            record = self._live_record(work_id)
            state = record.item.state
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id} is already stopped")
            current = record.token if record.token is not None else NO_HEARTBEAT
            if state is WorkState.QUEUED or expected_last_heartbeat != current:
                raise record.stale(work_id, expected_last_heartbeat)
            now = trio.current_time()
            attempts = record.item.attempts + 1
            recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="requeued")
            record.token = None
            record.new_lease()
            record.expires_at = None
            record.delivered_at = None
            record.delivered_to = None
            final = state is WorkState.STOPPING or attempts >= self._limit(record.item)
            history = (
                *record.item.history,
                _attempt(record.item, recorded, now, None if final else now),
            )
            if final:
                record.item = attrs.evolve(
                    record.item,
                    state=WorkState.STOPPED,
                    attempts=attempts,
                    stopped_at=now,
                    outcome=recorded,
                    dead=state is not WorkState.STOPPING,
                    history=history,
                )
            else:
                record.item = attrs.evolve(
                    record.item,
                    state=WorkState.QUEUED,
                    attempts=attempts,
                    worker_id=None,
                    acknowledged_at=None,
                    started_at=None,
                    latest_heartbeat_at=None,
                    history=history,
                )
            self._processed(call)
            call.result = record.item
        return record.item

    async def request_stop(self, work_id: str) -> WorkItem:
        async with self._recording("request_stop", work_id=work_id) as call:
            record = self._live_record(work_id)
            now = trio.current_time()
            state = record.item.state
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id} is already stopped")
            if state is WorkState.QUEUED:
                record.item = attrs.evolve(
                    record.item,
                    state=WorkState.STOPPED,
                    stop_requested_at=now,
                    stopped_at=now,
                    outcome=Outcome(OutcomeStatus.CANCELLED, reason="cancelled while queued"),
                )
            elif state is not WorkState.STOPPING:
                record.item = attrs.evolve(
                    record.item, state=WorkState.STOPPING, stop_requested_at=now
                )
            self._processed(call)
            call.result = record.item
        return record.item

    async def get(self, work_id: str) -> WorkItem:
        async with self._recording("get", work_id=work_id) as call:
            item = self._live_record(work_id).item
            call.result = item
        return item

    async def retry(self, work_id: str) -> WorkItem:
        """Put a stopped item back to ``queued`` with fresh attempts (no retry rule here)."""
        async with self._recording("retry", work_id=work_id) as call:
            record = self._live_record(work_id)
            if record.item.state is not WorkState.STOPPED:
                raise Conflict(f"work item {work_id} is {record.item.state}, not stopped")
            record.item = attrs.evolve(
                record.item,
                state=WorkState.QUEUED,
                attempts=0,
                worker_id=None,
                outcome=None,
                stopped_at=None,
                stop_requested_at=None,
                not_before=None,
                dead=False,
            )
            self._processed(call)
            call.result = record.item
        return record.item

    async def list_work(
        self,
        *,
        state: WorkState | None = None,
        limit: int = 100,
        page: int = 0,
        dead: bool = False,
    ) -> Sequence[WorkItem]:
        async with self._recording("list_work", state=state, limit=limit, page=page) as call:
            self._expire(trio.current_time())
            items = [
                r.item
                for r in self._records.values()
                if (state is None or r.item.state is state) and (not dead or r.item.dead)
            ]
            items = items[page * limit : (page + 1) * limit]
            call.result = items
        return items

    async def stats(self) -> WorkStats:
        async with self._recording("stats") as call:
            now = trio.current_time()
            self._expire(now)
            queued = [r.item for r in self._records.values() if r.item.state is WorkState.QUEUED]
            result = WorkStats(
                depth=len(queued),
                pending=sum(r.item.state in _LIVE for r in self._records.values()),
                oldest_queued_at=min((i.created_at or 0.0 for i in queued), default=None),
                workers_polling=sum(now - t <= 60 for t in self._polled_by.values()),
            )
            call.result = result
        return result

    # --- workers ---------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, *, metadata: Mapping[str, object] | None = None
    ) -> WorkerRecord:
        async with self._recording("register_worker", worker_id=worker_id) as call:
            record = WorkerRecord(
                worker_id=worker_id,
                environment_id=self._environment_id,
                status=WorkerStatus.PROVISIONING,
                registered_at=trio.current_time(),
                runtime_metadata=dict(metadata or {}),
            )
            self._workers[worker_id] = record
            call.result = record
        return record

    async def worker_heartbeat(self, report: PresenceReport) -> WorkerRecord:
        async with self._recording("worker_heartbeat", report=report) as call:
            old = self._workers.get(report.worker_id)
            if old is not None and old.status is WorkerStatus.REMOVED:
                raise Gone(f"worker {report.worker_id} was removed")
            now = trio.current_time()
            if old is None:
                old = new_worker(report.worker_id, self._environment_id, now=now)
            record = evaluate(old, now=now, policy=self.status_policy, report=report)
            self._workers[report.worker_id] = record
            call.result = record
        return record

    async def get_worker(self, worker_id: str) -> WorkerRecord:
        async with self._recording("get_worker", worker_id=worker_id) as call:
            record = self._worker(worker_id)
            call.result = record
        return record

    async def list_workers(self) -> Sequence[WorkerRecord]:
        async with self._recording("list_workers") as call:
            records = [self._worker(worker_id) for worker_id in self._workers]
            call.result = records
        return records

    async def deregister_worker(self, worker_id: str) -> WorkerRecord:
        async with self._recording("deregister_worker", worker_id=worker_id) as call:
            record = attrs.evolve(self._worker(worker_id), status=WorkerStatus.REMOVED)
            self._workers[worker_id] = record
            call.result = record
        return record

    # --- delegations and messages ---------------------------------------------

    async def delegate(self, source_id: str, task: str) -> Delegation:
        async with self._recording("delegate", source_id=source_id, task=task) as call:
            source = next(
                (r.item for r in self._records.values() if r.item.data.id == source_id), None
            )
            if source is None:
                raise NotFound(f"unknown session {source_id}")
            n = next(self._ids)
            item = WorkItem(
                id=f"work-{n}",
                environment_id=self._environment_id,
                state=WorkState.QUEUED,
                data=SessionData(id=f"session-{n}", prompt=task),
                metadata={"delegated_from": source_id},
                created_at=trio.current_time(),
            )
            self._records[item.id] = _Record(item)
            delegation = Delegation(
                id=f"delegation-{n}",
                source_id=source_id,
                work_id=item.id,
                task=task,
                status=DelegationStatus.PENDING,
                worker_id=source.worker_id,
                created_at=trio.current_time(),
            )
            self._delegations[delegation.id] = delegation
            self._notify()
            call.result = delegation
        return delegation

    async def list_delegations(
        self,
        worker_id: str,
        *,
        status: DelegationStatus | None = None,
        uncollected: bool = False,
    ) -> Sequence[Delegation]:
        async with self._recording("list_delegations", worker_id=worker_id, status=status) as call:
            found = [
                d
                for d in self._delegations.values()
                if d.worker_id == worker_id
                and (status is None or d.status is status)
                and not (uncollected and d.collected_at is not None)
            ]
            call.result = found
        return found

    async def collect_delegation(self, delegation_id: str) -> Delegation:
        async with self._recording("collect_delegation", delegation_id=delegation_id) as call:
            old = self._delegations.get(delegation_id)
            if old is None:
                raise NotFound(f"unknown delegation {delegation_id}")
            if old.status is DelegationStatus.PENDING:
                raise Conflict(f"delegation {delegation_id} has no result yet")
            new = old
            if old.collected_at is None:
                new = attrs.evolve(old, collected_at=trio.current_time())
                self._delegations[delegation_id] = new
            call.result = new
        return new

    async def record_delegation_result(
        self, delegation_id: str, *, status: DelegationStatus, response_preview: str | None = None
    ) -> Delegation:
        async with self._recording(
            "record_delegation_result", delegation_id=delegation_id, status=status
        ) as call:
            old = self._delegations.get(delegation_id)
            if old is None:
                raise NotFound(f"unknown delegation {delegation_id}")
            new = attrs.evolve(
                old,
                status=status,
                response_preview=response_preview,
                completed_at=trio.current_time(),
            )
            self._delegations[delegation_id] = new
            call.result = new
        return new

    async def post_message(self, session_id: str, body: str) -> SessionMessage:
        return await self._message("post_message", session_id, body, "message")

    async def notify(self, session_id: str, body: str) -> SessionMessage:
        return await self._message("notify", session_id, body, "notification")

    async def list_messages(self, session_id: str) -> Sequence[SessionMessage]:
        async with self._recording("list_messages", session_id=session_id) as call:
            messages = list(self._messages.get(session_id, ()))
            call.result = messages
        return messages

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    # --- internals ---------------------------------------------------------------

    @asynccontextmanager
    async def _recording(self, method: str, **args: object) -> AsyncIterator[Call]:
        call = Call(method=method, args=args, started_at=trio.current_time())
        self.calls.append(call)
        try:
            answer = await self._inject(method)
            try:
                yield call
            except Exception:
                await trio.sleep(answer)
                raise
            await trio.sleep(answer)
        except trio.Cancelled:
            call.cancelled = True
            raise
        except Exception as exc:
            call.error = exc
            raise
        finally:
            call.ended_at = trio.current_time()

    async def _inject(self, method: str) -> float:
        """Apply the faults planted for ``method``; returns the answer latency."""
        if self._closed:
            raise ControlPlaneUnavailable("the control plane was closed")
        while (event := self._hung.get(method, self._hung.get("*"))) is not None:
            await event.wait()
        request, answer = self._latency.get(method, (0.0, 0.0))
        await trio.sleep(request)
        pending = self._fail_next.get(method)
        if pending:
            raise pending.popleft()
        return answer

    async def _message(self, method: str, session_id: str, body: str, kind: str) -> SessionMessage:
        async with self._recording(method, session_id=session_id) as call:
            message = SessionMessage(
                id=f"message-{next(self._ids)}",
                session_id=session_id,
                kind=kind,
                body=body,
                created_at=trio.current_time(),
            )
            self._messages[session_id].append(message)
            call.result = message
        return message

    def _process_heartbeat(
        self,
        call: Call,
        work_id: str,
        expected: str,
        desired_ttl: float | None,
        reply: Reply,
    ) -> HeartbeatResult:
        now = trio.current_time()
        record = self._live_record(work_id)
        state = record.item.state
        if expected == NO_HEARTBEAT:
            if record.token is not None:
                raise FencingConflict(f"work item {work_id} already has a lease")
            if state is not WorkState.STARTING:
                raise Conflict(f"work item {work_id} is {state.value}, not starting")
        elif record.token is None or expected != record.token:
            raise record.stale(work_id, expected)
        if reply.ttl is not None:
            ttl = reply.ttl
        elif desired_ttl is not None:
            ttl = min(self.max_ttl, max(self.min_ttl, desired_ttl))
        else:
            ttl = self.default_ttl
        item = record.item
        if item.state is WorkState.STARTING:
            item = attrs.evolve(item, state=WorkState.ACTIVE, started_at=now)
        if reply.state is not None and reply.state is not item.state:
            if reply.state is WorkState.STOPPED:
                item = attrs.evolve(item, state=reply.state, stopped_at=now)
            elif reply.state is WorkState.STOPPING:
                item = attrs.evolve(item, state=reply.state, stop_requested_at=now)
            else:
                item = attrs.evolve(item, state=reply.state)
        extended = reply.lease_extended and item.state is not WorkState.STOPPED
        if item.state is WorkState.STOPPED:
            record.expires_at = None
        elif record.expires_at is None:
            record.expires_at = now + ttl
        elif extended:
            # An extension never shortens a granted lease (even with a smaller
            # ttl): the answer may be lost, so the holder could not know.
            record.expires_at = max(record.expires_at, now + ttl)
        record.token = self._new_token()
        record.lease_tokens.add(record.token)
        record.item = attrs.evolve(item, latest_heartbeat_at=now)
        self._processed(call)
        return HeartbeatResult(
            last_heartbeat=record.token,
            ttl_seconds=ttl,
            state=record.item.state,
            lease_extended=extended,
        )

    def _processed(self, call: Call) -> None:
        call.processed_at = trio.current_time()
        self._notify()

    def _expire(self, now: float) -> None:
        """Apply server-side lease expiry up to ``now`` (lazily, at each call)."""
        for work_id, record in self._records.items():
            if record.expires_at is None or now < record.expires_at:
                continue
            if record.item.state not in _LIVE:
                record.expires_at = None
                continue
            attempts = record.item.attempts + 1
            ended = record.expires_at
            stopping = record.item.state is WorkState.STOPPING
            record.token = None
            record.new_lease()
            record.expires_at = None
            record.delivered_at = None
            record.delivered_to = None
            final = stopping or attempts >= self._limit(record.item)
            expired = (
                Outcome(OutcomeStatus.CANCELLED, reason="lease expired after a stop request")
                if stopping
                else Outcome(OutcomeStatus.FAILED, reason="lease expired")
            )
            history = (
                *record.item.history,
                _attempt(record.item, expired, ended, None if final else now),
            )
            if final:
                record.item = attrs.evolve(
                    record.item,
                    state=WorkState.STOPPED,
                    attempts=attempts,
                    stopped_at=now,
                    outcome=expired,
                    dead=not stopping,
                    history=history,
                )
            else:
                record.item = attrs.evolve(
                    record.item,
                    state=WorkState.QUEUED,
                    attempts=attempts,
                    worker_id=None,
                    history=history,
                )
            self.expirations.append((work_id, now))
            self._notify()

    def _limit(self, item: WorkItem) -> int:
        """Attempts an item may lose: its retry policy's, else the plane's default."""
        return item.retry.max_attempts if item.retry is not None else self.max_attempts

    def _claimable(self, now: float, reclaim: float, labels: frozenset[str]) -> _Record | None:
        """The highest priority first, the oldest within one; never before ``not_before``;
        only items whose required labels the poller has."""
        best: _Record | None = None
        for record in self._records.values():  # insertion order is submit order
            item = record.item
            if item.state is not WorkState.QUEUED:
                continue
            if not labels.issuperset(item.labels):
                continue  # routing: the poller lacks a label the item requires
            if record.delivered_at is not None and now - record.delivered_at < reclaim:
                continue
            if item.not_before is not None and now < item.not_before:
                continue
            if best is None or item.priority > best.item.priority:
                best = record
        return best

    def _get(self, work_id: str) -> _Record:
        try:
            return self._records[work_id]
        except KeyError:
            raise NotFound(f"unknown work item {work_id}") from None

    def _live_record(self, work_id: str) -> _Record:
        self._expire(trio.current_time())
        return self._get(work_id)

    def _worker(self, worker_id: str) -> WorkerRecord:
        try:
            record = self._workers[worker_id]
        except KeyError:
            raise NotFound(f"unknown worker {worker_id}") from None
        # Aged on every read, like the store: silence turns into offline or failed.
        record = evaluate(record, now=trio.current_time(), policy=self.status_policy)
        self._workers[worker_id] = record
        return record

    def _new_token(self) -> str:
        return f"hb-{next(self._tokens)}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()
