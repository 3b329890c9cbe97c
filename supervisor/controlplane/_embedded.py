"""The embedded control plane: the `ControlPlane` protocol over a local `SQLiteStore`.

This is what ``python -m supervisor`` uses with no configuration: the store
lives in the state directory, so ``python -m supervisor submit`` from another
process queues work for a running worker through the same file.

Time: the store never reads a clock. This wrapper reads ``clock`` (wall-clock
POSIX seconds, `time.time` by default) in the Trio thread at the start of
each call and passes the value down, so tests can drive lease expiry and
worker ageing with a plain mutable clock.

Threads: with ``threaded=True`` (the default) store calls run in a thread of
their own (a `~supervisor._lane.ThreadLane`), so a slow disk or another
process's write lock never stalls the event loop. The store serialises its
one connection anyway, so one thread loses nothing, and it is much cheaper per
call than ``trio.to_thread`` (results come back to Trio in batches). A store
call is short and bounded by the store's busy timeout, so once running it is
not abandoned on cancellation: a cancelled caller waits for it to finish, and
the cancellation is delivered at the next checkpoint; a call still queued is
dropped.

Under ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock``) use ``threaded=False``: the mock clock jumps ahead whenever
every task is blocked, and a task waiting for a worker thread counts as
blocked, so timeouts elsewhere in the test would fire while a store call is in
flight. With ``threaded=False`` the store is called directly in the Trio thread
(after a checkpoint), which keeps the run deterministic; SQLite calls on a
local file take microseconds, which is fine for tests and small tools.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import trio

from .._base._lane import ThreadLane
from ._exceptions import BadRequest, ControlPlaneError
from ._models import (
    Delegation,
    DelegationStatus,
    EnvironmentSettings,
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
from ._protocol import LeasedClaim
from ._status import StatusPolicy
from ._store import DEFAULT_ENVIRONMENT_ID, LeasePolicy, SQLiteStore, Store
from ._store._common import check_labels
from ._text import check_text

if TYPE_CHECKING:
    from ._protocol import ControlPlane

__all__ = [
    "STORE_FILENAME",
    "EmbeddedControlPlane",
    "open_embedded_control_plane",
]

#: The store's file name inside a state directory.
STORE_FILENAME = "controlplane.sqlite3"

#: The longest long-poll accepted, in milliseconds.
MAX_BLOCK_MS = 60_000

_P = ParamSpec("_P")
_T = TypeVar("_T")


class EmbeddedControlPlane:
    """A `ControlPlane` backed by a SQLite file on this machine.

    Args:
        path_or_store: the database file (opened, and closed by `aclose`), or an
            open store (`SQLiteStore`, ``PostgresStore``) to share (left open by `aclose`; its owner
            closes it). Opening a path reads the file synchronously, once.
        environment_id: the environment every call works in.
        clock: returns wall-clock POSIX seconds; read in the Trio thread.
        threaded: run store calls in worker threads (see the module notes on
            ``MockClock``).
        poll_interval: how often a long poll re-checks the store, in seconds. A
            submit through the same store object wakes pollers at once; this
            bounds how late they see a submit made by another process.
        lease_policy: passed to a store opened from a path.
        status_policy: passed to a store opened from a path.

    Raises:
        ControlPlaneError: the file cannot be opened as a control-plane store.
        ValueError: policies given together with an already-open store.
    """

    def __init__(
        self,
        path_or_store: str | os.PathLike[str] | Store,
        *,
        environment_id: str = DEFAULT_ENVIRONMENT_ID,
        clock: Callable[[], float] = time.time,
        threaded: bool = True,
        poll_interval: float = 0.25,
        lease_policy: LeasePolicy | None = None,
        status_policy: StatusPolicy | None = None,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if isinstance(path_or_store, Store):
            if lease_policy is not None or status_policy is not None:
                raise ValueError("policies belong to the store: pass them when opening it")
            self._store = path_or_store
            self._owns_store = False
        else:
            self._store = SQLiteStore(
                path_or_store, lease_policy=lease_policy, status_policy=status_policy
            )
            self._owns_store = True
        self._environment_id = environment_id
        self._clock = clock
        self._threaded = threaded
        self._poll_interval = poll_interval
        self._lane = ThreadLane("supervisor-store")
        self._submitted = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self._store.add_submit_listener(self._on_submit)

    def __repr__(self) -> str:
        return (
            f"<EmbeddedControlPlane {self._store.path!r} environment={self._environment_id!r}"
            f"{' closed' if self._closed else ''}>"
        )

    @property
    def environment_id(self) -> str:
        return self._environment_id

    @property
    def store(self) -> Store:
        """The store underneath (for a server to share, or for inspection)."""
        return self._store

    async def __aenter__(self) -> EmbeddedControlPlane:
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- plumbing --------------------------------------------------------------

    async def _run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise ControlPlaneError("the embedded control plane is closed")
        # Every entry point passes here: nothing that UTF-8 cannot encode is
        # ever written (it would make every later read of it fail).
        check_text(args, "an argument")
        check_text(kwargs, "the arguments")
        if self._trio_token is None:
            self._trio_token = trio.lowlevel.current_trio_token()
        call = functools.partial(fn, *args, **kwargs)
        if self._threaded:
            return await self._lane.run(call)
        await trio.lowlevel.checkpoint()
        return call()

    def _on_submit(self, environment_id: str) -> None:
        # Runs in whichever thread submitted; run_sync_soon is the thread-safe
        # way back into our Trio run (and is fine from the Trio thread too).
        token = self._trio_token
        if environment_id != self._environment_id or token is None or self._closed:
            return
        try:
            token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            pass

    def _wake(self) -> None:
        event, self._submitted = self._submitted, trio.Event()
        event.set()

    # --- work ------------------------------------------------------------------

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
        return await self._run(
            self._store.submit,
            self._environment_id,
            prompt,
            now=self._clock(),
            session_id=session_id,
            metadata=metadata,
            retry=retry,
            priority=priority,
            delay=delay,
            not_before=not_before,
            key=key,
            labels=labels,
            timeout=timeout,
        )

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        """Claim the oldest claimable item, waiting up to ``block_ms`` for one.

        While waiting, the store is re-checked every ``poll_interval`` and at
        once after a submit through the same store object; the wait never
        exceeds ``block_ms`` (measured on Trio's clock).

        Raises:
            BadRequest: ``block_ms`` outside 0-60000.
        """
        _check_block_ms(block_ms)
        wanted = check_labels(labels)
        return await self._long_poll(
            block_ms,
            self._store.poll,
            None,
            worker_id=worker_id,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=wanted,
        )

    async def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[WorkItem]:
        """Poll and acknowledge up to ``limit`` items at once (see `SQLiteStore.claim`).

        Waits like `poll` (up to ``block_ms``) while nothing is claimable; the
        list is empty only when the wait ran out. The items come back
        ``starting`` and bound to ``worker_id``, each with its session secret.

        Only an in-process plane offers this: the claim commits or fails in
        this process, so no answer can be lost between a commit and its caller
        (over HTTP a lost answer would strand a whole batch until its ack lease
        ran out, so the HTTP client keeps to ``poll`` and ``ack``).

        Raises:
            BadRequest: ``block_ms`` outside 0-60000, ``limit`` outside 1-100.
        """
        _check_block_ms(block_ms)
        wanted = check_labels(labels)
        return await self._long_poll(
            block_ms,
            self._store.claim,
            [],
            worker_id=worker_id,
            limit=limit,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=wanted,
        )

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
        """`claim`, each item's first heartbeat included (see `SQLiteStore.claim_leased`).

        Each item comes back ``active``, with the answer its first heartbeat
        would have had (its fencing token and ttl) and the Trio time at which
        the look that granted it was asked for. Waits like `claim`.

        Raises:
            BadRequest: as for `claim`, or a non-positive or non-finite TTL.
        """
        _check_block_ms(block_ms)
        wanted = check_labels(labels)
        asked_at: list[float] = []
        nothing: list[tuple[WorkItem, HeartbeatResult]] = []
        found = await self._long_poll(
            block_ms,
            self._store.claim_leased,
            nothing,
            asked_at=asked_at,
            worker_id=worker_id,
            limit=limit,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=wanted,
            desired_ttl_seconds=desired_ttl_seconds,
        )
        return [LeasedClaim(item, heartbeat, asked_at[-1]) for item, heartbeat in found]

    async def _long_poll(
        self,
        block_ms: int,
        look: Callable[..., _T],
        empty: _T,
        *,
        asked_at: list[float] | None = None,
        **kwargs: object,
    ) -> _T:
        """``look(environment, now=..., **kwargs)`` until it finds work, for up to ``block_ms``.

        Each look goes through `_run`, so its arguments get the same checks as
        every other store call.

        Found means anything but ``None`` or an empty list; when the wait runs out
        the answer is ``empty``. The store is looked at again every
        ``poll_interval``, and at once after a submit through the same store
        object; the wait never exceeds ``block_ms`` (on Trio's clock). The Trio
        time each look is asked for is appended to ``asked_at``.
        """
        deadline = trio.current_time() + block_ms / 1000.0
        while True:
            # Take the wake-up event *before* looking, so a submit that lands
            # between the look and the wait is not missed.
            wake = self._submitted
            if asked_at is not None:
                asked_at.append(trio.current_time())
            found = await self._run(look, self._environment_id, now=self._clock(), **kwargs)
            if found:
                return found
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return empty
            with trio.move_on_after(min(self._poll_interval, remaining)):
                await wake.wait()

    async def ack(self, work_id: str, *, worker_id: str | None = None) -> WorkItem:
        return await self._run(
            self._store.ack, self._environment_id, work_id, worker_id=worker_id, now=self._clock()
        )

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        return await self._run(
            self._store.heartbeat,
            self._environment_id,
            work_id,
            expected_last_heartbeat=expected_last_heartbeat,
            now=self._clock(),
            desired_ttl_seconds=desired_ttl_seconds,
        )

    async def stop(
        self,
        work_id: str,
        *,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        return await self._run(
            self._store.stop,
            self._environment_id,
            work_id,
            now=self._clock(),
            force=force,
            expected_last_heartbeat=expected_last_heartbeat,
            outcome=outcome,
        )

    async def requeue(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        return await self._run(
            self._store.requeue,
            self._environment_id,
            work_id,
            now=self._clock(),
            expected_last_heartbeat=expected_last_heartbeat,
            outcome=outcome,
        )

    async def request_stop(self, work_id: str) -> WorkItem:
        return await self._run(
            self._store.request_stop, self._environment_id, work_id, now=self._clock()
        )

    async def retry(self, work_id: str) -> WorkItem:
        return await self._run(self._store.retry, self._environment_id, work_id, now=self._clock())

    async def get(self, work_id: str) -> WorkItem:
        return await self._run(self._store.get, self._environment_id, work_id, now=self._clock())

    async def list_work(
        self,
        *,
        state: WorkState | None = None,
        limit: int = 100,
        page: int = 0,
        dead: bool = False,
    ) -> Sequence[WorkItem]:
        return await self._run(
            self._store.list_work,
            self._environment_id,
            now=self._clock(),
            state=state,
            limit=limit,
            page=page,
            dead=dead,
        )

    async def stats(self) -> WorkStats:
        return await self._run(self._store.stats, self._environment_id, now=self._clock())

    # --- environment policies ----------------------------------------------------

    async def environment_settings(self) -> EnvironmentSettings:
        """This environment's policies (queue cap, retention, default retry policy)."""
        return await self._run(
            self._store.environment_settings, self._environment_id, now=self._clock()
        )

    async def configure_environment(self, **changes: int | float | None) -> EnvironmentSettings:
        """Change some of this environment's policies (``None`` clears one); returns them all.

        The names are `EnvironmentSettings`' fields (``max_queue_depth``,
        ``retention`` in seconds, ``max_attempts``, ``backoff``, ``backoff_max``).

        Raises:
            BadRequest: an unknown name or a value out of range.
        """
        return await self._run(
            self._store.configure_environment, self._environment_id, changes, now=self._clock()
        )

    async def purge_expired(self, limit: int = 500) -> int:
        """One bounded batch of the retention sweep (every environment of the store)."""
        return await self._run(self._store.purge_expired, now=self._clock(), limit=limit)

    async def verify_session_secret(self, session_id: str, secret: str) -> bool:
        """Whether ``secret`` is the live credential of ``session_id`` (see `SQLiteStore`)."""
        return await self._run(
            self._store.verify_session_secret,
            self._environment_id,
            session_id,
            secret,
            now=self._clock(),
        )

    # --- workers -----------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, *, metadata: Mapping[str, object] | None = None
    ) -> WorkerRecord:
        return await self._run(
            self._store.register_worker,
            self._environment_id,
            worker_id,
            now=self._clock(),
            metadata=metadata,
        )

    async def worker_heartbeat(self, report: PresenceReport) -> WorkerRecord:
        return await self._run(
            self._store.worker_heartbeat, self._environment_id, report, now=self._clock()
        )

    async def get_worker(self, worker_id: str) -> WorkerRecord:
        return await self._run(
            self._store.get_worker, self._environment_id, worker_id, now=self._clock()
        )

    async def list_workers(self) -> Sequence[WorkerRecord]:
        return await self._run(self._store.list_workers, self._environment_id, now=self._clock())

    async def deregister_worker(self, worker_id: str) -> WorkerRecord:
        return await self._run(
            self._store.deregister_worker, self._environment_id, worker_id, now=self._clock()
        )

    # --- delegations and messages -------------------------------------------------

    async def delegate(self, source_id: str, task: str) -> Delegation:
        return await self._run(
            self._store.delegate, self._environment_id, source_id, task, now=self._clock()
        )

    async def list_delegations(
        self,
        worker_id: str,
        *,
        status: DelegationStatus | None = None,
        uncollected: bool = False,
    ) -> Sequence[Delegation]:
        return await self._run(
            self._store.list_delegations,
            self._environment_id,
            worker_id,
            status=status,
            uncollected=uncollected,
        )

    async def collect_delegation(self, delegation_id: str) -> Delegation:
        return await self._run(
            self._store.collect_delegation, self._environment_id, delegation_id, now=self._clock()
        )

    async def record_delegation_result(
        self, delegation_id: str, *, status: DelegationStatus, response_preview: str | None = None
    ) -> Delegation:
        return await self._run(
            self._store.record_delegation_result,
            self._environment_id,
            delegation_id,
            status=status,
            now=self._clock(),
            response_preview=response_preview,
        )

    async def post_message(self, session_id: str, body: str) -> SessionMessage:
        return await self._run(
            self._store.post_message, self._environment_id, session_id, body, now=self._clock()
        )

    async def notify(self, session_id: str, body: str) -> SessionMessage:
        return await self._run(
            self._store.notify, self._environment_id, session_id, body, now=self._clock()
        )

    async def list_messages(self, session_id: str) -> Sequence[SessionMessage]:
        return await self._run(self._store.list_messages, self._environment_id, session_id)

    # --- lifecycle ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop answering calls; close the store if this object opened it. Idempotent.

        Closing waits for a store call in flight (bounded by the store's busy
        timeout), so it is safe to call from a shielded cleanup scope.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._store.remove_submit_listener(self._on_submit)
        if self._threaded:
            try:
                if self._owns_store:
                    await self._lane.run(self._store.close)  # after every call already queued
            finally:
                await self._lane.aclose()
        elif not self._owns_store:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint()
            self._store.close()


@asynccontextmanager
async def open_embedded_control_plane(
    state_dir: str | os.PathLike[str],
    *,
    environment_id: str = DEFAULT_ENVIRONMENT_ID,
    clock: Callable[[], float] = time.time,
    threaded: bool = True,
    poll_interval: float = 0.25,
    lease_policy: LeasePolicy | None = None,
    status_policy: StatusPolicy | None = None,
) -> AsyncIterator[EmbeddedControlPlane]:
    """Open the control plane stored in ``state_dir`` (created if missing) for the block.

    The store file is ``state_dir / "controlplane.sqlite3"``. The directory is
    created and the file opened in a worker thread when ``threaded``, directly
    otherwise (see the module notes on ``MockClock``). On exit the store is
    closed in a shielded, bounded scope, so cancellation cannot leak the file
    handle.
    """

    def open_it() -> EmbeddedControlPlane:
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return EmbeddedControlPlane(
            directory / STORE_FILENAME,
            environment_id=environment_id,
            clock=clock,
            threaded=threaded,
            poll_interval=poll_interval,
            lease_policy=lease_policy,
            status_policy=status_policy,
        )

    if threaded:
        control_plane = await trio.to_thread.run_sync(open_it)
    else:
        await trio.lowlevel.checkpoint()
        control_plane = open_it()
    try:
        yield control_plane
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await control_plane.aclose()


if TYPE_CHECKING:

    def _implements_the_protocol(control_plane: EmbeddedControlPlane) -> ControlPlane:
        # mypy proves here that EmbeddedControlPlane satisfies ControlPlane.
        return control_plane


def _check_block_ms(block_ms: object) -> None:
    if isinstance(block_ms, bool) or not isinstance(block_ms, int):
        raise BadRequest(f"block_ms must be an integer, got {block_ms!r}")
    if not 0 <= block_ms <= MAX_BLOCK_MS:
        raise BadRequest(f"block_ms must be between 0 and {MAX_BLOCK_MS}, got {block_ms}")
