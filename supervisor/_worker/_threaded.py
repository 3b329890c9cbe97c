"""``ThreadedWorker``: a worker for hosts that do not run Trio (GUIs, thread-based services).

Trio runs in one background thread; the host talks to it through a small
thread-safe facade:

- ``start()`` returns once the worker's tree is up, or raises its start error;
- ``submit()`` never blocks: it hands the request to the loop and returns a
  :class:`WorkHandle` at once;
- ``handle.result(timeout)`` waits for the outcome (``ResultTimeout``, a
  ``TimeoutError``, when it does not come in time);
- ``stop()`` drains (running sessions get ``drain_timeout``), stops the loop,
  and fails every handle still pending with :class:`WorkCancelled`, so no
  caller is left waiting forever.

Blocking calls made from the loop's own thread raise instead of deadlocking.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from .._base._exceptions import SupervisorError
from .._base._groups import collapse_group
from .._base._lane import Offload
from ..controlplane._models import Outcome, OutcomeStatus, RetryPolicy
from ..controlplane._protocol import ControlPlane
from ..controlplane._store._common import check_labels, check_timeout
from ._agent import AgentFunction, AgentSpec
from ._config import WorkerConfig
from ._lease import KeeperOptions
from ._session import Workspaces
from ._worker import Worker

__all__ = ["ResultTimeout", "ThreadedWorker", "WorkCancelled", "WorkHandle"]


class ResultTimeout(SupervisorError, TimeoutError):
    """``WorkHandle.result(timeout)`` ran out of time (the work goes on)."""


class WorkCancelled(SupervisorError):
    """The work will not produce a result: the handle was cancelled or the worker stopped.

    Attributes:
        item_id: the work item, if it had been submitted.
        outcome: the outcome recorded for it, if one was (usually ``cancelled``).
    """

    def __init__(self, message: str, *, item_id: str | None = None, outcome: Outcome | None = None):
        super().__init__(message)
        self.item_id = item_id
        self.outcome = outcome


class WorkHandle:
    """The host's view of one submitted session. Thread-safe."""

    def __init__(
        self,
        owner: ThreadedWorker,
        prompt: str,
        metadata: dict[str, str],
        retry: RetryPolicy | None = None,
        schedule: tuple[int, float | None, float | None] = (0, None, None),
        key: str | None = None,
        routing: tuple[tuple[str, ...], float | None] = ((), None),
    ) -> None:
        self._owner = owner
        self.prompt = prompt
        self.metadata = metadata
        self.retry = retry
        self.priority, self.delay, self.not_before = schedule
        self.key = key
        self.labels, self.timeout = routing
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._item_id: str | None = None
        self._outcome: Outcome | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self._scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "pending"
        return f"<WorkHandle item={self._item_id!r} {state}>"

    @property
    def item_id(self) -> str | None:
        """The work item's id once it was submitted (``None`` until then)."""
        return self._item_id

    def done(self) -> bool:
        """Whether ``result()`` would return or raise at once."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Outcome:
        """The session's outcome, waiting up to ``timeout`` seconds (``None``: forever).

        Raises:
            ResultTimeout: not done in time (the work continues; call again later).
            WorkCancelled: cancelled, or the worker stopped before the work ended.
            RuntimeError: called from the worker's own loop thread (it would deadlock).
            SupervisorError: the submission itself failed (e.g. the control plane refused it).
        """
        self._owner._refuse_loop_thread("WorkHandle.result")
        if not self._done.wait(timeout):
            raise ResultTimeout(
                f"no result for {self._item_id or 'the submission'} within {timeout}s"
            )
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def cancel(self) -> bool:
        """Stop the work: the session is cancelled and ``result()`` raises ``WorkCancelled``.

        Returns ``False`` if the work had already ended. Never blocks.
        """
        with self._lock:
            if self._done.is_set():
                return False
            self._cancel_requested = True
        # Failed first: the loop side, once it cancels the work, resolves the handle
        # itself ("the worker stopped ..."), and the caller's reason must win.
        self._fail(WorkCancelled("cancelled by the caller", item_id=self._item_id))
        self._owner._call_soon(self._cancel_in_loop)
        return True

    # --- loop side ----------------------------------------------------------

    def _cancel_in_loop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        worker = self._owner._worker
        if self._item_id is not None and worker is not None and worker.running:
            self._owner._spawn(self._request_stop, self._item_id)

    async def _request_stop(self, item_id: str) -> None:
        worker = self._owner._worker
        if worker is not None and worker.running:
            try:
                await worker.cancel(item_id, "cancelled by the caller")
            except SupervisorError:
                pass  # already stopped, or the control plane is gone: nothing left to stop

    def _resolve(self, outcome: Outcome) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._outcome = outcome
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()


class ThreadedWorker:
    """Runs a :class:`Worker` in a background thread with its own Trio loop.

    Args:
        config: the worker's settings.
        control_plane, agent, base_env, keeper_options, rng, workspaces, offload:
            passed to :class:`Worker`. A given control plane must not be used by
            another Trio loop at the same time.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        control_plane: ControlPlane | None = None,
        agent: AgentFunction | AgentSpec | None = None,
        base_env: Mapping[str, str] | None = None,
        keeper_options: KeeperOptions | None = None,
        rng: random.Random | None = None,
        workspaces: Workspaces | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.config = config
        # The worker is made in the background thread, where its Trio loop runs.
        self._make_worker = functools.partial(
            Worker,
            config,
            control_plane=control_plane,
            agent=agent,
            base_env=base_env,
            keeper_options=keeper_options,
            rng=rng,
            workspaces=workspaces,
            offload=offload,
        )
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._worker: Worker | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._handles: set[WorkHandle] = set()
        self._handles_lock = threading.Lock()
        self._stop_requested: trio.Event | None = None
        self._drain = True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    @property
    def worker(self) -> Worker | None:
        """The worker running in the loop thread (touch it only from that thread)."""
        return self._worker

    # --- lifecycle ------------------------------------------------------------

    def start(self, timeout: float | None = 60.0) -> None:
        """Start the loop thread; returns once the worker is ready.

        Raises:
            RuntimeError: already running, or called from the loop thread.
            ResultTimeout: not ready within ``timeout``.
            ConfigError (or the worker's other start errors): the worker could not start.
        """
        self._refuse_loop_thread("ThreadedWorker.start")
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this ThreadedWorker is already running")
        self._ready = threading.Event()
        self._start_error = None
        self._worker = None
        thread = self._thread = threading.Thread(
            target=self._thread_main, name=f"supervisor-{self.config.worker_id}", daemon=True
        )
        thread.start()
        if not self._ready.wait(timeout):
            self.stop(drain=False)
            raise ResultTimeout(f"the worker did not start within {timeout}s")
        error = self._failed_start()
        if error is not None:
            thread.join()
            self._thread = None
            raise error

    def _failed_start(self) -> BaseException | None:
        return self._start_error  # set by the loop thread

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the worker and its thread; pending handles raise :class:`WorkCancelled`.

        Args:
            drain: let running sessions finish for ``config.drain_timeout`` first
                (they are cancelled after that); ``False`` cancels them at once.
            timeout: how long to wait for the thread (``None``: as long as it takes,
                which is bounded by the drain timeout and the agents' grace).
        """
        self._refuse_loop_thread("ThreadedWorker.stop")
        thread = self._thread
        if thread is None:
            return
        self._drain = drain
        if self._token is not None and self._stop_requested is not None:
            event = self._stop_requested
            try:
                self._token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)
        if thread.is_alive():
            raise ResultTimeout(f"the worker thread did not stop within {timeout}s")
        self._thread = None
        self._fail_pending("the worker stopped before this work ended")

    def __enter__(self) -> ThreadedWorker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- work -----------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: float | None = None,
        key: str | None = None,
        labels: Sequence[str] | None = None,
        timeout: float | None = None,
        **metadata: str,
    ) -> WorkHandle:
        """Queue a session; returns its handle at once (never blocks).

        ``retry`` retries failed sessions with backoff (see `RetryPolicy`); the
        handle resolves with the item's final outcome, not an attempt's.
        ``priority``, ``delay``, ``not_before``, ``key``, ``labels`` and
        ``timeout`` as for `Worker.submit` (a handle of a key already used
        follows the first item).

        Raises:
            BadRequest: bad ``labels`` or ``timeout``, here in the calling
                thread; nothing is queued.
        """
        routing = (check_labels(labels), check_timeout(timeout))
        handle = WorkHandle(
            self, prompt, dict(metadata), retry, (priority, delay, not_before), key, routing
        )
        if not self.running:
            handle._fail(WorkCancelled("the worker is not running"))
            return handle
        with self._handles_lock:
            self._handles.add(handle)
        self._call_soon(lambda: self._spawn(self._serve, handle))
        return handle

    # --- loop thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as raised:  # reported to start() or to the pending handles
            exc = collapse_group(raised) if isinstance(raised, BaseExceptionGroup) else raised
            if not self._ready.is_set():
                self._start_error = exc
            else:
                self._fail_pending(f"the worker stopped: {exc}")
        finally:
            self._token = None
            self._nursery = None
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_requested = trio.Event()
        worker = self._worker = self._make_worker()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            async def run_worker(*, task_status: trio.TaskStatus[Worker]) -> None:
                try:
                    await worker.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()

            await nursery.start(run_worker)
            self._ready.set()
            await self._stop_requested.wait()
            if self._drain:
                await worker.drain()
            nursery.cancel_scope.cancel()
        self._fail_pending("the worker stopped before this work ended")

    async def _serve(self, handle: WorkHandle) -> None:
        worker = self._worker
        assert worker is not None
        try:
            with trio.CancelScope() as scope:
                handle._scope = scope
                if handle._cancel_requested:
                    scope.cancel()
                item_id = await worker.submit(
                    handle.prompt,
                    retry=handle.retry,
                    priority=handle.priority,
                    delay=handle.delay,
                    not_before=handle.not_before,
                    key=handle.key,
                    labels=handle.labels,
                    timeout=handle.timeout,
                    **handle.metadata,
                )
                handle._item_id = item_id
                outcome = await worker.wait(item_id)
                if outcome.status is OutcomeStatus.CANCELLED:
                    handle._fail(
                        WorkCancelled(
                            f"work item {item_id} was cancelled: {outcome.reason or 'no reason'}",
                            item_id=item_id,
                            outcome=outcome,
                        )
                    )
                else:
                    handle._resolve(outcome)
        except SupervisorError as exc:
            handle._fail(exc)
        finally:
            with self._handles_lock:
                self._handles.discard(handle)
            # Cancelled (the worker is stopping) before an answer, for instance
            # while the item was still queued: out of ``_handles`` now, so no
            # later sweep would answer it. Never blocks: safe while cancelled.
            handle._fail(
                WorkCancelled("the worker stopped before this work ended", item_id=handle._item_id)
            )

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    def _fail_pending(self, message: str) -> None:
        with self._handles_lock:
            pending, self._handles = list(self._handles), set()
        for handle in pending:
            handle._fail(WorkCancelled(message, item_id=handle.item_id))

    def _refuse_loop_thread(self, what: str) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError(f"{what}() called from the worker's own loop thread would deadlock")
