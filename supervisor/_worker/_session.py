"""One session: a lease keeper and a runner under their own small supervisor.

::

    session:<work id>      ONE_FOR_ALL, auto_shutdown=ANY_SIGNIFICANT, no restarts
    ├─ lease               TEMPORARY significant: LeaseKeeper (started first, ready
    │                      only after the first heartbeat succeeded)
    └─ runner              TEMPORARY significant: workspace + agent

Whichever ends first ends the session: the runner finishing (its outcome is on
the shared :class:`~supervisor._lease.Lease`), or the lease keeper raising
``LeaseLost`` (the runner is cancelled at once, ``shutdown=0``: its agent gets
SIGTERM, grace, SIGKILL, in a shielded cleanup). The keeper is stopped last and
reports the outcome with the final ``stop``, unless the lease was lost.

This module uses only the tree's public API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Protocol

import attrs
import trio

from .._base._lane import Offload
from .._tree._events import ExitKind
from .._tree._exceptions import ChildStartError
from .._tree._spec import AutoShutdown, ChildSpec, Restart, Strategy, SupervisorSpec
from .._tree._supervisor import Supervisor
from ..controlplane._models import Outcome, OutcomeStatus, WorkItem
from ..controlplane._protocol import ControlPlane
from ._agent import AgentRunner
from ._inbox import INBOX_FILENAME, Inbox
from ._lease import KeeperOptions, Lease, LeaseKeeper
from ._poller import Slot
from ._process import AgentResult, SessionOutput
from ._reaper import Reaper, ReaperTicket
from ._workspace import WorkspaceError, safe_name

__all__ = ["SessionRecord", "SessionRunner", "Workspaces"]

logger = logging.getLogger("supervisor.session")

#: The longest a session's end waits for its log writes to reach the file.
_LOG_FLUSH_LIMIT = 10.0


def _nothing() -> None:
    """A barrier: run on the writer's lane, it returns once the writes before it ran."""


class Workspaces(Protocol):
    """What the runner needs of a workspace maker (`WorkspaceManager` is the real one).

    A protocol so that a simulation can run sessions without touching the file
    system or worker threads (see `supervisor.testing.MemoryWorkspaces`):
    directory creation and removal go through ``trio.to_thread``, and a task
    waiting on a thread lets ``MockClock``'s autojump fire timeouts early.
    """

    def open(self, session_id: str) -> AbstractAsyncContextManager[Path]:
        """A workspace for one session, yielded as a path, released on exit."""
        ...


@attrs.define(eq=False)
class SessionRecord:
    """What the worker knows of one session it ran (for ``wait``, status and metrics)."""

    work_id: str
    session_id: str
    prompt_chars: int
    started_at: float
    outcome: Outcome | None = None
    ended_at: float | None = None
    done: trio.Event = attrs.field(factory=trio.Event, repr=False)
    lease: Lease | None = attrs.field(default=None, repr=False)
    #: Set by a wedge detector (or anyone) that cancels the session on purpose.
    cancel_reason: OutcomeStatus | None = None
    cancel_detail: str | None = None
    cancel_scope: trio.CancelScope | None = attrs.field(default=None, repr=False)
    #: Where delegation results arrive while the agent runs (closed when it ends).
    inbox: Inbox | None = attrs.field(default=None, repr=False)

    def cancel(self, status: OutcomeStatus, detail: str) -> None:
        """Stop this session now with the given outcome (e.g. ``wedged``)."""
        if self.cancel_reason is None:
            self.cancel_reason = status
            self.cancel_detail = detail
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


LineHook = Callable[[SessionRecord, str], None]
#: Runs next to the agent, cancelled when it ends (the wedge detector's silence watchdog).
Watchdog = Callable[[SessionRecord, SessionOutput], Awaitable[None]]


@attrs.define(eq=False)
class SessionRunner:
    """Builds and runs the per-session supervisor; one instance per worker.

    Args:
        control_plane: where the leases live.
        agent: runs the agent (subprocess or in-process).
        workspaces: makes and removes workspaces (a `WorkspaceManager`, or any
            `Workspaces`).
        logs_dir: per-session log files go here.
        lease_ttl: the ttl to ask for.
        on_line: called with every output line (wedge detection hooks in here).
        watchdog: run beside each agent, with the session's record and output,
            and cancelled when the agent ends (the silence watchdog hooks in
            here); it stops the session through ``record.cancel``.
        on_end: called with the record when a session has ended.
        on_start: awaited in each session once its lease is confirmed, before the
            agent starts
            (the worker journals the session there, off the event loop).
        offload: runs blocking file work (opening the session's log) away from
            the event loop; ``trio.to_thread.run_sync`` by default.
        log_writer: queues the session log's writes away from the event loop
            (`ThreadLane.submit` of the lane ``offload`` runs on); ``None``
            writes them on the event loop.
        keeper_options: extra keyword arguments for each ``LeaseKeeper`` (tests and
            the simulator use this to inject timing and randomness).
    """

    control_plane: ControlPlane
    agent: AgentRunner
    workspaces: Workspaces
    logs_dir: Path
    lease_ttl: float | None = None
    on_line: LineHook | None = None
    keeper_options: KeeperOptions = attrs.field(factory=KeeperOptions)
    watchdog: Watchdog | None = None
    on_end: Callable[[SessionRecord], None] | None = None
    on_start: Callable[[WorkItem], Awaitable[None]] | None = None
    offload: Offload = attrs.field(default=trio.to_thread.run_sync, repr=False)
    log_writer: Callable[[Callable[[], object]], None] | None = attrs.field(
        default=None, repr=False
    )
    records: dict[str, SessionRecord] = attrs.field(factory=dict)
    #: Per-session variables for the agent (its session credential), built per item.
    session_env: Callable[[WorkItem], Mapping[str, str]] | None = None
    #: The same records by session id (delegation results name their source session).
    by_session: dict[str, SessionRecord] = attrs.field(factory=dict)
    #: Enforces each subprocess agent's lease deadline from outside the event loop
    #: (DESIGN §3.8); ``None`` leaves it to the event loop alone.
    reaper: Reaper | None = attrs.field(default=None, repr=False)
    #: The most each session's log may take on disk (see `SessionOutput.log_max_bytes`).
    log_max_bytes: int | None = None

    def session(self, session_id: str) -> SessionRecord | None:
        """The record of a session this runner ran or runs, by session id."""
        return self.by_session.get(session_id)

    def spec_for(self, item: WorkItem, slot: Slot) -> ChildSpec:
        """The ``session:<id>`` child for the ``sessions`` supervisor."""
        return ChildSpec(
            f"session:{item.id}",
            self.run,
            args=(item, slot),
            restart=Restart.TEMPORARY,
            shutdown=None,  # the session stops its own children; wait for it
        )

    async def run(
        self,
        item: WorkItem,
        slot: Slot,
        *,
        task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one claimed item until its session ends; always releases ``slot``."""
        record = self.records[item.id] = SessionRecord(
            work_id=item.id,
            session_id=item.data.id,
            prompt_chars=len(item.data.prompt),
            started_at=trio.current_time(),
        )
        self.by_session[item.data.id] = record
        lease = record.lease = Lease(item.id)
        keeper = LeaseKeeper(
            self.control_plane,
            item.id,
            desired_ttl=self.lease_ttl,
            lease=lease,
            grant=slot.grant,
            **self.keeper_options,
        )
        session = Supervisor(
            SupervisorSpec(
                [
                    ChildSpec(
                        "lease",
                        keeper.run,
                        restart=Restart.TEMPORARY,
                        significant=True,
                        shutdown=0,
                    ),
                    ChildSpec(
                        "runner",
                        self._runner,
                        args=(item, record),
                        restart=Restart.TEMPORARY,
                        significant=True,
                        shutdown=0,
                    ),
                ],
                strategy=Strategy.ONE_FOR_ALL,
                auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
                intensity=0,
                name=f"session:{item.id}",
            )
        )
        # The hand-over is done once the session exists: the poller goes back to
        # claiming while this session confirms its lease (its runner still starts
        # only after that). Sessions thus start concurrently, not one by one.
        task_status.started(session)
        try:
            await session.run()
        except ChildStartError:
            if record.outcome is None:
                record.outcome = Outcome(
                    OutcomeStatus.LEASE_LOST if lease.lost else OutcomeStatus.FAILED,
                    reason=f"session did not start: {lease.lost or 'lease not confirmed'}",
                )
            raise
        finally:
            slot.release()
            record.ended_at = trio.current_time()
            if record.outcome is None:
                record.outcome = self._outcome_after(session, record)
            record.done.set()
            self._log_end(record)
            if self.on_end is not None:
                self.on_end(record)

    def _outcome_after(self, session: Supervisor, record: SessionRecord) -> Outcome:
        lease = record.lease
        if lease is not None and lease.outcome is not None:
            return lease.outcome
        reason = session.exit_reason
        if reason is not None and reason.kind is ExitKind.ABNORMAL:
            return Outcome(OutcomeStatus.FAILED, reason=f"{reason.child_id}: {reason.reason}")
        return Outcome(OutcomeStatus.CANCELLED, reason="session stopped before an outcome")

    def _log_end(self, record: SessionRecord) -> None:
        outcome = record.outcome
        assert outcome is not None
        level = logging.INFO if outcome.status is OutcomeStatus.COMPLETED else logging.WARNING
        logger.log(
            level,
            "session %s (work item %s) ended: %s%s",
            record.session_id,
            record.work_id,
            outcome.status.value,
            f" ({outcome.reason})" if outcome.reason else "",
        )

    async def _runner(self, item: WorkItem, record: SessionRecord) -> None:
        """Workspace + agent; sets the outcome on the lease before it ends."""
        lease = record.lease
        assert lease is not None
        hook = self.on_line
        output = SessionOutput(
            log_path=self.logs_dir / f"{safe_name(item.id)}.log",
            on_line=(lambda line: hook(record, line)) if hook is not None else None,
            log_max_bytes=self.log_max_bytes,
            writer=self.log_writer,
        )
        started = trio.current_time()
        try:
            with trio.CancelScope() as scope:
                record.cancel_scope = scope
                if record.cancel_reason is not None:
                    scope.cancel()
                # a stop the control plane asks for also interrupts the workspace setup
                lease.cancel_on_stop_request(scope)
                if self.on_start is not None:
                    # after the lease is confirmed (a slow disk here cannot hold up the
                    # first heartbeat) and before the agent can delegate anything
                    await self.on_start(item)
                async with (
                    self.workspaces.open(item.data.id) as path,
                    _open_inbox(record, path) as inbox,
                ):
                    if self.log_writer is not None:
                        output.start_log()  # queued on the writer, ahead of any output
                    else:
                        await self.offload(output.open_log)
                    if self.watchdog is None:
                        result = await self._run_agent(item, record, path, output, inbox)
                    else:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self.watchdog, record, output)
                            result = await self._run_agent(item, record, path, output, inbox)
                            nursery.cancel_scope.cancel()
                    lease.outcome = record.outcome = _outcome_of(result, lease)
            if scope.cancelled_caught:
                status = record.cancel_reason or OutcomeStatus.CANCELLED
                detail = record.cancel_detail or lease.stop_reason or "stop requested"
                lease.outcome = record.outcome = _interrupted(status, detail, output, started)
        except WorkspaceError as exc:
            detail = f"workspace could not be prepared: {exc}"
            lease.outcome = record.outcome = Outcome(OutcomeStatus.FAILED, reason=detail)
        finally:
            output.close()
            if output.queued and not output.caught_up:
                # The log's writes went to the writer: the session ends with its
                # log complete (``offload`` runs on the writer's lane, after them).
                with trio.CancelScope(shield=True), trio.move_on_after(_LOG_FLUSH_LIMIT):
                    await self.offload(_nothing)
            if record.outcome is None:
                # Interrupted from above (the lease was lost, or the worker is stopping).
                # Checked in ``finally`` rather than ``except trio.Cancelled``: through a
                # nursery the cancellation arrives wrapped in an exception group.
                status = OutcomeStatus.LEASE_LOST if lease.lost else OutcomeStatus.CANCELLED
                detail = lease.lost or "worker stopping"
                lease.outcome = record.outcome = _interrupted(status, detail, output, started)

    async def _run_agent(
        self,
        item: WorkItem,
        record: SessionRecord,
        path: Path,
        output: SessionOutput,
        inbox: Inbox,
    ) -> AgentResult:
        lease = record.lease
        assert lease is not None
        with self._guard(lease) as ticket:
            env = dict(self.session_env(item)) if self.session_env else {}
            if ticket is not None:
                env.update(ticket.env)
            return await self.agent.run(
                prompt=item.data.prompt,
                work_id=item.id,
                session_id=item.data.id,
                workspace=path,
                output=output,
                session_env=env,
                inbox=inbox,
                on_spawn=ticket.spawned if ticket is not None else None,
                session_timeout=item.timeout,
            )

    @contextmanager
    def _guard(self, lease: Lease) -> Iterator[ReaperTicket | None]:
        """The reaper's watch over one subprocess agent run (nothing for in-process agents)."""
        if self.reaper is None or not self.agent.spec.is_process:
            yield None
            return
        with self.reaper.guard(lease) as ticket:
            yield ticket


def _outcome_of(result: AgentResult, lease: Lease) -> Outcome:
    """The run's outcome; ``lease_lost`` for an agent killed once its lease deadline passed.

    The reaper (DESIGN §3.8) kills an agent at the deadline, which may come a
    moment before the lease keeper notices the same deadline and cancels the
    runner: the signal is then the lease's doing, not the agent's failure.
    """
    outcome = result.to_outcome()
    killed = result.exit_code is not None and result.exit_code < 0
    if killed and lease.confirmed and lease.time_left() <= 0:
        return attrs.evolve(
            outcome,
            status=OutcomeStatus.LEASE_LOST,
            reason=f"{outcome.reason}: the lease deadline had passed",
        )
    return outcome


def _interrupted(
    status: OutcomeStatus, detail: str, output: SessionOutput, started: float
) -> Outcome:
    return Outcome(
        status,
        result=output.result_text() or None,
        duration=trio.current_time() - started,
        reason=detail,
    )


@asynccontextmanager
async def _open_inbox(record: SessionRecord, workspace: Path) -> AsyncIterator[Inbox]:
    """The session's inbox while its agent runs; closed before the workspace goes away."""
    inbox = record.inbox = Inbox(workspace / INBOX_FILENAME)
    try:
        yield inbox
    finally:
        inbox.close()
