"""``ThreadLane``: one long-lived thread that runs short blocking calls for Trio tasks.

`trio.to_thread.run_sync` is the right tool for an occasional blocking call.
A worker makes several per session (store calls, a workspace directory, a log
file, a journal line), and at hundreds of sessions a second the hand-over
itself becomes the cost: a thread woken per call, a context copied, a
capacity limiter taken, one wake-up of the event loop per result. Measured
with 8 tasks making trivial calls, a lane costs about 8 µs of CPU per call
against about 60 µs for ``to_thread`` (``benchmarks/throughput.py`` shows the
effect on a whole worker).

A lane is one thread and a FIFO queue:

* calls run one at a time, in the order they were made, so a lane suits work
  that is serialised anyway (one SQLite connection) or is short (a
  ``mkdir``). Anything that may take long (removing a large tree, ``git``)
  belongs in ``trio.to_thread``, where it holds up nobody else;
* results go back to Trio in batches: one wake-up of the event loop for every
  call the thread finished while the loop was busy;
* a call still waiting in the queue is cancellable (it then never runs); a
  call already running is waited for, and the cancellation is delivered at
  the caller's next checkpoint, as with ``to_thread.run_sync``'s default;
* the thread starts on the first call and exits after ``idle_timeout``
  seconds without work (or at `close`), so a lane nobody closed leaks no thread
  for long.

Under ``trio.testing.MockClock`` with autojump a task waiting on a lane
counts as blocked, exactly as with ``to_thread``: simulations call inline instead.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import queue
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["Offload", "ThreadLane"]

_T = TypeVar("_T")

logger = logging.getLogger("supervisor")

#: Runs ``fn(*args)`` away from the event loop and returns its result:
#: ``trio.to_thread.run_sync``, a `ThreadLane`'s ``run``, or an inline call in
#: a ``MockClock`` simulation.
Offload = Callable[..., Awaitable[Any]]


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ABANDONED = "abandoned"


class _Job(Generic[_T]):
    __slots__ = ("args", "fn", "result", "state", "task", "token")

    def __init__(
        self,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        task: trio.lowlevel.Task | None,
        token: trio.lowlevel.TrioToken | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.token = token
        self.state = _State.QUEUED
        self.result: outcome.Outcome[_T] | None = None


_STOP = object()


class ThreadLane:
    """Runs blocking calls in one thread of its own, in order; see the module notes.

    Args:
        name: the thread's name (it shows in ``ps -L``, ``py-spy`` and tracebacks).
        idle_timeout: seconds without a call after which the thread exits; the
            next call starts a new one.
    """

    def __init__(self, name: str, *, idle_timeout: float = 10.0) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0, got {idle_timeout!r}")
        self.name = name
        self.idle_timeout = idle_timeout
        self._queue: queue.SimpleQueue[_Job[Any] | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False  # the thread saw the stop mark (read by that thread only)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._thread else "idle"
        return f"<ThreadLane {self.name!r} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in the lane's thread; its result, or its exception raised here.

        Raises:
            RuntimeError: the lane is closed.
            trio.Cancelled: cancelled while the call was still queued (it never runs).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._enqueue(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state is _State.QUEUED:
                    job.state = _State.ABANDONED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED  # running: its result arrives, then Cancelled

        result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def submit(self, fn: Callable[[], object]) -> None:
        """Queue ``fn()`` to run in the lane's thread, in order, without waiting for it.

        For writes nobody waits on (a session's log): the caller goes on at once,
        and a later `run` on the same lane returns only after ``fn`` ran, so it
        serves as a barrier. ``fn`` must handle its own errors; anything it
        raises is logged and dropped.

        Raises:
            RuntimeError: the lane is closed.
        """
        job: _Job[Any] = _Job(_logged(fn), (), None, None)
        self._enqueue(job)

    def _enqueue(self, job: _Job[Any]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"thread lane {self.name!r} is closed")
            self._queue.put(job)
            if self._thread is None:
                thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                try:
                    thread.start()
                except BaseException:
                    job.state = _State.ABANDONED  # nobody would ever run it
                    raise
                self._thread = thread

    def close(self) -> None:
        """Take no more calls; the thread finishes the queued ones, then exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)

    async def aclose(self) -> None:
        """`close`, then wait for the thread to finish the queued calls and exit."""
        self.close()
        thread = self._thread
        if thread is None or not thread.is_alive():
            await trio.lowlevel.checkpoint()
            return
        await trio.to_thread.run_sync(thread.join)

    def join(self, timeout: float | None = None) -> bool:
        """Wait (blocking) for the thread to exit after `close`; ``True`` once it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # --- the lane's thread -----------------------------------------------------

    def _next(self, *, wait: bool) -> _Job[Any] | None:
        """The next job to run; ``None`` when the queue is empty or the lane stops."""
        while not self._stopping:
            try:
                if wait:
                    item = self._queue.get(timeout=self.idle_timeout)
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return None
            if item is _STOP:
                self._stopping = True
                return None
            assert isinstance(item, _Job)
            with self._lock:
                if item.state is _State.ABANDONED:
                    continue
                item.state = _State.RUNNING
            return item
        return None

    def _main(self) -> None:
        _name_os_thread(self.name)
        while True:
            job = self._next(wait=True)
            if job is None:
                if self._stopping:
                    return
                with self._lock:
                    # Idle: exit, but only with an empty queue and under the lock that
                    # `run` starts threads with, so no call is left behind.
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            done: list[_Job[Any]] = []
            while job is not None:
                job.result = outcome.capture(job.fn, *job.args)
                job.fn = job.args = None  # type: ignore[assignment]
                done.append(job)
                job = self._next(wait=False)
            self._deliver_all(done)

    @staticmethod
    def _deliver_all(done: list[_Job[Any]]) -> None:
        by_token: dict[trio.lowlevel.TrioToken, list[_Job[Any]]] = {}
        for job in done:
            if job.token is not None:  # a `submit`: nobody waits for it
                by_token.setdefault(job.token, []).append(job)
        for token, jobs in by_token.items():
            try:
                token.run_sync_soon(_reschedule, jobs)
            except trio.RunFinishedError:
                pass  # the caller's run is over; nobody waits for these results


def _name_os_thread(name: str) -> None:
    """Give the OS thread the lane's name too (``top -H``, ``ps -L``); best effort, Linux only."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


_PR_SET_NAME = 15


def _reschedule(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        assert job.result is not None and job.task is not None
        trio.lowlevel.reschedule(job.task, job.result)


def _logged(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` for `ThreadLane.submit`: whatever it raises is logged, never lost silently."""

    def call() -> None:
        try:
            fn()
        except Exception:
            logger.exception("a queued call in a thread lane failed: %r", fn)

    return call
