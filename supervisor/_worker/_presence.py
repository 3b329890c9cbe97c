"""Presence: the worker's own heartbeat to the control plane (DESIGN §3.6).

Every ``presence_interval`` seconds :class:`Presence` sends a
:class:`~supervisor.controlplane.PresenceReport`; the control plane answers
with the worker's status, evaluated by the §4 table (``online``,
``degraded``, ...). What the report carries, and why:

* ``error_rate``: errors ÷ requests of *every* control-plane call the worker
  made (poller, lease keepers, presence itself) since the last report the
  control plane accepted. :class:`CountingControlPlane` counts them on their
  way through. An error is a call that failed to get a usable answer: a
  transient failure (no answer, 5xx, 408, 429) or a refusal of the call
  itself (401, 400, an unexpected status). Answers about an item's state
  (409 already stopped, 412 the lease moved on, 404, 410) are the protocol
  working, not the worker failing, so they count as requests only. A
  cancelled call counts as neither.
* The counters are reset only after the control plane *accepted* a report
  (a 2xx answer, decoded), and only by what that report covered: a report
  that failed, on any status, leaves them alone, so its failure shows up in
  the next report's rate (the reference loop reset them whatever the answer,
  which hid exactly the failures it was meant to report).
* While the runtime is wedged: ``runtime_state: "wedged"`` and the wedge
  reason as ``sample_error``; otherwise the last error since the last
  accepted report.
* ``runtime_metadata`` (capabilities, capacity, version) comes from a
  provider that may fail: a report is never skipped because of it, it then
  goes out with empty metadata.

Auth: a 401 makes the HTTP control plane re-read its key file once and retry
the call once (``HttpControlPlane``'s key provider does that for every call,
presence included). Transport: after ``reconnect_after`` reports in a row
that got no answer at all, the control plane's client is replaced
(``reconnect()``, when the control plane has one).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, cast, runtime_checkable

import attrs
import trio

from .._base._describe import describe_exception
from .._version import __version__
from ..controlplane._exceptions import (
    Conflict,
    ControlPlaneError,
    ControlPlaneUnavailable,
    FencingConflict,
    Gone,
    NotFound,
)
from ..controlplane._models import PresenceReport, WorkerRecord
from ..controlplane._protocol import ControlPlane
from ..controlplane._status import WEDGED
from ._wedge import WedgeState

__all__ = [
    "Activity",
    "CountingControlPlane",
    "Presence",
    "PresenceStatistics",
    "Reconnectable",
    "RequestCounter",
    "counting_control_plane",
]

logger = logging.getLogger("supervisor.presence")

#: Refusals that answer for an item's or worker's state: requests, but not errors.
STATE_ANSWERS: Final = (Conflict, FencingConflict, NotFound, Gone)
#: Coroutine methods that are no request to the control plane (never counted).
NOT_REQUESTS: Final = frozenset({"aclose", "reconnect"})
#: The longest ``sample_error`` sent.
MAX_SAMPLE_CHARS: Final = 300


def _describe(exc: BaseException) -> str:
    return describe_exception(exc, one_line=True, limit=MAX_SAMPLE_CHARS)


@attrs.define(eq=False)
class RequestCounter:
    """Control-plane requests and errors since the last accepted presence report.

    Attributes:
        requests: calls that ended (answered or failed) since the last reset.
        errors: those of them that failed (see the module notes).
        sample_error: the last error's type and message, since the last reset.
        total_requests: calls since the counter was made (never reset).
        total_errors: failed calls since the counter was made (never reset).
    """

    requests: int = 0
    errors: int = 0
    sample_error: str | None = None
    total_requests: int = 0
    total_errors: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def succeeded(self) -> None:
        self.requests += 1
        self.total_requests += 1

    def failed(self, exc: BaseException) -> None:
        self.requests += 1
        self.errors += 1
        self.total_requests += 1
        self.total_errors += 1
        self.sample_error = _describe(exc)

    def record(self, exc: BaseException | None) -> None:
        """Count one ended call: ``None`` for an answer, else what it raised."""
        if exc is None or isinstance(exc, STATE_ANSWERS):
            self.succeeded()
        else:
            self.failed(exc)

    def take(self) -> tuple[int, int, str | None]:
        """The figures a report is about to carry: ``(requests, errors, sample_error)``."""
        return self.requests, self.errors, self.sample_error

    def settle(self, requests: int, errors: int) -> None:
        """Forget what an accepted report covered; calls made meanwhile stay counted."""
        self.requests = max(0, self.requests - requests)
        self.errors = max(0, self.errors - errors)
        if self.errors == 0:
            self.sample_error = None


class CountingControlPlane:
    """A ``ControlPlane`` that counts every call into a :class:`RequestCounter`.

    Every coroutine method of the wrapped control plane is counted, including
    methods the protocol gains later (they are forwarded dynamically, like
    ``TimedControlPlane`` does); plain attributes pass through untouched. Use
    :func:`counting_control_plane` for a statically typed one.

    Args:
        inner: the control plane doing the work (not closed by this wrapper).
        counter: where the counts go.
    """

    def __init__(self, inner: ControlPlane, counter: RequestCounter) -> None:
        self.inner = inner
        self.counter = counter

    def __repr__(self) -> str:
        return f"<CountingControlPlane {self.inner!r}>"

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    async def aclose(self) -> None:
        """Does nothing: the wrapped control plane belongs to whoever opened it."""
        await trio.lowlevel.checkpoint()

    def __getattr__(self, name: str) -> Any:
        member = getattr(self.inner, name)
        if name.startswith("_") or name in NOT_REQUESTS or not inspect.iscoroutinefunction(member):
            return member
        return functools.partial(self._counted, member)

    async def _counted(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await method(*args, **kwargs)
        except Exception as exc:
            # Cancellation is not an Exception: a cancelled call counts as nothing.
            self.counter.record(exc)
            raise
        self.counter.record(None)
        return result


def counting_control_plane(inner: ControlPlane, counter: RequestCounter) -> ControlPlane:
    """``inner`` with every call counted into ``counter`` (typed as the protocol)."""
    return cast(ControlPlane, CountingControlPlane(inner, counter))


@runtime_checkable
class Reconnectable(Protocol):
    """A control plane whose connections can be replaced (``HttpControlPlane``)."""

    async def reconnect(self) -> bool: ...


@attrs.frozen
class Activity:
    """What the worker is doing, for a presence report.

    Attributes:
        status: ``idle``, ``working``, ``busy`` (every slot taken) or ``draining``.
        active_tasks: sessions running now.
        current_task: the work item of the most recently started running session.
    """

    status: str = "idle"
    active_tasks: int = 0
    current_task: str | None = None


@attrs.frozen
class PresenceStatistics:
    """What the presence loop did so far.

    Attributes:
        reports: reports sent (accepted or not).
        accepted: reports the control plane accepted.
        failures: reports that failed.
        consecutive_failures: failures since the last accepted report.
        reconnects: times the control plane's client was replaced.
        metadata_failures: reports sent without metadata because the provider failed.
        last_status: the worker status in the last accepted answer.
        last_report: the last report sent.
    """

    reports: int
    accepted: int
    failures: int
    consecutive_failures: int
    reconnects: int
    metadata_failures: int
    last_status: str | None
    last_report: PresenceReport | None


def default_version() -> str:
    """This package's version."""
    return __version__


class Presence:
    """The presence loop: a report every ``interval`` seconds, forever.

    A plain Trio service (``await nursery.start(presence.run)``) meant to run
    as a ``PERMANENT`` child of the worker's ``services`` supervisor: a report
    that fails is logged and retried at the next interval; nothing the control
    plane answers ends the loop.

    Args:
        control_plane: where reports go; pass the worker's counting wrapper,
            so that the presence calls count in the error rate like any other.
        worker_id: the worker reporting.
        counter: the worker's request counter (read, and settled after each
            accepted report).
        wedge: the worker's wedge flag.
        interval: seconds between reports.
        activity: what the worker is doing now.
        metadata: ``runtime_metadata`` for each report; may raise or return
            something that is not JSON: the report then goes without it.
        reconnect_after: reports in a row that got no answer before the
            control plane's client is replaced.

    Raises:
        ValueError: ``interval`` or ``reconnect_after`` out of range.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        *,
        worker_id: str,
        counter: RequestCounter,
        wedge: WedgeState,
        interval: float = 30.0,
        activity: Callable[[], Activity] | None = None,
        metadata: Callable[[], Mapping[str, Any]] | None = None,
        reconnect_after: int = 3,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"presence interval must be a positive number, got {interval!r}")
        if reconnect_after < 1:
            raise ValueError(f"reconnect_after must be >= 1, got {reconnect_after!r}")
        self.control_plane = control_plane
        self.worker_id = worker_id
        self.counter = counter
        self.wedge = wedge
        self.interval = interval
        self._activity = activity or Activity
        self._metadata = metadata or dict
        self.reconnect_after = reconnect_after
        self._started_at: float | None = None
        self._reports = 0
        self._accepted = 0
        self._failures = 0
        self._consecutive = 0
        self._unanswered = 0
        self._reconnects = 0
        self._metadata_failures = 0
        self._metadata_warned = False
        self._last_status: str | None = None
        self._last_report: PresenceReport | None = None
        self._gone_reported = False

    def __repr__(self) -> str:
        return f"<Presence worker_id={self.worker_id!r} interval={self.interval:g}>"

    def statistics(self) -> PresenceStatistics:
        return PresenceStatistics(
            reports=self._reports,
            accepted=self._accepted,
            failures=self._failures,
            consecutive_failures=self._consecutive,
            reconnects=self._reconnects,
            metadata_failures=self._metadata_failures,
            last_status=self._last_status,
            last_report=self._last_report,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report at once, then every ``interval`` seconds, until cancelled."""
        if self._started_at is None:
            self._started_at = trio.current_time()
        task_status.started()
        next_at = trio.current_time()
        while True:
            await self.report_once()
            next_at = max(next_at + self.interval, trio.current_time())
            await trio.sleep_until(next_at)

    def build_report(self) -> tuple[PresenceReport, int, int]:
        """The next report, and the request and error counts it covers."""
        if self._started_at is None:
            self._started_at = trio.current_time()
        requests, errors, sample = self.counter.take()
        try:
            activity = self._activity()
        except Exception:
            logger.exception("presence: reading the worker's activity failed")
            activity = Activity()
        reason = self.wedge.reason
        report = PresenceReport(
            worker_id=self.worker_id,
            status=activity.status,
            error_rate=min(1.0, errors / requests) if requests else 0.0,
            sample_error=reason if reason is not None else sample,
            active_tasks=activity.active_tasks,
            current_task=activity.current_task,
            uptime_seconds=max(0.0, trio.current_time() - self._started_at),
            runtime_state=WEDGED if reason is not None else None,
            runtime_metadata=self._safe_metadata(),
        )
        return report, requests, errors

    async def report_once(self) -> WorkerRecord | None:
        """Send one report; the control plane's answer, or ``None`` if it failed.

        Never raises a control-plane error (it is logged and counted);
        cancellation passes through.
        """
        report, requests, errors = self.build_report()
        self._reports += 1
        self._last_report = report
        try:
            record = await self.control_plane.worker_heartbeat(report)
        except ControlPlaneError as exc:
            await self._failed(exc)
            return None
        self._accepted += 1
        self._consecutive = 0
        self._unanswered = 0
        self.counter.settle(requests, errors)
        previous, self._last_status = self._last_status, record.status.value
        if previous != self._last_status:
            logger.info(
                "presence: the control plane sees worker %s as %s",
                self.worker_id,
                self._last_status,
            )
        return record

    async def _failed(self, exc: ControlPlaneError) -> None:
        self._failures += 1
        self._consecutive += 1
        if isinstance(exc, Gone):
            if not self._gone_reported:
                self._gone_reported = True
                logger.error(
                    "presence: worker %s was deregistered on the control plane; its reports "
                    "are refused (%s)",
                    self.worker_id,
                    exc,
                )
            return
        # One warning per run of failures; a long outage must not flood the log.
        log = logger.warning if self._consecutive == 1 else logger.debug
        log("presence report failed (%d in a row): %s", self._consecutive, _describe(exc))
        if not isinstance(exc, ControlPlaneUnavailable):
            self._unanswered = 0
            return
        self._unanswered += 1
        if self._unanswered >= self.reconnect_after and isinstance(
            self.control_plane, Reconnectable
        ):
            self._unanswered = 0
            try:
                replaced = await self.control_plane.reconnect()
            except Exception:
                logger.exception("presence: replacing the control plane client failed")
                return
            if replaced:
                self._reconnects += 1
                logger.info(
                    "presence: no answer %d times in a row; the control plane client was replaced",
                    self.reconnect_after,
                )

    def _safe_metadata(self) -> Mapping[str, Any]:
        """The provider's metadata if it works and is JSON; empty otherwise."""
        try:
            metadata = dict(self._metadata())
            json.dumps(metadata, allow_nan=False)
        except Exception as exc:
            self._metadata_failures += 1
            if not self._metadata_warned:
                self._metadata_warned = True
                logger.warning(
                    "presence: runtime metadata unavailable, reporting without it: %s",
                    _describe(exc),
                )
            return {}
        return metadata
