"""Wedge detection: noticing that the agent runtime is stuck, and acting on it (DESIGN §3.5).

Three parts, one per job:

* :class:`WedgeState` says *whether* this worker's runtime is wedged, and why.
  One instance per worker (never a module global, so two workers in one
  process and two tests in one run never share it). Detectors ``mark`` it; the
  circuit breaker and the presence reports read it; a successful probe session
  ``clear``\\ s it.
* :class:`WedgeDetector` watches sessions. Two signs of a wedge:

  - an output line matching one of the configured patterns (regular
    expressions searched case-insensitively; the default is the message a
    stuck agent runtime prints, ``control request timeout``);
  - silence: no byte of output (either stream, or an in-process agent's
    ``ctx.emit``) for ``wedge_timeout`` seconds. The watchdog looks every
    ``wedge_timeout / 8`` seconds (at most every 5 s), so it fires after
    between ``wedge_timeout`` and ``1.25 x wedge_timeout`` of silence.

  Either way the detector marks the worker wedged and cancels *that* session
  with outcome ``wedged``; its lease keeper then gives the item back with
  ``requeue`` (not ``stop``), so it returns to the queue at once, with one
  more attempt, for another worker to try. Sibling sessions are untouched.
* :class:`WedgeBreaker` is the poller's circuit breaker (a
  :class:`~supervisor._poller.ClaimGate`): while the worker is wedged it lets
  no claim through except one *probe* every ``probe_interval`` seconds, the
  first one ``probe_interval`` after the wedge, and never while the previous
  probe session still runs. A probe session that completes clears the wedge,
  and the worker claims at full capacity again. Only a probe clears it: a
  session that was already running when the runtime wedged proves nothing
  about starting a new one, which is what wedged runtimes fail at.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from ..controlplane._models import OutcomeStatus

if TYPE_CHECKING:
    from ._process import SessionOutput

__all__ = [
    "DEFAULT_WEDGE_PATTERNS",
    "BreakerStatistics",
    "WedgeBreaker",
    "WedgeDetector",
    "WedgeState",
    "compile_wedge_patterns",
]

logger = logging.getLogger("supervisor.wedge")

#: What a stuck agent runtime prints (``Error: Control request timeout: initialize``).
DEFAULT_WEDGE_PATTERNS: Final = ("control request timeout",)
#: The longest reason kept (it travels as the presence report's ``sample_error``).
MAX_REASON_CHARS: Final = 300
#: The silence watchdog looks at least this often.
MAX_WATCH_STEP: Final = 5.0


@attrs.define(eq=False)
class WedgeState:
    """Sticky wedge flag: the first reason wins until :meth:`clear`.

    Attributes:
        reason: why the runtime was marked wedged (``None`` while healthy).
        since: ``trio.current_time()`` when it was marked, or ``None``.
        marks: how many times it was marked wedged since the worker started.
    """

    reason: str | None = None
    since: float | None = None
    marks: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def is_wedged(self) -> bool:
        return self.reason is not None

    def mark(self, reason: str) -> bool:
        """Mark the runtime wedged; returns ``False`` if it already was (the first reason stays)."""
        if not reason:
            raise ValueError("a wedge needs a reason")
        if self.reason is not None:
            return False
        self.reason = reason
        try:
            self.since = trio.current_time()
        except RuntimeError:  # marked from outside Trio
            self.since = None
        self.marks += 1
        self._notify()
        return True

    def clear(self) -> bool:
        """Healthy again (a success was observed); returns whether it was wedged."""
        if self.reason is None:
            return False
        self.reason = None
        self.since = None
        self._notify()
        return True

    async def wait_changed(self) -> None:
        """Wait for the next ``mark`` or ``clear``."""
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()


def compile_wedge_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile output patterns (regular expressions, case-insensitive).

    Raises:
        ValueError: a pattern is not a non-empty string or does not compile;
            the message names it.
    """
    compiled: list[re.Pattern[str]] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"a wedge pattern must be a non-empty string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(
                f"wedge pattern {pattern!r} is not a regular expression: {exc}"
            ) from None
    return tuple(compiled)


class Cancellable(Protocol):
    """The part of a session record a detector needs (``SessionRecord`` is one)."""

    work_id: str

    @property
    def cancel_reason(self) -> OutcomeStatus | None: ...

    def cancel(self, status: OutcomeStatus, detail: str) -> None: ...


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


class WedgeDetector:
    """Watches a worker's sessions for a wedged runtime.

    Plug :meth:`on_line` into the session runner's line hook and
    :meth:`watch` into its watchdog slot. On a wedge it marks ``state``
    (first reason wins) and cancels the session with outcome ``wedged``.

    Args:
        state: the worker's wedge flag.
        patterns: output patterns (regular expressions, case-insensitive);
            empty turns output detection off.
        timeout: seconds of silence that count as wedged; ``None`` turns the
            watchdog off. It is off by default because agents that print
            nothing until they finish (``--output-format json``) would look
            wedged; turn it on for agents that stream progress.

    Raises:
        ValueError: a bad pattern, or a timeout that is not a positive number.
    """

    def __init__(
        self,
        state: WedgeState,
        *,
        patterns: Sequence[str] = DEFAULT_WEDGE_PATTERNS,
        timeout: float | None = None,
    ) -> None:
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"wedge timeout must be a positive number of seconds, got {timeout!r}")
        self.state = state
        self.patterns = compile_wedge_patterns(patterns)
        self.timeout = timeout
        #: Sessions this detector cancelled as wedged.
        self.detections = 0
        #: Called (synchronously) after each detection; the worker interrupts the
        #: poll in flight with it, so a wedged worker does not claim the item its
        #: wedged session is about to give back.
        self.on_wedge: Callable[[], object] | None = None

    def __repr__(self) -> str:
        patterns = [p.pattern for p in self.patterns]
        return f"<WedgeDetector patterns={patterns!r} timeout={self.timeout!r}>"

    def on_line(self, record: Cancellable, line: str) -> None:
        """Check one output line of a session (cheap: a few regex searches)."""
        if record.cancel_reason is not None:
            return  # already on its way out
        for pattern in self.patterns:
            if pattern.search(line):
                self.wedged(record, _short(line) or f"output matched {pattern.pattern!r}")
                return

    async def watch(self, record: Cancellable, output: SessionOutput) -> None:
        """The silence watchdog of one session; runs while the agent runs.

        Any output byte counts as progress: a line on either stream, a part of
        a line, or an in-process agent's ``ctx.emit``.
        """
        timeout = self.timeout
        if timeout is None:
            return
        step = min(timeout / 8, MAX_WATCH_STEP)
        seen = output.bytes_received
        last = trio.current_time()
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            if output.bytes_received != seen:
                seen = output.bytes_received
                last = now
            elif now - last >= timeout:
                self.wedged(record, f"no output for {now - last:.0f}s (wedge_timeout {timeout:g}s)")
                return

    def wedged(self, record: Cancellable, reason: str) -> None:
        """Mark the worker wedged and cancel this session with outcome ``wedged``."""
        if record.cancel_reason is not None:
            return
        self.detections += 1
        first = self.state.mark(reason)
        logger.warning(
            "work item %s: agent runtime wedged (%s); cancelling the session and giving the "
            "item back%s",
            record.work_id,
            reason,
            "; claims pause until a probe succeeds" if first else "",
        )
        if self.on_wedge is not None:
            self.on_wedge()
        record.cancel(OutcomeStatus.WEDGED, reason)


@attrs.frozen
class BreakerStatistics:
    """What the circuit breaker did so far.

    Attributes:
        open: whether claims are paused now (the worker is wedged).
        probes: probe claims let through.
        probe_work_id: the probe session running now, if any.
        next_probe_at: trio time the next probe may start (``None`` while closed).
        cleared: wedges cleared by a successful probe.
    """

    open: bool
    probes: int
    probe_work_id: str | None
    next_probe_at: float | None
    cleared: int


class WedgeBreaker:
    """The poller's circuit breaker, driven by the worker's :class:`WedgeState`.

    A :class:`~supervisor._poller.ClaimGate`. Tell it how each session ended
    with :meth:`session_ended`; that is how a probe clears the wedge.

    Args:
        state: the worker's wedge flag.
        probe_interval: seconds from the wedge to the first probe, and between
            the starts of two probes.

    Raises:
        ValueError: ``probe_interval`` is not a positive number.
    """

    def __init__(self, state: WedgeState, *, probe_interval: float) -> None:
        if not (math.isfinite(probe_interval) and probe_interval > 0):
            raise ValueError(f"probe_interval must be a positive number, got {probe_interval!r}")
        self.state = state
        self.probe_interval = probe_interval
        self._marks_seen = 0
        self._tripped_at = 0.0
        self._last_probe_at: float | None = None
        self._granted_probe = False
        self._probe_work_id: str | None = None
        self._early_end: tuple[str, OutcomeStatus | None] | None = None
        self._probes = 0
        self._cleared = 0
        self._changed = trio.Event()

    def __repr__(self) -> str:
        state = "open" if self.state.is_wedged else "closed"
        return f"<WedgeBreaker {state} probes={self._probes}>"

    def statistics(self) -> BreakerStatistics:
        wedged = self.state.is_wedged
        if wedged:
            self._note_trip()
        return BreakerStatistics(
            open=wedged,
            probes=self._probes,
            probe_work_id=self._probe_work_id,
            next_probe_at=self._next_probe_at() if wedged else None,
            cleared=self._cleared,
        )

    # --- ClaimGate ---------------------------------------------------------------------

    async def wait_for_permission(self) -> None:
        """Return at once while healthy; while wedged, only for a due probe."""
        announced = False
        while True:
            # Checkpoint first, decide after: the poller polls right after this
            # returns, with no checkpoint in between, so a wedge marked meanwhile
            # can never slip a claim through.
            await trio.lowlevel.checkpoint()
            self._granted_probe = False
            if not self.state.is_wedged:
                return
            self._note_trip()
            due = self._next_probe_at()
            if self._probe_work_id is None and trio.current_time() >= due:
                self._granted_probe = True
                logger.info(
                    "worker wedged (%s): letting one probe claim through", self.state.reason
                )
                return
            if not announced:
                announced = True
                logger.info(
                    "worker wedged (%s): claims paused; next probe %s",
                    self.state.reason,
                    "after the running probe ends"
                    if self._probe_work_id is not None
                    else f"in {max(0.0, due - trio.current_time()):.1f}s",
                )
            deadline = due if self._probe_work_id is None else math.inf
            await self._wait_for_change(deadline)

    def permitted_claims(self, wanted: int) -> int:
        """A probe claims one item; a healthy worker as many as it has free slots."""
        return 1 if self._granted_probe else wanted

    def claim_result(self, work_id: str | None) -> None:
        """A probe permission that claimed nothing may be granted again at once."""
        if not self._granted_probe:
            return
        self._granted_probe = False
        early, self._early_end = self._early_end, None
        if work_id is not None:
            self._probes += 1
            self._probe_work_id = work_id
            self._last_probe_at = trio.current_time()
            if early is not None and early[0] == work_id:
                # The probe session ended before the hand-over returned (it
                # could not start, or it was over at once).
                self.session_ended(*early)

    # --- session ends ------------------------------------------------------------------

    def session_ended(self, work_id: str, status: OutcomeStatus | None) -> None:
        """Learn how a session ended; a completed probe clears the wedge."""
        if work_id != self._probe_work_id:
            if self._granted_probe:
                self._early_end = (work_id, status)
            return
        self._probe_work_id = None
        if status is OutcomeStatus.COMPLETED and self.state.clear():
            self._cleared += 1
            logger.info("probe session %s completed: wedge cleared, claiming resumes", work_id)
        elif self.state.is_wedged:
            logger.info(
                "probe session %s ended %s: still wedged",
                work_id,
                status.value if status is not None else "without an outcome",
            )
        self._poke()

    # --- internals ---------------------------------------------------------------------

    def _note_trip(self) -> None:
        if self.state.marks != self._marks_seen:
            # A new wedge: the first probe comes probe_interval after it.
            self._marks_seen = self.state.marks
            since = self.state.since
            if since is None:  # marked from outside Trio: count from now
                try:
                    since = trio.current_time()
                except RuntimeError:
                    since = self._tripped_at
            self._tripped_at = since
            self._last_probe_at = None

    def _next_probe_at(self) -> float:
        due = self._tripped_at + self.probe_interval
        if self._last_probe_at is not None:
            due = max(due, self._last_probe_at + self.probe_interval)
        return due

    def _poke(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _wait_for_change(self, deadline: float) -> None:
        """Until ``deadline``, the wedge flag changes, or a probe ends."""
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:

                async def wait(event_wait: Callable[[], Awaitable[None]]) -> None:
                    await event_wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wait, self.state.wait_changed)
                nursery.start_soon(wait, self._changed.wait)
