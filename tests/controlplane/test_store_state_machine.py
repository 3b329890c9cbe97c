"""Hypothesis state machines on both stores, each checked against a small pure model.

Each machine runs on four planes: the SQLite store, the reference server over it
(through `HttpControlPlane`), the PostgreSQL store (a private schema per example, on
the caller's clock) and the reference server over that; with fewer examples on the
three slower planes, to keep the run short.

``WorkStoreMachine`` drives the item lifecycle (submit, poll, ack, heartbeats
with current and stale tokens, stop, request-stop, clock advances that expire
leases) and checks that the store agrees with the model after every step,
plus the safety invariants: lease intervals of one item never overlap (at
most one live lease), no item is ever lost, attempts only grow, a stale token
never succeeds.

``WorkerStatusMachine`` drives presence heartbeats (error rates, wedge flags),
registrations, deregistrations and clock advances, and compares every
worker's status with the DESIGN §4 table written out independently below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import attrs
import pytest
import trio
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    Conflict,
    FencingConflict,
    Gone,
    LeasePolicy,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    QueueFull,
    RetryPolicy,
    SQLiteStore,
    StatusPolicy,
    WorkerStatus,
    WorkState,
)
from supervisor.controlplane._embedded import EmbeddedControlPlane
from supervisor.controlplane._http import HttpControlPlane
from supervisor.controlplane._server import open_control_plane_server
from supervisor.controlplane._store import Store

ENV = "default"
WORKERS = ("w1", "w2", "w3")
TTL = 30.0
POLICY = LeasePolicy(default_ttl=60.0, max_attempts=3, reclaim_older_than_ms=20_000)
LIVE = ("starting", "active", "stopping")
#: Each worker's routing labels when it claims (``claim_and_lease``); ``poll`` draws any set.
WORKER_LABELS: Mapping[str, frozenset[str]] = {
    "w1": frozenset(),
    "w2": frozenset({"gpu"}),
    "w3": frozenset({"gpu", "repo:foo"}),
}
LABEL_SETS = [frozenset(s) for s in ((), ("gpu",), ("repo:foo",), ("gpu", "repo:foo"), ("cpu",))]
#: The retry policies items may be submitted with (step 10 s, doubling, capped at 25 s).
BACKOFF, BACKOFF_MAX, NON_RETRYABLE = 10.0, 25.0, 2
# max_examples comes from the loaded profile (tests/conftest.py), so HYPOTHESIS_PROFILE=thorough
# runs these machines harder.
MACHINE_SETTINGS = settings(stateful_step_count=40, deadline=None)
#: HTTP and PostgreSQL round trips cost more than SQLite's: fewer examples, the same steps.
POSTGRES_SETTINGS = settings(MACHINE_SETTINGS, max_examples=20)


def open_sqlite(
    stack: ExitStack, lease: LeasePolicy | None = None, status: StatusPolicy | None = None
) -> Store:
    directory = stack.enter_context(TemporaryDirectory())
    store = SQLiteStore(Path(directory) / "cp.sqlite3", lease_policy=lease, status_policy=status)
    stack.callback(store.close)
    return store


def open_postgres(
    stack: ExitStack, lease: LeasePolicy | None = None, status: StatusPolicy | None = None
) -> Store:
    from postgres_db import private_schema

    from supervisor.controlplane._store._postgres import PostgresStore

    url = stack.enter_context(private_schema())
    store = PostgresStore(url, lease_policy=lease, status_policy=status, time_source="caller")
    stack.callback(store.close)
    return store


class ServedStore:
    """The store's calls the machines make, sent over HTTP to the reference server over ``store``.

    The server and its `HttpControlPlane` client run in a Trio loop on a thread of
    their own; each call sets the server's clock to the ``now`` the machine passes,
    so the machine drives time exactly as it does on a bare store.
    """

    KEY = "state-machine-key-0123456789"

    def __init__(self, store: Store) -> None:
        self._store = store
        self._now = 0.0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the server did not start"

    async def _serve(self) -> None:
        def environment(environment_id: str) -> EmbeddedControlPlane:
            return EmbeddedControlPlane(
                self._store, environment_id=environment_id, clock=lambda: self._now
            )

        async with (
            open_control_plane_server(environment, key_provider=self.KEY) as url,
            HttpControlPlane.open(url, key=self.KEY) as cp,
        ):
            self.cp = cp
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def _call(self, now: float, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._now = now
        return trio.from_thread.run(partial(method, *args, **kwargs), trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    # The store's signatures (environment first, explicit ``now``) over the protocol's.
    def submit(self, env: str, prompt: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.submit, prompt, **kw)

    def poll(self, env: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.poll, **kw)

    def ack(self, env: str, work_id: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.ack, work_id, **kw)

    def heartbeat(self, env: str, work_id: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.heartbeat, work_id, **kw)

    def stop(self, env: str, work_id: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.stop, work_id, **kw)

    def requeue(self, env: str, work_id: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.requeue, work_id, **kw)

    def retry(self, env: str, work_id: str, *, now: float) -> Any:
        return self._call(now, self.cp.retry, work_id)

    def request_stop(self, env: str, work_id: str, *, now: float) -> Any:
        return self._call(now, self.cp.request_stop, work_id)

    def list_work(self, env: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.list_work, **kw)

    def stats(self, env: str, *, now: float) -> Any:
        return self._call(now, self.cp.stats)

    def register_worker(self, env: str, worker_id: str, *, now: float, **kw: Any) -> Any:
        return self._call(now, self.cp.register_worker, worker_id, **kw)

    def worker_heartbeat(self, env: str, report: PresenceReport, *, now: float) -> Any:
        return self._call(now, self.cp.worker_heartbeat, report)

    def get_worker(self, env: str, worker_id: str, *, now: float) -> Any:
        return self._call(now, self.cp.get_worker, worker_id)

    def list_workers(self, env: str, *, now: float) -> Any:
        return self._call(now, self.cp.list_workers)

    def deregister_worker(self, env: str, worker_id: str, *, now: float) -> Any:
        return self._call(now, self.cp.deregister_worker, worker_id)

    # Environment settings and the retention sweep are the store's owner's, not API calls.
    def configure_environment(self, env: str, changes: Any, *, now: float) -> Any:
        return self._store.configure_environment(env, changes, now=now)

    def purge(self, env: str, **kw: Any) -> Any:
        return self._store.purge(env, **kw)


def served(opener: Callable[..., Store]) -> Callable[..., Any]:
    """``opener``'s store behind the reference server, as the machines see a store."""

    def open_served(
        stack: ExitStack, lease: LeasePolicy | None = None, status: StatusPolicy | None = None
    ) -> ServedStore:
        plane = ServedStore(opener(stack, lease, status))
        stack.callback(plane.close)  # runs before the store's own close (LIFO)
        return plane

    return open_served


#: plane name -> how a machine opens its store there, and the examples it gets.
PLANES: Mapping[str, tuple[Callable[..., Any], settings]] = {
    "Sqlite": (open_sqlite, MACHINE_SETTINGS),
    "HttpSqlite": (served(open_sqlite), POSTGRES_SETTINGS),
    "Postgres": (open_postgres, POSTGRES_SETTINGS),
    "HttpPostgres": (served(open_postgres), POSTGRES_SETTINGS),
}


# --- the work-item model ----------------------------------------------------------------


@attrs.define
class ModelItem:
    id: str
    created: int  # submit order; the clock never goes back, so it is also age order
    state: str = "queued"
    attempts: int = 0
    worker: str | None = None
    delivered_at: float | None = None
    delivered_to: str | None = None
    token: str | None = None
    lease_until: float | None = None
    stale: set[str] = attrs.Factory(set)
    max_attempts: int | None = None  # the item's retry policy, if it has one
    not_before: float | None = None
    dead: bool = False
    history: int = 0
    priority: int = 0
    stopped_at: float | None = None
    labels: frozenset[str] = frozenset()

    @property
    def limit(self) -> int:
        return self.max_attempts or POLICY.max_attempts

    def current_token(self) -> str | None:
        """The token the holder would send now, if there is a holder."""
        if self.token is not None:
            return self.token
        if self.state in ("starting", "stopping"):
            return NO_HEARTBEAT
        return None


def model_expire(items: list[ModelItem], now: float) -> None:
    for item in items:
        if item.state in LIVE and item.lease_until is not None and item.lease_until <= now:
            ended = item.lease_until
            item.attempts += 1
            if item.token is not None:
                item.stale.add(item.token)
            item.token = None
            item.lease_until = None
            # an expiry ends an attempt: it is kept in the history like a stop
            item.history += 1
            if item.state == "stopping" or item.attempts >= item.limit:
                item.dead = item.state != "stopping"
                item.state = "stopped"
                item.stopped_at = ended
            else:
                item.state = "queued"
                item.worker = None
                item.delivered_at = None
                item.delivered_to = None


class WorkStoreMachine(RuleBasedStateMachine):
    open_store = staticmethod(open_sqlite)

    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self.store = self.open_store(self._stack, POLICY)
        self.now = 1_000_000.0
        self.items: list[ModelItem] = []
        self.keys: dict[str, str] = {}  # idempotency key -> the item it names
        self.seen_attempts: dict[str, int] = {}
        # item id -> worker -> end of the lease that worker was granted (the safety check)
        self.leases: dict[str, dict[str, float]] = {}
        self.serial = 0  # submit order (items may be purged, so not len(items))
        self.cap: int | None = None  # the environment's max_queue_depth

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def queue_full(self) -> bool:
        """Whether the model expects the next new submit to be refused (backpressure)."""
        self.expire()
        return self.cap is not None and sum(i.state == "queued" for i in self.items) >= self.cap

    def teardown(self) -> None:
        self._stack.close()

    def pick(self, index: int) -> ModelItem:
        return self.items[index % len(self.items)]

    def expire(self) -> None:
        model_expire(self.items, self.now)

    def granted(self, item: ModelItem, worker: str, until: float) -> None:
        holders = self.leases.setdefault(item.id, {})
        for other, end in holders.items():
            assert other == worker or end <= self.now, (
                f"{item.id}: {worker} got a lease while {other}'s ran until {end} (now {self.now})"
            )
        holders[worker] = until

    # --- rules ----------------------------------------------------------------------

    @initialize()
    def first_item(self) -> None:
        self.submit()

    @rule()
    def submit(self) -> None:
        if self.queue_full():
            with pytest.raises(QueueFull):
                self.store.submit(ENV, "one too many", now=self.now)
            return
        stored = self.store.submit(ENV, f"prompt {len(self.items)}", now=self.now)
        assert stored.state is WorkState.QUEUED
        self.items.append(ModelItem(id=stored.id, created=self.next_serial()))

    @rule(max_attempts=st.integers(1, 3))
    def submit_with_retry(self, max_attempts: int) -> None:
        policy = RetryPolicy(
            max_attempts=max_attempts,
            backoff=BACKOFF,
            backoff_max=BACKOFF_MAX,
            non_retryable_exit_codes=(NON_RETRYABLE,),
        )
        if self.queue_full():
            with pytest.raises(QueueFull):
                self.store.submit(ENV, "one too many", now=self.now, retry=policy)
            return
        stored = self.store.submit(ENV, f"prompt {len(self.items)}", now=self.now, retry=policy)
        assert stored.retry == policy
        self.items.append(
            ModelItem(id=stored.id, created=self.next_serial(), max_attempts=max_attempts)
        )

    @rule(priority=st.integers(-2, 2), delay=st.sampled_from([None, 0.0, 10.0, 45.0]))
    def submit_with_priority_and_delay(self, priority: int, delay: float | None) -> None:
        if self.queue_full():
            with pytest.raises(QueueFull):
                self.store.submit(ENV, "one too many", now=self.now, priority=priority)
            return
        stored = self.store.submit(
            ENV, f"prompt {len(self.items)}", now=self.now, priority=priority, delay=delay
        )
        assert stored.priority == priority
        not_before = None if delay is None else self.now + delay
        assert stored.not_before == (
            None if not_before is None else pytest.approx(not_before, abs=1e-3)
        )
        self.items.append(
            ModelItem(
                id=stored.id, created=self.next_serial(), priority=priority, not_before=not_before
            )
        )

    @rule(key=st.sampled_from(["k1", "k2", "k3"]))
    def submit_with_key(self, key: str) -> None:
        """A keyed submit: a key already used returns its item and queues nothing.

        Even on a full queue: the answer names an item that exists, nothing is added.
        """
        first = self.keys.get(key)
        if first is None and self.queue_full():
            with pytest.raises(QueueFull):
                self.store.submit(ENV, "one too many", now=self.now, key=key)
            return
        stored = self.store.submit(ENV, f"prompt {len(self.items)}", now=self.now, key=key)
        if first is not None:
            assert (stored.id, stored.duplicate) == (first, True)
            return
        assert not stored.duplicate and stored.key == key
        self.keys[key] = stored.id
        self.items.append(ModelItem(id=stored.id, created=self.next_serial()))

    @rule(
        labels=st.sampled_from(LABEL_SETS[1:]),
        priority=st.integers(-1, 1),
        timeout=st.sampled_from([None, 1.5, 600.0]),
    )
    def submit_with_labels(
        self, labels: frozenset[str], priority: int, timeout: float | None
    ) -> None:
        """An item only a worker with every one of ``labels`` may claim."""
        if self.queue_full():
            with pytest.raises(QueueFull):
                self.store.submit(ENV, "one too many", now=self.now, labels=sorted(labels))
            return
        stored = self.store.submit(
            ENV,
            f"prompt {len(self.items)}",
            now=self.now,
            labels=sorted(labels, reverse=True),
            priority=priority,
            timeout=timeout,
        )
        assert (stored.labels, stored.timeout) == (tuple(sorted(labels)), timeout)
        self.items.append(
            ModelItem(id=stored.id, created=self.next_serial(), priority=priority, labels=labels)
        )

    @rule(worker=st.sampled_from(WORKERS), labels=st.sampled_from(LABEL_SETS))
    def poll(self, worker: str, labels: frozenset[str]) -> None:
        self.expire()
        cutoff = self.now - POLICY.reclaim_older_than_ms / 1000
        claimable = [
            i
            for i in self.items
            if i.state == "queued"
            and (i.delivered_at is None or i.delivered_at <= cutoff)
            and (i.not_before is None or i.not_before <= self.now)
            and i.labels <= labels  # routing: the poller has every label the item requires
        ]
        # The highest priority first, then the oldest.
        expected = min(claimable, key=lambda i: (-i.priority, i.created)) if claimable else None
        got = self.store.poll(ENV, worker_id=worker, now=self.now, labels=sorted(labels))
        if expected is None:
            assert got is None
            return
        assert got is not None
        assert got.id == expected.id
        assert got.secret
        assert frozenset(got.labels) == expected.labels
        expected.delivered_at = self.now
        expected.delivered_to = worker

    def _ack(self, item: ModelItem, worker: str) -> None:
        self.expire()
        if item.state == "queued" and item.delivered_to == worker:
            got = self.store.ack(ENV, item.id, worker_id=worker, now=self.now)
            assert (got.state, got.worker_id) == (WorkState.STARTING, worker)
            item.state = "starting"
            item.worker = worker
            item.lease_until = self.now + POLICY.default_ttl
        else:
            with pytest.raises(Conflict):
                self.store.ack(ENV, item.id, worker_id=worker, now=self.now)

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100), worker=st.sampled_from(WORKERS))
    def ack_any(self, index: int, worker: str) -> None:
        """An ack from any worker: only the one the item was handed to succeeds."""
        self._ack(self.pick(index), worker)

    @precondition(lambda self: any(i.delivered_to for i in self.items))
    @rule(index=st.integers(0, 100))
    def ack_handed_out(self, index: int) -> None:
        """The common case: the poller acks what it was given (it may have expired meanwhile)."""
        candidates = [i for i in self.items if i.delivered_to]
        item = candidates[index % len(candidates)]
        assert item.delivered_to is not None
        self._ack(item, item.delivered_to)

    @rule(worker=st.sampled_from(WORKERS))
    def claim_and_lease(self, worker: str) -> None:
        """What a worker does: poll, ack, first heartbeat, in one step."""
        before = {i.id for i in self.items if i.delivered_to == worker and i.state == "queued"}
        self.poll(worker, WORKER_LABELS[worker])
        mine = [i for i in self.items if i.delivered_to == worker and i.state == "queued"]
        fresh = [i for i in mine if i.id not in before] or mine
        if not fresh:
            return
        item = max(fresh, key=lambda i: i.delivered_at or 0.0)
        self._ack(item, worker)
        if item.state == "starting":
            self.heartbeat_with_current_token(self.items.index(item))

    @precondition(lambda self: hasattr(self.store, "claim_leased"))  # in-process stores only
    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 3))
    def claim_leased(self, worker: str, limit: int) -> None:
        """What a worker on an in-process store does: claim a batch with each first lease."""
        self.expire()
        labels = WORKER_LABELS[worker]
        cutoff = self.now - POLICY.reclaim_older_than_ms / 1000
        claimable = sorted(
            (
                i
                for i in self.items
                if i.state == "queued"
                and (i.delivered_at is None or i.delivered_at <= cutoff)
                and (i.not_before is None or i.not_before <= self.now)
                and i.labels <= labels
            ),
            key=lambda i: (-i.priority, i.created),
        )[:limit]
        got = self.store.claim_leased(
            ENV,
            worker_id=worker,
            limit=limit,
            now=self.now,
            labels=sorted(labels),
            desired_ttl_seconds=TTL,
        )
        assert [item.id for item, _ in got] == [i.id for i in claimable]
        for (stored, beat), item in zip(got, claimable, strict=True):
            assert (stored.state, stored.worker_id) == (WorkState.ACTIVE, worker)
            assert stored.secret
            assert (beat.state, beat.lease_extended, beat.ttl_seconds) == (
                WorkState.ACTIVE,
                True,
                TTL,
            )
            assert beat.last_heartbeat not in item.stale
            item.delivered_at = self.now
            item.delivered_to = worker
            item.worker = worker
            item.state = "active"
            item.token = beat.last_heartbeat
            item.lease_until = self.now + TTL
            self.granted(item, worker, item.lease_until)

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100))
    def heartbeat_with_current_token(self, index: int) -> None:
        item = self.pick(index)
        self.expire()
        token = item.current_token()
        if token is None:
            return
        beat = self.store.heartbeat(
            ENV, item.id, expected_last_heartbeat=token, now=self.now, desired_ttl_seconds=TTL
        )
        assert beat.last_heartbeat != token
        assert beat.last_heartbeat not in item.stale
        if token != NO_HEARTBEAT:  # a sentinel, not a token: every new lease starts with it
            item.stale.add(token)
        item.token = beat.last_heartbeat
        if item.state == "stopped":
            assert (beat.state, beat.lease_extended) == (WorkState.STOPPED, False)
            return
        if item.state == "starting":
            item.state = "active"
        assert beat.state == item.state
        assert beat.lease_extended
        assert beat.ttl_seconds == TTL
        item.lease_until = self.now + TTL
        assert item.worker is not None
        self.granted(item, item.worker, item.lease_until)

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100))
    def first_heartbeat_blindly(self, index: int) -> None:
        """NO_HEARTBEAT on any item: accepted only on an acked item without a token."""
        item = self.pick(index)
        self.expire()
        if item.current_token() == NO_HEARTBEAT:
            self.heartbeat_with_current_token(index)
            return
        error = Conflict if item.state == "queued" else FencingConflict
        with pytest.raises(error):
            self.store.heartbeat(ENV, item.id, expected_last_heartbeat=NO_HEARTBEAT, now=self.now)

    @precondition(lambda self: any(i.stale for i in self.items))
    @rule(index=st.integers(0, 100), data=st.data())
    def heartbeat_with_stale_token(self, index: int, data: st.DataObject) -> None:
        candidates = [i for i in self.items if i.stale]
        item = candidates[index % len(candidates)]
        token = data.draw(st.sampled_from(sorted(item.stale)))
        self.expire()
        with pytest.raises(FencingConflict):
            self.store.heartbeat(ENV, item.id, expected_last_heartbeat=token, now=self.now)

    @precondition(lambda self: any(i.stale for i in self.items))
    @rule(index=st.integers(0, 100), data=st.data())
    def stop_with_stale_token(self, index: int, data: st.DataObject) -> None:
        candidates = [i for i in self.items if i.stale]
        item = candidates[index % len(candidates)]
        token = data.draw(st.sampled_from(sorted(item.stale)))
        self.expire()
        with pytest.raises(FencingConflict):
            self.store.stop(ENV, item.id, expected_last_heartbeat=token, now=self.now)

    @precondition(lambda self: self.items)
    @rule(
        index=st.integers(0, 100),
        with_token=st.booleans(),
        outcome=st.sampled_from(
            [
                Outcome(OutcomeStatus.COMPLETED),
                Outcome(OutcomeStatus.FAILED, exit_code=1),
                Outcome(OutcomeStatus.FAILED, exit_code=NON_RETRYABLE),
                Outcome(OutcomeStatus.CANCELLED),
            ]
        ),
    )
    def stop(self, index: int, with_token: bool, outcome: Outcome) -> None:
        """A stop with an outcome; a retryable failure of a running attempt comes back later."""
        item = self.pick(index)
        self.expire()
        token = item.current_token() if with_token else None
        if with_token and token is None:
            return
        if item.state == "stopped":
            with pytest.raises(Conflict):
                self.store.stop(
                    ENV, item.id, expected_last_heartbeat=token, outcome=outcome, now=self.now
                )
            return
        got = self.store.stop(
            ENV, item.id, expected_last_heartbeat=token, outcome=outcome, now=self.now
        )
        item.history += 1
        if item.worker is not None and item.state in LIVE:  # the holder's lease ends here
            self.leases.setdefault(item.id, {})[item.worker] = self.now
        failed = (
            outcome.status is OutcomeStatus.FAILED
            and item.state in ("starting", "active")
            and item.max_attempts is not None
            and outcome.exit_code != NON_RETRYABLE
        )
        if failed:
            item.attempts += 1
        if failed and item.attempts < item.limit:
            step = min(BACKOFF_MAX, BACKOFF * 2 ** (item.attempts - 1))
            assert got.not_before is not None
            assert self.now + step / 2 - 1e-3 <= got.not_before <= self.now + step + 1e-3
            assert (got.state, got.outcome) == (WorkState.QUEUED, None)
            if item.token is not None:
                item.stale.add(item.token)
            item.token = None
            item.state = "queued"
            item.worker = None
            item.delivered_at = None
            item.delivered_to = None
            item.not_before = got.not_before
            item.lease_until = None
            return
        assert (got.state, got.outcome) == (WorkState.STOPPED, outcome)
        item.state = "stopped"
        item.stopped_at = self.now
        item.dead = failed
        item.lease_until = None

    @precondition(lambda self: any(i.state in ("starting", "active") for i in self.items))
    @rule(index=st.integers(0, 100))
    def fail_a_running_attempt(self, index: int) -> None:
        """The holder reports a failed session: the case the retry policy is for."""
        running = [i for i in self.items if i.state in ("starting", "active")]
        item = running[index % len(running)]
        self.stop(self.items.index(item), True, Outcome(OutcomeStatus.FAILED, exit_code=1))

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100))
    def retry(self, index: int) -> None:
        """An operator puts an item back: only a stopped one, with fresh attempts."""
        item = self.pick(index)
        self.expire()
        if item.state != "stopped":
            with pytest.raises(Conflict):
                self.store.retry(ENV, item.id, now=self.now)
            return
        got = self.store.retry(ENV, item.id, now=self.now)
        assert (got.state, got.attempts, got.dead, got.not_before) == (
            WorkState.QUEUED,
            0,
            False,
            None,
        )
        if item.token is not None:
            item.stale.add(item.token)
        item.token = None
        item.state = "queued"
        item.attempts = 0
        item.worker = None
        item.delivered_at = None
        item.delivered_to = None
        item.not_before = None
        item.dead = False
        item.lease_until = None
        item.stopped_at = None
        self.seen_attempts[item.id] = 0

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100))
    def requeue(self, index: int) -> None:
        """The holder gives the item back (a wedged session): queued again, or stopped."""
        item = self.pick(index)
        self.expire()
        token = item.current_token()
        outcome = Outcome(OutcomeStatus.WEDGED, reason="wedged")
        if item.state == "stopped":
            with pytest.raises(Conflict):
                self.store.requeue(
                    ENV, item.id, expected_last_heartbeat=token or NO_HEARTBEAT, now=self.now
                )
            return
        if token is None:  # queued: nobody holds it
            with pytest.raises(FencingConflict):
                self.store.requeue(ENV, item.id, expected_last_heartbeat=NO_HEARTBEAT, now=self.now)
            return
        got = self.store.requeue(
            ENV, item.id, expected_last_heartbeat=token, outcome=outcome, now=self.now
        )
        item.attempts += 1
        item.history += 1  # the given-back attempt is kept in the history
        item.lease_until = None
        if item.worker is not None:  # the holder's lease ends here, not at its expiry
            self.leases.setdefault(item.id, {})[item.worker] = self.now
        if item.state == "stopping" or item.attempts >= item.limit:
            # like stop: the holder's token survives (its next beat answers "stopped")
            item.dead = item.state != "stopping"
            item.state = "stopped"
            item.stopped_at = self.now
            assert got.outcome == outcome
        else:
            if item.token is not None:
                item.stale.add(item.token)
            item.token = None
            item.state = "queued"
            item.worker = None
            item.delivered_at = None
            item.delivered_to = None
            assert got.outcome is None
        assert (got.state, got.attempts) == (item.state, item.attempts)

    @precondition(lambda self: any(i.stale for i in self.items))
    @rule(index=st.integers(0, 100), data=st.data())
    def requeue_with_stale_token(self, index: int, data: st.DataObject) -> None:
        candidates = [i for i in self.items if i.stale]
        item = candidates[index % len(candidates)]
        token = data.draw(st.sampled_from(sorted(item.stale)))
        self.expire()
        error = Conflict if item.state == "stopped" else FencingConflict
        with pytest.raises(error):
            self.store.requeue(ENV, item.id, expected_last_heartbeat=token, now=self.now)

    @precondition(lambda self: self.items)
    @rule(index=st.integers(0, 100))
    def request_stop(self, index: int) -> None:
        item = self.pick(index)
        self.expire()
        if item.state == "stopped":
            with pytest.raises(Conflict):
                self.store.request_stop(ENV, item.id, now=self.now)
            return
        got = self.store.request_stop(ENV, item.id, now=self.now)
        if item.state == "queued":
            item.stopped_at = self.now
        item.state = "stopped" if item.state == "queued" else "stopping"
        assert got.state == item.state

    @rule(cap=st.sampled_from([None, 1, 2, 3]))
    def set_queue_cap(self, cap: int | None) -> None:
        """The environment's max_queue_depth changes (queued items above it stay)."""
        settings = self.store.configure_environment(ENV, {"max_queue_depth": cap}, now=self.now)
        assert settings.max_queue_depth == cap
        self.cap = cap

    @rule(age=st.sampled_from([0.0, 5.0, 30.0, 60.0]), limit=st.integers(1, 3))
    def purge(self, age: float, limit: int) -> None:
        """Retention: at most ``limit`` stopped items that ended before ``now - age`` go.

        Never a live item; the oldest first; their keys are free again.
        """
        self.expire()
        older_than = self.now - age
        due = sorted(
            (
                i
                for i in self.items
                if i.state == "stopped" and i.stopped_at is not None and i.stopped_at < older_than
            ),
            key=lambda i: i.stopped_at or 0.0,
        )
        deleted = self.store.purge(ENV, older_than=older_than, limit=limit, now=self.now)
        assert deleted == min(limit, len(due))
        left = {i.id for i in self.store.list_work(ENV, now=self.now, limit=1000)}
        gone = {i.id for i in self.items} - left
        assert len(gone) == deleted
        assert gone <= {i.id for i in due}, "only stopped items past retention are purged"
        if deleted:  # the oldest go first (items that stopped at the same time in any order)
            assert max(i.stopped_at or 0.0 for i in due if i.id in gone) <= min(
                (i.stopped_at or 0.0 for i in due if i.id not in gone), default=float("inf")
            )
        self.items = [i for i in self.items if i.id not in gone]
        self.keys = {k: v for k, v in self.keys.items() if v not in gone}

    @rule(seconds=st.sampled_from([0.0, 0.5, 5.0, 19.5, 20.0, 29.5, 30.0, 31.0, 60.0, 75.0]))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        self.expire()
        stored = {i.id: i for i in self.store.list_work(ENV, now=self.now, limit=1000)}
        # no item is ever lost
        assert set(stored) == {i.id for i in self.items}
        for item in self.items:
            got = stored[item.id]
            assert got.state == item.state, item
            assert got.attempts == item.attempts, item
            assert got.dead == item.dead, item
            assert len(got.history) == item.history, item
            if item.state == "queued":
                assert got.not_before == (
                    None if item.not_before is None else pytest.approx(item.not_before, abs=1e-3)
                ), item
            if item.state in LIVE:
                assert got.worker_id == item.worker
            # attempts only grow
            assert got.attempts >= self.seen_attempts.get(item.id, 0)
            self.seen_attempts[item.id] = got.attempts
            assert got.attempts <= item.limit
        dead = {i.id for i in self.store.list_work(ENV, now=self.now, limit=1000, dead=True)}
        assert dead == {i.id for i in self.items if i.dead}

    @invariant()
    def stats_agree_with_the_model(self) -> None:
        self.expire()
        stats = self.store.stats(ENV, now=self.now)
        assert stats.depth == sum(i.state == "queued" for i in self.items)
        assert stats.pending == sum(i.state in LIVE for i in self.items)


def _on_every_plane(machine: type[RuleBasedStateMachine], name: str) -> None:
    """Define ``Test<Plane><name>`` in this module for each plane of `PLANES`."""
    for plane, (opener, plane_settings) in PLANES.items():
        variant: type[RuleBasedStateMachine] = type(
            f"{plane}{machine.__name__}", (machine,), {"open_store": staticmethod(opener)}
        )
        case = variant.TestCase
        case.settings = plane_settings
        case.__name__ = case.__qualname__ = f"Test{plane}{name}"
        globals()[case.__name__] = case


_on_every_plane(WorkStoreMachine, "WorkStore")


# --- the worker status model: the DESIGN §4 table, written out row by row ---------------

STATUS = StatusPolicy()


@attrs.define
class ModelWorker:
    status: WorkerStatus
    registered_at: float
    last_beat: float | None = None


def table_on_clock(w: ModelWorker, now: float) -> WorkerStatus:
    """The rows that fire on silence: provisioning -> failed, online/degraded -> offline."""
    s = w.status
    silent_since_registration = now - w.registered_at
    if s == WorkerStatus.PROVISIONING and w.last_beat is None:
        return (
            WorkerStatus.FAILED
            if silent_since_registration >= STATUS.provision_timeout
            else WorkerStatus.PROVISIONING
        )
    if s in (WorkerStatus.ONLINE, WorkerStatus.DEGRADED):
        last = w.last_beat if w.last_beat is not None else w.registered_at
        if now - last >= STATUS.offline_after:
            return WorkerStatus.OFFLINE
    return s


def table_on_heartbeat(
    s: WorkerStatus, error_rate: float, runtime_state: str | None
) -> WorkerStatus:
    """The rows that fire on a heartbeat."""
    if s == WorkerStatus.DEGRADED:
        if error_rate < 0.1 and not runtime_state:
            return WorkerStatus.ONLINE  # degraded -> online: rate below 0.1 *and* state cleared
        return WorkerStatus.DEGRADED
    if runtime_state == "wedged" or error_rate >= 0.5:
        return WorkerStatus.DEGRADED  # online -> degraded (and a revived worker judged afresh)
    return WorkerStatus.ONLINE  # provisioning/offline/failed -> online; online stays


RATES = st.sampled_from([0.0, 0.05, 0.099, 0.1, 0.2, 0.3, 0.49, 0.5, 0.51, 0.9, 1.0])
# Any runtime_state keeps a degraded worker degraded; only "wedged" degrades an online one.
RUNTIME_STATES = st.sampled_from([None, "wedged", "starting"])
SILENCES = st.sampled_from([0.0, 1.0, 29.0, 30.0, 60.0, 89.5, 90.0, 91.0, 200.0, 299.5, 300.0])


class WorkerStatusMachine(RuleBasedStateMachine):
    open_store = staticmethod(open_sqlite)

    def __init__(self) -> None:
        super().__init__()
        self._stack = ExitStack()
        self.store = self.open_store(self._stack, None, STATUS)
        self.now = 5_000_000.0
        self.workers: dict[str, ModelWorker] = {}

    def teardown(self) -> None:
        self._stack.close()

    def age(self) -> None:
        for w in self.workers.values():
            if w.status != WorkerStatus.REMOVED:
                w.status = table_on_clock(w, self.now)

    @rule(worker=st.sampled_from(WORKERS))
    def register(self, worker: str) -> None:
        self.age()
        known = self.workers.get(worker)
        if known is not None and known.status == WorkerStatus.REMOVED:
            with pytest.raises(Gone):
                self.store.register_worker(ENV, worker, now=self.now)
            return
        got = self.store.register_worker(ENV, worker, now=self.now)
        if known is None or known.status == WorkerStatus.FAILED:
            self.workers[worker] = ModelWorker(WorkerStatus.PROVISIONING, self.now)
        assert got.status == self.workers[worker].status

    @rule(worker=st.sampled_from(WORKERS), error_rate=RATES, runtime_state=RUNTIME_STATES)
    def heartbeat(self, worker: str, error_rate: float, runtime_state: str | None) -> None:
        self.age()
        report = PresenceReport(
            worker_id=worker, error_rate=error_rate, runtime_state=runtime_state
        )
        known = self.workers.get(worker)
        if known is not None and known.status == WorkerStatus.REMOVED:
            with pytest.raises(Gone):
                self.store.worker_heartbeat(ENV, report, now=self.now)
            return
        if known is None:
            known = self.workers[worker] = ModelWorker(WorkerStatus.PROVISIONING, self.now)
        known.status = table_on_heartbeat(known.status, error_rate, runtime_state)
        known.last_beat = self.now
        got = self.store.worker_heartbeat(ENV, report, now=self.now)
        assert got.status == known.status

    @rule(worker=st.sampled_from(WORKERS))
    def deregister(self, worker: str) -> None:
        if worker not in self.workers:
            return
        got = self.store.deregister_worker(ENV, worker, now=self.now)
        assert got.status is WorkerStatus.REMOVED
        self.workers[worker].status = WorkerStatus.REMOVED

    @rule(seconds=SILENCES)
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @rule(error_rate=st.floats(-1.0, 2.0).filter(lambda r: not 0.0 <= r <= 1.0))
    def impossible_report_is_refused(self, error_rate: float) -> None:
        with pytest.raises(BadRequest):
            self.store.worker_heartbeat(
                ENV, PresenceReport(worker_id="w1", error_rate=error_rate), now=self.now
            )

    @invariant()
    def every_status_follows_the_table(self) -> None:
        self.age()
        stored = {w.worker_id: w.status for w in self.store.list_workers(ENV, now=self.now)}
        assert stored == {name: w.status for name, w in self.workers.items()}
        for name, w in self.workers.items():
            assert self.store.get_worker(ENV, name, now=self.now).status == w.status


_on_every_plane(WorkerStatusMachine, "WorkerStatus")
