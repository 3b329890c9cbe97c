"""``FaultyControlPlane``: one worker's view of a control plane, with faults on a schedule.

The simulator gives every worker its own wrapper around the one shared
control plane, so a fault hits one worker's link and not the others': the
way a flaky network or a revoked key behaves in a real fleet.

A call goes through the wrapper in three phases, and each fault acts in one:

1. **request**: latency (a delay drawn per call), a partition (the call waits
   until the partition heals), a dead link (the worker was killed: the call
   never arrives);
2. **arrival**: an injected answer instead of the real one -- ``401`` for the
   next few calls of a burst, a spurious ``412`` on a lease call, a ``5xx``
   with some probability, or a timeout (the caller hears nothing for a while,
   then ``ControlPlaneUnavailable``; half of the timed-out requests were
   processed first, so their answer is lost, the ambiguous case that makes a
   fencing token necessary);
3. **response**: latency again, and a partition or a dead link holds the
   answer back.

Faults are plain records on the trio clock (:class:`Fault`); the wrapper
decides everything from them and from its seeded ``random.Random``, so a run
under ``MockClock`` with deterministic scheduling is reproducible exactly.

Every call is reported to ``observer`` as a :class:`CallRecord` once it ends:
whether it reached the real control plane (``processed``), and how it ended
for the caller. Invariant checkers use ``processed`` to know what the control
plane really did, whatever the worker heard.
"""

from __future__ import annotations

import enum
import functools
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import attrs
import trio

from ..controlplane._exceptions import (
    ControlPlaneUnavailable,
    FencingConflict,
    TransientError,
    Unauthorized,
)
from ..controlplane._protocol import ControlPlane

__all__ = ["LEASE_CALLS", "CallRecord", "Fault", "FaultKind", "FaultyControlPlane"]

#: Calls that carry a fencing token, the only ones a spurious 412 makes sense for.
LEASE_CALLS: Final = frozenset({"heartbeat", "stop", "requeue"})
#: Calls whose first positional argument is a work item's id.
_WORK_CALLS: Final = frozenset({"ack", "heartbeat", "stop", "requeue", "request_stop", "get"})


class FaultKind(enum.StrEnum):
    """What a :class:`Fault` does to the calls of its worker."""

    #: Each call waits ``delay`` (request) and ``response_delay`` (answer) seconds.
    LATENCY = "latency"
    #: Each call answers 5xx (not processed) with probability ``rate``.
    ERRORS = "errors"
    #: Each call times out with probability ``rate`` after ``timeout`` seconds.
    TIMEOUTS = "timeouts"
    #: The next ``count`` lease calls (heartbeat, stop, requeue) answer 412.
    FENCING = "fencing"
    #: The next ``count`` calls answer 401.
    UNAUTHORIZED = "unauthorized"
    #: Every call answers 401 from ``start`` on (a revoked key: the worker must give up).
    REVOKED = "revoked"
    #: Calls hang until the partition heals (request and answer alike).
    PARTITION = "partition"
    #: The worker is killed at ``start`` (the wrapper does not act on it; the simulator does).
    KILL = "kill"
    #: The control plane restarts: calls are refused (connection refused) for
    #: ``duration``, and a call processed just before loses its answer. Its
    #: state survives (the store is durable). Scheduled on every worker's link at once.
    RESTART = "restart"
    #: The control plane's wall clock steps by ``offset`` seconds at ``start``
    #: (the simulator applies it; the links do not act on it).
    CLOCK_STEP = "clock-step"


def _pair(value: Iterable[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not (0 <= low <= high and math.isfinite(high)):
        raise ValueError(f"expected 0 <= low <= high, got {(low, high)!r}")
    return (low, high)


@attrs.frozen
class Fault:
    """One scheduled fault on one worker's link, on the trio clock.

    Attributes:
        kind: what it does.
        worker: index of the worker it hits.
        start: trio time it begins.
        duration: how long a window fault lasts (``LATENCY``, ``ERRORS``,
            ``TIMEOUTS``, ``PARTITION``); for ``KILL``, how long until the
            worker is started again (``inf``: never).
        rate: probability per call (``ERRORS``, ``TIMEOUTS``).
        count: calls affected (``FENCING``, ``UNAUTHORIZED``).
        delay: range of the request delay drawn per call (``LATENCY``).
        response_delay: range of the answer delay drawn per call (``LATENCY``).
        timeout: seconds a timed-out call takes to fail (``TIMEOUTS``).
    """

    kind: FaultKind = attrs.field(converter=FaultKind)
    worker: int = attrs.field(validator=attrs.validators.ge(0))
    start: float = attrs.field(validator=attrs.validators.ge(0))
    duration: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    rate: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )
    count: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    delay: tuple[float, float] = attrs.field(default=(0.0, 0.0), converter=_pair)
    response_delay: tuple[float, float] = attrs.field(default=(0.0, 0.0), converter=_pair)
    timeout: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    #: Seconds the control plane's clock steps by (``CLOCK_STEP``; negative: backwards).
    offset: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.duration

    def covers(self, now: float) -> bool:
        """Whether a window fault is in force at ``now``."""
        return self.start <= now < self.end

    def describe(self) -> str:
        """A short stable text (part of a simulation's trace)."""
        text = f"{self.kind.value} w{self.worker} t={self.start:.3f}"
        if self.kind in (FaultKind.FENCING, FaultKind.UNAUTHORIZED):
            return f"{text} x{self.count}"
        if self.kind is FaultKind.REVOKED:
            return text
        if self.kind is FaultKind.CLOCK_STEP:
            return f"{text} by {self.offset:+.3f}s"
        text += f" for {self.duration:.3f}s"
        if self.kind is FaultKind.LATENCY:
            text += f" delay {self.delay[0]:.3f}-{self.delay[1]:.3f}"
            text += f" answer {self.response_delay[0]:.3f}-{self.response_delay[1]:.3f}"
        elif self.kind in (FaultKind.ERRORS, FaultKind.TIMEOUTS):
            text += f" rate {self.rate:.2f}"
        return text


@attrs.frozen
class CallRecord:
    """One call through a :class:`FaultyControlPlane`, reported when it ended.

    Attributes:
        name: the wrapper's name (the worker's, in a simulation).
        op: the method called (``poll``, ``heartbeat``, ...).
        work_id: the work item named by the call, or the item a poll handed out.
        sent_at: trio time the caller made the call.
        ended_at: trio time the call returned, raised or was cancelled.
        processed: whether the real control plane carried it out (its answer
            may still have been lost).
        error: the exception's class name the caller saw, ``"cancelled"``, or
            ``None`` for a normal return.
        injected: the fault that answered instead of the control plane, if any.
        args: the call's keyword arguments (tokens included; keep out of logs).
        result: what the real control plane returned, when processed.
    """

    name: str
    op: str
    work_id: str | None
    sent_at: float
    ended_at: float
    processed: bool
    error: str | None
    injected: str | None = None
    args: dict[str, Any] = attrs.field(factory=dict, repr=False)
    result: Any = attrs.field(default=None, repr=False)


Observer = Callable[[CallRecord], None]


@attrs.define
class _Trip:
    """What happened to one call on its way (filled in as it goes)."""

    processed: bool = False
    injected: str | None = None
    result: Any = None


class FaultyControlPlane:
    """A `ControlPlane` that passes calls to ``inner`` through scheduled faults.

    Every method of ``inner`` is available (looked up on first use), so the
    wrapper follows the protocol as it grows; only which calls count as lease
    calls (:data:`LEASE_CALLS`) is known here.

    Args:
        inner: the real control plane (shared by all wrappers of a fleet).
        faults: the faults of this link; those naming another worker are
            ignored, so one schedule can be handed to every wrapper.
        worker: this link's worker index (matched against ``Fault.worker``).
        rng: the random source of per-call draws (delays, rates).
        name: reported in every :class:`CallRecord`.
        observer: called with each finished call.
    """

    def __init__(
        self,
        inner: ControlPlane,
        faults: Iterable[Fault] = (),
        *,
        worker: int = 0,
        rng: random.Random | None = None,
        name: str = "worker",
        observer: Observer | None = None,
    ) -> None:
        self.inner = inner
        self.worker = worker
        self.name = name
        self.observer = observer
        self._rng = rng if rng is not None else random.Random()
        mine = sorted((f for f in faults if f.worker == worker), key=lambda f: f.start)
        self._windows = [f for f in mine if f.duration > 0 and f.kind is not FaultKind.KILL]
        self._bursts = {
            id(f): f.count
            for f in mine
            if f.kind in (FaultKind.FENCING, FaultKind.UNAUTHORIZED) and f.count > 0
        }
        self._burst_faults = [f for f in mine if id(f) in self._bursts]
        self._revoked_at = min(
            (f.start for f in mine if f.kind is FaultKind.REVOKED), default=math.inf
        )
        self._dead = False
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}
        #: Calls answered by an injected fault, by fault kind.
        self.injected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<FaultyControlPlane {self.name} over {self.inner!r}>"

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    @property
    def dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """Cut the link for good: every call in flight or to come hangs until cancelled.

        Models the network side of a ``kill -9``: whatever the dying worker's
        cancelled tasks still try (a shielded final ``stop``, say) never
        reaches the control plane.
        """
        self._dead = True

    def revive(self) -> None:
        """Reconnect the link (a new incarnation of the worker starts on it)."""
        self._dead = False

    async def aclose(self) -> None:
        """Leaves ``inner`` open: it is shared, and its owner closes it."""
        await trio.lowlevel.checkpoint()

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        method = self._methods.get(op)
        if method is None:
            target = getattr(self.inner, op)
            if not callable(target):
                raise AttributeError(op)
            method = self._methods[op] = functools.partial(self._call, op)
        return method

    # --- the pipeline --------------------------------------------------------

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        sent = trio.current_time()
        work_id = args[0] if op in _WORK_CALLS and args and isinstance(args[0], str) else None
        trip = _Trip()
        error: str | None = "cancelled"
        try:
            result = await self._through(op, args, kwargs, trip)
        except Exception as exc:
            error = type(exc).__name__
            raise
        else:
            error = None
            return result
        finally:
            if self.observer is not None:
                if op == "poll" and trip.processed and trip.result is not None:
                    work_id = getattr(trip.result, "id", None)
                self.observer(
                    CallRecord(
                        name=self.name,
                        op=op,
                        work_id=work_id,
                        sent_at=sent,
                        ended_at=trio.current_time(),
                        processed=trip.processed,
                        error=error,
                        injected=trip.injected,
                        args=dict(kwargs),
                        result=trip.result,
                    )
                )

    async def _through(
        self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], trip: _Trip
    ) -> Any:
        await self._request_phase()
        trip.injected = self._injected_answer(op)
        if trip.injected == FaultKind.TIMEOUTS.value:
            timeout = self._timeout_now()
            if self._rng.random() < 0.5:
                trip.result = await getattr(self.inner, op)(*args, **kwargs)
                trip.processed = True
            await trio.sleep(timeout)
        if trip.injected is not None:
            raise self._injected_error(trip.injected, op)
        trip.result = await getattr(self.inner, op)(*args, **kwargs)
        trip.processed = True
        await self._response_phase()
        if self._restarting(trio.current_time()):
            # processed, then the restart closed the connection: the answer is lost
            trip.injected = self._count(FaultKind.RESTART)
            raise self._injected_error(trip.injected, op)
        return trip.result

    def _restarting(self, now: float) -> bool:
        return any(f.kind is FaultKind.RESTART and f.covers(now) for f in self._windows)

    async def _request_phase(self) -> None:
        delay = 0.0
        for fault in self._windows:
            if fault.kind is FaultKind.LATENCY and fault.covers(trio.current_time()):
                delay = max(delay, self._rng.uniform(*fault.delay))
        if delay > 0:
            await trio.sleep(delay)
        await self._wait_for_link()

    async def _response_phase(self) -> None:
        delay = 0.0
        for fault in self._windows:
            if fault.kind is FaultKind.LATENCY and fault.covers(trio.current_time()):
                delay = max(delay, self._rng.uniform(*fault.response_delay))
        if delay > 0:
            await trio.sleep(delay)
        await self._wait_for_link()

    async def _wait_for_link(self) -> None:
        """Block while the link is dead or partitioned; return once it carries traffic."""
        while True:
            if self._dead:
                await trio.sleep_forever()
            now = trio.current_time()
            heal = max(
                (f.end for f in self._windows if f.kind is FaultKind.PARTITION and f.covers(now)),
                default=None,
            )
            if heal is None:
                await trio.lowlevel.checkpoint()
                return
            await trio.sleep_until(heal)

    def _injected_answer(self, op: str) -> str | None:
        """The fault that answers this call instead of the control plane, if any."""
        now = trio.current_time()
        if now >= self._revoked_at:
            return self._count(FaultKind.REVOKED)
        if self._restarting(now):
            return self._count(FaultKind.RESTART)
        for fault in self._burst_faults:
            left = self._bursts[id(fault)]
            if left <= 0 or fault.start > now:
                continue
            if fault.kind is FaultKind.FENCING and op not in LEASE_CALLS:
                continue
            self._bursts[id(fault)] = left - 1
            return self._count(fault.kind)
        for fault in self._windows:
            windowed = fault.kind in (FaultKind.ERRORS, FaultKind.TIMEOUTS)
            if windowed and fault.covers(now) and self._rng.random() < fault.rate:
                return self._count(fault.kind)
        return None

    def _count(self, kind: FaultKind) -> str:
        self.injected[kind.value] = self.injected.get(kind.value, 0) + 1
        return kind.value

    def _timeout_now(self) -> float:
        now = trio.current_time()
        return max(
            (f.timeout for f in self._windows if f.kind is FaultKind.TIMEOUTS and f.covers(now)),
            default=0.0,
        )

    def _injected_error(self, kind: str, op: str) -> Exception:
        if kind == FaultKind.TIMEOUTS.value:
            return ControlPlaneUnavailable(f"{op}: no answer in time (injected timeout)")
        if kind == FaultKind.RESTART.value:
            return ControlPlaneUnavailable(f"{op}: connection refused (control plane restarting)")
        if kind in (FaultKind.UNAUTHORIZED.value, FaultKind.REVOKED.value):
            return Unauthorized(f"{op}: the environment key was refused (injected)")
        if kind == FaultKind.FENCING.value:
            return FencingConflict(f"{op}: stale fencing token (injected)")
        return TransientError(f"{op}: service unavailable (injected)", status_code=503)
