"""The generic supervision tree: OTP restart strategies on Trio nurseries.

This module knows nothing about agents, leases or control planes; any Trio
application can put its own services under a :class:`Supervisor`.

How a supervisor is laid out in Trio terms::

    run()
    └─ one nursery
       ├─ body (run() itself): the decision loop (start children, react to exits,
       │  restart, escalate)
       ├─ one wrapper task per child, each in its own *shielded* cancel scope
       └─ restart timers

Each child runs under a shield (from the moment it is in the nursery: a child
started with ``task_status`` is still under its starter's cancellation until it
calls ``started()``), so that when the host application cancels ``run()`` the
supervisor can still stop them the orderly way (reverse start order,
cooperative stop request first) before the cancellation goes on. That cleanup
is bounded by the children's own ``shutdown`` settings. When a child lets a
``BaseException`` that is not an ``Exception`` escape (``KeyboardInterrupt``),
its siblings are cancelled at once, as a nursery cancels its tasks, and the
supervisor stops.

Exceptions that cross ``run()``: ``RestartIntensityExceeded`` and
``ChildStartError`` are raised after every child has stopped. A
``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
``SystemExit``) is never caught: it tears the tree down and propagates. When
several such exceptions arrive at once Trio groups them; ``run()`` re-raises a
lone exception bare (ignoring the ``Cancelled`` that came with it), a lone
``Cancelled`` bare, and anything else as the group it is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import attrs
import outcome
import trio

from .._base._describe import describe_exception
from .._base._groups import collapse_group, raise_saving_context
from ._events import (
    ChildCounts,
    ChildExit,
    ChildInfo,
    ChildSnapshot,
    ChildState,
    EventKind,
    ExitKind,
    SupervisorEvent,
    SupervisorSnapshot,
)
from ._exceptions import ChildStartError, RestartIntensityExceeded, Shutdown
from ._spec import AutoShutdown, ChildSpec, Restart, Strategy, SupervisorSpec

__all__ = ["ChildContext", "Supervisor", "current_child", "open_supervisor"]

logger = logging.getLogger("supervisor")

_LIVE = (ChildState.STARTING, ChildState.RUNNING)


@attrs.define(eq=False)
class ChildContext:
    """What a supervised child can learn about itself; see :func:`current_child`.

    Attributes:
        id: the child's id.
        supervisor: the name of its supervisor.
        restart_count: how many times it was restarted before this run.
    """

    id: str
    supervisor: str
    restart_count: int
    _stop_event: trio.Event | None = attrs.field(default=None, init=False, repr=False)
    _stop_set: bool = attrs.field(default=False, init=False, repr=False)
    _observed: bool = attrs.field(default=False, init=False, repr=False)
    _stop_callbacks: list[Callable[[], None]] | None = attrs.field(
        default=None, init=False, repr=False
    )

    @property
    def stop_requested(self) -> trio.Event:
        """Set when the supervisor asks this child to stop.

        Looking at it is how a child says it will cooperate (like an OTP process
        that traps exits): it then gets its ``shutdown`` grace before being
        cancelled. A child that never looks is cancelled at once.
        """
        self._observed = True
        if self._stop_event is None:  # made on first use: most children never look
            self._stop_event = trio.Event()
            if self._stop_set:
                self._stop_event.set()
        return self._stop_event

    def _request_stop(self) -> None:
        self._stop_set = True
        if self._stop_event is not None:
            self._stop_event.set()
        callbacks, self._stop_callbacks = self._stop_callbacks, None
        if callbacks:
            for callback in callbacks:
                callback()

    def _call_on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on a stop request (now, if one came); returns a canceller.

        Counts as looking at `stop_requested`: a nested supervisor registers
        here rather than running a task that waits on the event.
        """
        self._observed = True
        if self._stop_set:
            callback()
            return _nothing
        if self._stop_callbacks is None:
            self._stop_callbacks = [callback]
        else:
            self._stop_callbacks.append(callback)

        def cancel() -> None:
            callbacks = self._stop_callbacks
            if callbacks and callback in callbacks:
                callbacks.remove(callback)

        return cancel

    @property
    def observes_stop(self) -> bool:
        return self._observed


def _nothing() -> None:
    pass


_current_child: ContextVar[ChildContext | None] = ContextVar("supervisor_child", default=None)


def current_child() -> ChildContext:
    """The :class:`ChildContext` of the supervised child this task belongs to.

    Raises:
        RuntimeError: outside a supervised child.
    """
    ctx = _current_child.get()
    if ctx is None:
        raise RuntimeError("current_child() called outside a supervised child")
    return ctx


class _Ready:
    """Wraps a child's ``task_status`` to remember whether it has started.

    Once ``started()`` has moved the child into the supervisor's nursery, its
    cancel scope is shielded (see the module docstring), unless the supervisor
    has finished stopping its children. If the start was cancelled meanwhile,
    Trio leaves the child where it was, under the starter's cancellation, and
    so does this.
    """

    __slots__ = ("_inner", "_scope", "_supervisor", "_task", "done", "value")

    def __init__(
        self,
        inner: trio.TaskStatus[Any],
        supervisor: Supervisor,
        scope: trio.CancelScope,
        task: trio.lowlevel.Task,
    ) -> None:
        self._inner = inner
        self._supervisor = supervisor
        self._scope = scope
        self._task = task
        self.done = False
        self.value: Any = None

    def started(self, value: Any = None) -> None:
        if self.done:
            raise RuntimeError("task_status.started() called twice")
        self.done = True
        self.value = value
        # Shielded before the move: were the supervisor's nursery cancelled already (the
        # host cancels run()), the move must not hand that on to the child or its tasks.
        supervisor = self._supervisor
        if supervisor._closed:
            self._inner.started(value)  # too late: under the nursery's cancellation
            return
        scope = self._scope
        scope.shield = True
        try:
            self._inner.started(value)
        finally:
            if self._task.parent_nursery is not supervisor._nursery:
                scope.shield = False  # not moved: it stays under its starter's cancellation


class _Mutex:
    """A fair lock that costs no trip through the scheduler when it is free.

    The decision loop takes it for every message and the public calls for
    their whole work; the parking lot is only made when someone has to wait.
    As with ``trio.Lock``, the task holding it cannot take it again.
    """

    __slots__ = ("_lot", "owner")

    def __init__(self) -> None:
        self.owner: trio.lowlevel.Task | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None

    async def acquire(self, *, checkpoint: bool) -> None:
        """Take the lock, waiting in line if it is held.

        With ``checkpoint``, a full checkpoint as ``trio.Lock.acquire`` is; without,
        the caller has checked for cancellation already, and taking a free lock
        does not yield.
        """
        if checkpoint:
            await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if self.owner is None:
            self.owner = task
            if checkpoint:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self.owner is task:
            raise RuntimeError("attempt to re-acquire an already held Lock")
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()  # woken by release(), which hands the lock over

    def release(self) -> None:
        if self._lot:
            (self.owner,) = self._lot.unpark(count=1)
        else:
            self.owner = None


class _Child:
    __slots__ = (
        "consecutive",
        "ctx",
        "done",
        "generation",
        "last_exit",
        "pending",
        "restart_count",
        "scope",
        "spec",
        "started_at",
        "started_wall",
        "state",
        "terminating",
        "value",
    )

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.state = ChildState.STOPPED
        self.generation = 0
        self.scope: trio.CancelScope | None = None
        self.done = _NOT_RUNNING  # set when the task of its current run has ended
        self.ctx: ChildContext | None = None
        self.value: Any = None
        self.terminating = False
        self.restart_count = 0
        self.consecutive = 0
        self.started_at: float | None = None  # trio clock
        self.started_wall: float | None = None
        self.last_exit: ChildExit | None = None
        self.pending: object | None = None  # token of a scheduled restart


class _Exited:
    __slots__ = ("child", "exit", "generation")

    def __init__(self, child: _Child, generation: int, exit: ChildExit) -> None:
        self.child = child
        self.generation = generation
        self.exit = exit


class _RestartDue:
    __slots__ = ("children", "token")

    def __init__(self, children: tuple[_Child, ...], token: object) -> None:
        self.children = children
        self.token = token


class _ShutdownRequest:
    pass


_SHUTDOWN = _ShutdownRequest()

# The `done` of a child that never ran: already set (an Event binds to no run).
_NOT_RUNNING = trio.Event()
_NOT_RUNNING.set()


class _StartFailedError(Exception):
    def __init__(self, child: _Child, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.child = child
        self.exc = exc


def _refuse_new_arrivals() -> None:
    """What starting a task in a nursery that is shutting down raises."""
    raise RuntimeError("Nursery is closed to new arrivals")


async def _wait(done: trio.Event, seconds: float | None, shielded: bool) -> None:
    """Wait for ``done``, at most ``seconds`` (``None``: no limit)."""
    if seconds is None and not shielded:
        await done.wait()
        return
    deadline = math.inf if seconds is None else trio.current_time() + seconds
    with trio.CancelScope(deadline=deadline, shield=shielded):
        await done.wait()


def _restarts(restart: Restart, kind: ExitKind) -> bool:
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return kind is ExitKind.ABNORMAL
    return False


class Supervisor:
    """Runs children per a :class:`SupervisorSpec` and restarts them by its rules.

    Use ``await nursery.start(sup.run)`` (returns once every child has started)
    or :func:`open_supervisor`. A supervisor can be a child of another: use
    ``ChildSpec(id, Supervisor(spec).run)``; its escalation is then its
    parent's abnormal child exit, and its parent's stop request stops it gracefully.

    Events: :meth:`subscribe` returns a receive channel of
    :class:`SupervisorEvent`; a subscriber that falls behind loses events (the
    supervisor never blocks on a slow reader) and ``dropped_events`` counts them.

    ``total_restarts`` counts the restarts this supervisor's policy made over
    the object's whole life (re-runs do not reset it, unlike the per-child
    counts in a snapshot): a monotonic figure for metrics.
    """

    def __init__(self, spec: SupervisorSpec) -> None:
        if not isinstance(spec, SupervisorSpec):
            raise TypeError(f"Supervisor needs a SupervisorSpec, got {spec!r}")
        self.spec = spec
        self.exit_reason: ChildExit | None = None
        self.dropped_events = 0
        self.total_restarts = 0
        self._crash_log: dict[str, tuple[float | None, int]] = {}
        self._subscribers: list[trio.MemorySendChannel[SupervisorEvent]] = []
        self._running = False
        self._children: list[_Child] = []  # in start order
        self._ids: dict[str, _Child] = {}  # the same children by id
        self._ran = False
        self._reset()

    def _reset(self) -> None:
        # (time, exit) of each restart decision still inside the intensity window
        self._restarts: deque[tuple[float, ChildExit]] = deque()
        self._lock = _Mutex()
        self._inbox: deque[object] = deque()
        self._waiter: trio.lowlevel.Task | None = None  # the decision loop, parked on the inbox
        self._finished: trio.Event | None = None  # made by the first shutdown() that waits
        self._error: BaseException | None = None
        self._tearing_down = False
        # Children cancelled as by their nursery (a sibling let a BaseException escape,
        # or they started while the supervisor was closing): their exits go unreported.
        self._unreported = False
        self._aborted = False  # as a nursery a task raised out of: closed to new children
        self._closed = False  # every child stopped: one starting now is not shielded
        self._nursery: trio.Nursery | None = None
        self._children = []
        self._ids = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self._running

    # ------------------------------------------------------------------ run

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the children in order and supervise them until stopped.

        Returns normally after :meth:`shutdown`, an auto-shutdown (see
        ``exit_reason``) or a parent's stop request.

        Raises:
            ChildStartError: a child failed to start (the others were stopped first).
            RestartIntensityExceeded: the restart budget was spent.
        """
        if self._running:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        if self._ran:
            self._reset()  # a fresh run of a supervisor that ran before (a restart)
        self._ran = True
        self.exit_reason = None
        self._running = True
        parent = _current_child.get()
        forget_parent = _nothing
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if parent is not None:
                        forget_parent = parent._call_on_stop(self._parent_stops)
                    try:
                        await self._main(task_status)
                    finally:
                        if self._children:
                            await self._terminate_all(shielded=True)
                        else:
                            self._tearing_down = True
                        self._close(nursery)
                        if self._lock.owner is not None:
                            # A call in progress may be about to start a child: one
                            # more pass lets it in before the nursery closes (it is
                            # cancelled there at once) rather than refused.
                            await trio.lowlevel.cancel_shielded_checkpoint()
            except BaseExceptionGroup as group:
                raise_saving_context(collapse_group(group))
        finally:
            forget_parent()
            self._running = False
            if self._finished is not None:
                self._finished.set()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _post(self, message: object) -> None:
        """Hand ``message`` to the decision loop (never blocks)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter, outcome.Value(message))
        else:
            self._inbox.append(message)

    def _abort_receive(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _receive(self) -> object:
        """The next message; a checkpoint, as a memory channel's ``receive()`` is."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._inbox:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._inbox.popleft()
        self._waiter = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort_receive)

    def _parent_stops(self) -> None:
        self._post(_SHUTDOWN)

    async def _main(self, task_status: trio.TaskStatus[Supervisor]) -> None:
        self._children = [_Child(spec) for spec in self.spec.children]
        self._ids = {child.spec.id: child for child in self._children}
        for child in list(self._children):
            try:
                await self._start(child)
            except _StartFailedError as failure:
                await self._terminate_all()
                error = ChildStartError(self.name, child.spec.id, describe_exception(failure.exc))
                error.__cause__ = failure.exc
                self._error = error
                return
        task_status.started(self)
        lock = self._lock
        while True:
            message = await self._receive()
            await lock.acquire(checkpoint=False)
            try:
                if await self._handle(message):
                    return
            finally:
                lock.release()

    # ------------------------------------------------------------ children

    async def _start(self, child: _Child) -> None:
        """Start ``child`` and wait for it to be ready; ``_StartFailedError`` if it fails."""
        nursery = self._nursery
        assert nursery is not None
        child.generation += 1
        child.state = ChildState.STARTING
        child.done = trio.Event()
        child.terminating = False
        child.pending = None
        child.value = None
        try:
            if self._aborted:
                _refuse_new_arrivals()
            if child.spec.accepts_task_status:
                # shielded by _Ready.started() once in the nursery
                scope = child.scope = trio.CancelScope()
                child.value = await nursery.start(self._child_main, child, child.generation, scope)
            else:
                scope = child.scope = trio.CancelScope(shield=not self._closed)
                nursery.start_soon(self._child_main, child, child.generation, scope)
        except Exception as exc:
            child.state = ChildState.STOPPED
            child.scope = None
            child.last_exit = ChildExit(child.spec.id, ExitKind.ABNORMAL, trio.current_time(), exc)
            raise _StartFailedError(child, exc) from exc
        if child.state is ChildState.STARTING:
            child.state = ChildState.RUNNING
        child.started_at = trio.current_time()
        child.started_wall = time.time()
        self._emit(EventKind.CHILD_STARTED, child.spec.id)

    async def _child_main(
        self,
        child: _Child,
        generation: int,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        done = child.done
        spec = child.spec
        ctx = child.ctx = ChildContext(
            id=spec.id,
            supervisor=self.name,
            restart_count=child.restart_count,
        )
        _current_child.set(ctx)
        kind = ExitKind.NORMAL
        error: BaseException | None = None
        ready: _Ready | None = None
        escaped = False
        try:
            with scope:
                try:
                    if spec.accepts_task_status:
                        ready = _Ready(task_status, self, scope, trio.lowlevel.current_task())
                        await spec.target(*spec.args, task_status=ready)
                    else:
                        await spec.target(*spec.args)
                except Shutdown as exc:
                    if ready is not None and not ready.done:
                        raise
                    kind, error = ExitKind.SHUTDOWN, exc
                except Exception as exc:
                    if ready is not None and not ready.done:
                        raise
                    kind, error = ExitKind.ABNORMAL, exc
            if scope.cancelled_caught:
                if self._unreported and scope.shield:
                    return  # cancelled with its siblings, as a nursery would: no exit to report
                kind = ExitKind.SHUTDOWN
        except BaseException:
            # A child in the nursery (shielded) lets only a BaseException that is not an
            # Exception out: its siblings are cancelled at once, as by a nursery.
            escaped = scope.shield
            raise
        finally:
            done.set()
            if escaped:
                self._abort(child)
        if ready is not None and not ready.done:
            return  # trio's start() reports "exited without calling started()"
        exit_ = ChildExit(spec.id, kind, trio.current_time(), error, requested=child.terminating)
        if generation == child.generation:
            child.last_exit = exit_
            child.state = ChildState.STOPPED
            child.scope = None
        self._emit(EventKind.CHILD_EXITED, spec.id, exit=exit_)
        self._post(_Exited(child, generation, exit_))

    def _abort(self, culprit: _Child) -> None:
        """Cancel every other child in the nursery; their exits go unreported."""
        self._unreported = True
        self._aborted = True
        for child in self._children:
            scope = child.scope
            if child is not culprit and scope is not None and scope.shield:
                scope.cancel()

    def _close(self, nursery: trio.Nursery) -> None:
        """Cancel what is left in the nursery once every child was stopped.

        Restart timers, and a child that ``restart_child`` started while the host's
        cancellation stopped the others: cancelled at once and unreported, as
        everything left in a cancelled nursery.
        """
        self._closed = True
        self._unreported = True
        for child in self._children:
            scope = child.scope
            if scope is not None and scope.shield and not child.done.is_set():
                scope.cancel()
        nursery.cancel_scope.cancel()

    async def _terminate(self, child: _Child, *, shielded: bool = False) -> None:
        """Stop one child: stop request, grace, cancel, and say so if it will not end.

        ``shielded``: no cancellation from outside cuts the waits short (the
        teardown's stop of every child).
        """
        if child.state is ChildState.BACKOFF:
            child.pending = None
            child.state = ChildState.STOPPED
        elif child.state in _LIVE or (
            child.state is ChildState.STOPPING and not child.done.is_set()
        ):
            child.terminating = True
            child.state = ChildState.STOPPING
            done = child.done
            ctx = child.ctx
            if ctx is not None:
                ctx._request_stop()
            grace = child.spec.shutdown
            if ctx is not None and ctx.observes_stop and grace != 0:
                await _wait(done, grace, shielded)
            if not done.is_set() and child.scope is not None:
                child.scope.cancel()
            if not done.is_set():
                await _wait(done, self.spec.unresponsive_after, shielded)
            if not done.is_set():
                self._emit(EventKind.CHILD_UNRESPONSIVE, child.spec.id)
                await _wait(done, None, shielded)
            child.state = ChildState.STOPPED
        if child.spec.restart is Restart.TEMPORARY:
            self._drop(child)

    def _has(self, child: _Child) -> bool:
        return self._ids.get(child.spec.id) is child

    def _drop(self, child: _Child) -> None:
        """Forget ``child`` if it is one of the children."""
        if self._ids.get(child.spec.id) is child:
            del self._ids[child.spec.id]
            self._children.remove(child)

    async def _terminate_all(self, *, shielded: bool = False) -> None:
        self._tearing_down = True
        if self.spec.parallel_stop:
            with trio.CancelScope(shield=shielded):
                async with trio.open_nursery() as nursery:
                    for child in list(self._children):
                        nursery.start_soon(self._terminate, child)
            return
        for child in reversed(list(self._children)):
            await self._terminate(child, shielded=shielded)

    # ------------------------------------------------------------- decisions

    async def _handle(self, message: object) -> bool:
        """React to one message; ``True`` when the supervisor must stop."""
        if isinstance(message, _ShutdownRequest):
            return True
        if isinstance(message, _RestartDue):
            due = [c for c in message.children if c.pending is message.token and self._has(c)]
            await self._restart_group(due)
            return False
        assert isinstance(message, _Exited)
        child, exit_ = message.child, message.exit
        if message.generation != child.generation or child.terminating:
            return False  # stopped on purpose, or already replaced
        if not self._has(child):
            return False
        ran_for = exit_.time - (child.started_at if child.started_at is not None else exit_.time)
        if child.spec.restart is Restart.TEMPORARY:
            self._drop(child)
        if not _restarts(child.spec.restart, exit_.kind):
            if child.spec.significant and self._auto_shutdown_due():
                self.exit_reason = exit_
                self._emit(EventKind.SUPERVISOR_AUTO_SHUTDOWN, child.spec.id, exit=exit_)
                return True
            return False
        if self._budget_spent(exit_):
            self._escalate(exit_)
            return True
        group = self._group_for(child)
        for other in reversed(group):
            if other is not child:
                await self._terminate(other)
        group = [c for c in group if self._has(c)]
        backoff = child.spec.backoff or self.spec.backoff
        delay = 0.0
        if backoff is not None:
            reset_after = (
                backoff.reset_after if backoff.reset_after is not None else self.spec.period
            )
            if ran_for >= reset_after:
                child.consecutive = 0
            delay = backoff.delay(child.consecutive)
        child.consecutive += 1
        for c in group:
            c.restart_count += 1
            self.total_restarts += 1
            self._emit(
                EventKind.CHILD_RESTARTING,
                c.spec.id,
                exit=exit_ if c is child else None,
                delay=delay,
            )
        if delay > 0:
            self._schedule(group, delay)
        else:
            await self._restart_group(group)
        return False

    def _auto_shutdown_due(self) -> bool:
        mode = self.spec.auto_shutdown
        if mode is AutoShutdown.ANY_SIGNIFICANT:
            return True
        if mode is AutoShutdown.ALL_SIGNIFICANT:
            return not any(
                c.spec.significant and c.state in (*_LIVE, ChildState.BACKOFF)
                for c in self._children
            )
        return False

    def _budget_spent(self, exit_: ChildExit) -> bool:
        now = trio.current_time()
        self._restarts.append((now, exit_))
        horizon = now - self.spec.period
        while self._restarts and self._restarts[0][0] <= horizon:
            self._restarts.popleft()
        return len(self._restarts) > self.spec.intensity

    def _escalate(self, exit_: ChildExit) -> None:
        # the exits that spent the budget, oldest first; the escalating one is last
        history = [counted for _, counted in self._restarts]
        error = RestartIntensityExceeded(self.name, self.spec.intensity, self.spec.period, history)
        error.__cause__ = exit_.exception
        self._error = error
        self._emit(EventKind.SUPERVISOR_ESCALATED, exit_.child_id, exit=exit_)

    def _group_for(self, child: _Child) -> list[_Child]:
        strategy = self.spec.strategy
        if strategy is Strategy.ONE_FOR_ONE:
            return [child]
        if strategy is Strategy.ONE_FOR_ALL:
            return list(self._children)
        index = self._children.index(child)
        return self._children[index:]

    def _schedule(self, group: list[_Child], delay: float) -> None:
        token = object()
        for c in group:
            c.pending = token
            c.state = ChildState.BACKOFF
        assert self._nursery is not None
        self._nursery.start_soon(self._restart_timer, _RestartDue(tuple(group), token), delay)

    async def _restart_timer(self, due: _RestartDue, delay: float) -> None:
        await trio.sleep(delay)
        self._post(due)

    async def _restart_group(self, group: list[_Child]) -> None:
        for position, child in enumerate(group):
            try:
                await self._start(child)
            except _StartFailedError as failure:
                # The failed start counts as an abnormal exit of that child; the rest of
                # the group stays stopped until that exit is handled (which restarts it).
                for rest in group[position + 1 :]:
                    rest.state = ChildState.STOPPED
                    rest.pending = None
                exit_ = child.last_exit or ChildExit(
                    child.spec.id, ExitKind.ABNORMAL, trio.current_time(), failure.exc
                )
                self._post(_Exited(child, child.generation, exit_))
                return

    # ------------------------------------------------------------- events

    def subscribe(self, max_buffer: int = 256) -> trio.MemoryReceiveChannel[SupervisorEvent]:
        """A channel receiving every lifecycle event from now on.

        Close the receive end to unsubscribe. Events beyond ``max_buffer``
        unread ones are dropped for that subscriber (counted in ``dropped_events``).
        """
        send, receive = trio.open_memory_channel[SupervisorEvent](max_buffer)
        self._subscribers.append(send)
        return receive

    def _emit(
        self,
        kind: EventKind,
        child_id: str | None,
        *,
        exit: ChildExit | None = None,
        delay: float | None = None,
    ) -> None:
        if self._subscribers:
            event = SupervisorEvent(kind, self.name, child_id, trio.current_time(), exit, delay)
            for send in list(self._subscribers):
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    self.dropped_events += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(send)
        self._log(kind, child_id, exit, delay)

    def _log_crash(self, child_id: str | None, exit: ChildExit) -> None:
        """One WARNING per child per ``period``; repeats within it go to DEBUG.

        A child crashing in a tight loop would otherwise flood the log with
        the same line; the next WARNING after the quiet spell says how many
        crashes it summarises. Tracebacks only at DEBUG (escalation logs one at ERROR).
        """
        key = child_id or ""
        last, suppressed = self._crash_log.get(key, (None, 0))
        if last is not None and exit.time - last < self.spec.period:
            self._crash_log[key] = (last, suppressed + 1)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s: child %r exited abnormally again: %s",
                    self.name,
                    child_id,
                    exit.reason,
                    exc_info=exit.exception,
                )
            return
        if len(self._crash_log) >= 1024:  # dynamic children come and go: stay bounded
            self._crash_log.pop(next(iter(self._crash_log)))
        self._crash_log[key] = (exit.time, 0)
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "%s: child %r exited abnormally: %s%s",
                self.name,
                child_id,
                exit.reason,
                f" (and {suppressed} more times in the last {self.spec.period:g}s)"
                if suppressed
                else "",
                exc_info=exit.exception if logger.isEnabledFor(logging.DEBUG) else None,
            )

    def _log(
        self, kind: EventKind, child_id: str | None, exit: ChildExit | None, delay: float | None
    ) -> None:
        if kind is EventKind.CHILD_EXITED:
            assert exit is not None
            if exit.kind is ExitKind.ABNORMAL and not exit.requested:
                self._log_crash(child_id, exit)
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: child %r exited (%s)", self.name, child_id, exit.reason)
        elif kind is EventKind.CHILD_STARTED:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: child %r started", self.name, child_id)
        elif kind is EventKind.CHILD_RESTARTING:
            if logger.isEnabledFor(logging.INFO):
                logger.info("%s: restarting child %r in %.3gs", self.name, child_id, delay or 0.0)
        elif kind is EventKind.CHILD_UNRESPONSIVE:
            logger.warning(
                "%s: child %r still running after cancellation (shielded?); waiting",
                self.name,
                child_id,
            )
        elif kind is EventKind.SUPERVISOR_ESCALATED:
            assert exit is not None
            logger.error(
                "%s: restart intensity exceeded (%d in %gs) after child %r exited: %s; giving up",
                self.name,
                self.spec.intensity,
                self.spec.period,
                child_id,
                exit.reason,
                exc_info=exit.exception,
            )
        elif kind is EventKind.SUPERVISOR_AUTO_SHUTDOWN:
            assert exit is not None
            logger.info(
                "%s: significant child %r exited (%s); shutting down",
                self.name,
                child_id,
                exit.reason,
            )

    # ----------------------------------------------------------- public API

    def _require_running(self) -> None:
        if not self._running or self._tearing_down:
            raise RuntimeError(f"supervisor {self.name!r} is not running")

    def _find(self, child_id: str) -> _Child:
        child = self._ids.get(child_id)
        if child is None:
            raise LookupError(f"supervisor {self.name!r} has no child {child_id!r}")
        return child

    async def start_child(self, spec: ChildSpec) -> Any:
        """Add a child and start it; returns what it passed to ``task_status.started``.

        Raises:
            ValueError: the id is taken, or the child cannot belong here (significance).
            ChildStartError: it failed to start (it is not kept).
        """
        self._require_running()
        self.spec.check_child(spec)
        await trio.lowlevel.checkpoint_if_cancelled()
        # A child started with nursery.start() makes this call a schedule point
        # anyway; only a child started at once needs the lock's own.
        lock = self._lock
        await lock.acquire(checkpoint=not spec.accepts_task_status)
        try:
            self._require_running()
            if spec.id in self._ids:
                raise ValueError(f"supervisor {self.name!r} already has a child {spec.id!r}")
            child = _Child(spec)
            self._children.append(child)
            self._ids[spec.id] = child
            try:
                await self._start(child)
            except _StartFailedError as failure:
                self._drop(child)
                raise ChildStartError(
                    self.name, spec.id, describe_exception(failure.exc)
                ) from failure.exc
            return child.value
        finally:
            lock.release()

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child on purpose (no restart). A ``TEMPORARY`` child is then removed."""
        self._require_running()
        await self._lock.acquire(checkpoint=True)
        try:
            await self._terminate(self._find(child_id))
        finally:
            self._lock.release()

    async def restart_child(self, child_id: str) -> Any:
        """Stop the child if it runs, then start it again (not counted against intensity)."""
        self._require_running()
        await self._lock.acquire(checkpoint=True)
        try:
            child = self._find(child_id)
            if child.state is not ChildState.STOPPED:
                index = self._children.index(child)
                await self._terminate(child)
                if not self._has(child):  # a TEMPORARY child keeps its place here
                    self._children.insert(index, child)
                    self._ids[child_id] = child
            child.restart_count += 1
            try:
                await self._start(child)
            except _StartFailedError as failure:
                if child.spec.restart is Restart.TEMPORARY:
                    self._drop(child)  # it has ended: a temporary child is not kept
                raise ChildStartError(
                    self.name, child_id, describe_exception(failure.exc)
                ) from failure.exc
            return child.value
        finally:
            self._lock.release()

    async def delete_child(self, child_id: str) -> None:
        """Forget a stopped child's spec.

        Raises:
            RuntimeError: the child is still running (terminate it first).
        """
        self._require_running()
        await self._lock.acquire(checkpoint=True)
        try:
            child = self._find(child_id)
            if child.state in (*_LIVE, ChildState.STOPPING):
                raise RuntimeError(
                    f"child {child_id!r} of {self.name!r} is running; terminate it first"
                )
            child.pending = None
            self._drop(child)
        finally:
            self._lock.release()

    def which_children(self) -> list[ChildInfo]:
        """The children in start order."""
        return [
            ChildInfo(c.spec.id, c.state, c.spec.restart.value, isinstance(c.value, Supervisor))
            for c in self._children
        ]

    def count_children(self) -> ChildCounts:
        children = self._children
        supervisors = sum(1 for c in children if isinstance(c.value, Supervisor))
        return ChildCounts(
            specs=len(children),
            active=sum(1 for c in children if c.state in _LIVE),
            supervisors=supervisors,
            workers=len(children) - supervisors,
        )

    def snapshot(self) -> SupervisorSnapshot:
        """A frozen, JSON-convertible picture of this supervisor and those below it."""
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # called from outside Trio (e.g. another thread)
            now = None
        in_window = len(self._restarts)
        if now is not None:
            in_window = sum(1 for t, _ in self._restarts if t > now - self.spec.period)
        children = []
        for c in self._children:
            running = c.state in _LIVE or c.state is ChildState.STOPPING
            nested = c.value.snapshot() if isinstance(c.value, Supervisor) and running else None
            uptime = None
            if running and now is not None and c.started_at is not None:
                uptime = now - c.started_at
            children.append(
                ChildSnapshot(
                    id=c.spec.id,
                    state=c.state,
                    restart=c.spec.restart.value,
                    significant=c.spec.significant,
                    restart_count=c.restart_count,
                    last_exit_kind=c.last_exit.kind if c.last_exit else None,
                    last_exit_reason=c.last_exit.reason if c.last_exit else None,
                    started_at=c.started_wall,
                    uptime=uptime,
                    supervisor=nested,
                )
            )
        return SupervisorSnapshot(
            name=self.name,
            strategy=self.spec.strategy.value,
            running=self._running,
            restarts_in_window=in_window,
            intensity=self.spec.intensity,
            period=self.spec.period,
            children=tuple(children),
        )

    async def shutdown(self) -> None:
        """Stop every child in reverse start order and make ``run()`` return.

        Waits for ``run()`` to finish, except when called from one of this
        supervisor's own children (that would wait for itself).
        """
        if not self._running:
            return
        self._post(_SHUTDOWN)
        ctx = _current_child.get()
        if (
            ctx is not None
            and ctx.supervisor == self.name
            and any(c.ctx is ctx for c in self._children)
        ):
            return
        if self._finished is None:
            self._finished = trio.Event()
        await self._finished.wait()


@asynccontextmanager
async def open_supervisor(spec: SupervisorSpec) -> AsyncIterator[Supervisor]:
    """Run a :class:`Supervisor` for the duration of an ``async with`` block.

    The block starts once every child has started; leaving it shuts the
    supervisor down gracefully (children stop in reverse order). If the
    supervisor gives up while the block runs, the block is cancelled and the
    supervisor's exception (e.g. ``RestartIntensityExceeded``) is raised bare.
    """
    sup = Supervisor(spec)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            try:
                yield sup
            except (
                BaseException
            ) as exc:  # re-raised below, outside the nursery, so it is not grouped
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await sup.shutdown()
    except BaseExceptionGroup as group:
        raise_saving_context(collapse_group(group))
    if body_error is not None:
        raise_saving_context(body_error)
