"""Per-item lease keeping (DESIGN §3.2).

A work item's lease is what makes a worker the one allowed to serve it. The
:class:`LeaseKeeper` renews it with fenced heartbeats and decides, from its
own clock, the moment the lease must be treated as gone. The runner of the
session reads the shared :class:`Lease` (stop requests) and writes its
outcome there; the session supervisor cancels the runner when the keeper
raises :class:`~supervisor.LeaseLost`.

The numbers are the contract:

* heartbeat interval ``ttl / 3`` clamped to ``[0.5 s, 30 s]``, so two more
  tries fit between a missed beat and the deadline;
* deadline ``t_send + 0.8 * ttl``, where ``t_send`` is the trio clock just
  *before* the last successful heartbeat was sent. The server starts its own
  ``ttl`` when it processes the beat, which is never before we sent it, so
  this deadline always falls strictly before the server may re-grant the
  item. Measuring from the answer instead lets a worker keep serving for up
  to one round trip after the item went to someone else (split brain);
* every heartbeat call is bounded by ``min(interval, time left)``;
* the final ``stop`` is never sent once the lease was lost or its deadline
  passed: by then another worker may own the item. Before the first answer
  the start budget stands in for the deadline (the stop then carries
  ``NO_HEARTBEAT``, as would the first beat of the next holder);
* a session that ended ``wedged`` is not stopped but given back with
  ``requeue`` (same fencing, same rule about lost leases), so the item goes
  back to the queue at once for another try;
* a heartbeat in flight when the session ends is waited for (shielded, within
  its bound, so never past the deadline): the server may have minted a new
  token for it, and a final stop with the old one would be refused and the
  finished session run again;
* a 412 that names the current token (the server does so only for a stale
  token of the same lease: an answer we never got) is taken while our own
  deadline holds, for the next heartbeat or the final stop. Before the
  deadline the lease cannot have moved to anyone else.

The guarantee relies on one property of the server: a renewal never makes a
granted lease end earlier (a smaller ttl on a later beat takes effect only
beyond the current expiry). A beat whose answer is lost may carry that
smaller ttl, and no client can act on an answer it never received.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
import random
from collections.abc import Callable
from typing import Final, NoReturn, TypedDict

import attrs
import trio

from .._base._describe import describe_exception
from .._base._exceptions import SupervisorError
from ..controlplane._exceptions import (
    Conflict,
    ControlPlaneError,
    FatalError,
    FencingConflict,
    TransientError,
)
from ..controlplane._models import NO_HEARTBEAT, HeartbeatResult, Outcome, OutcomeStatus, WorkState
from ..controlplane._protocol import ControlPlane, LeasedClaim

__all__ = [
    "LeaseLost",
    "DEADLINE_FRACTION",
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "KeeperOptions",
    "Lease",
    "LeaseKeeper",
    "MeasureFrom",
    "heartbeat_interval",
]

logger = logging.getLogger("supervisor.lease")

#: The share of the ttl the worker trusts, counted from the send time of the last good beat.
DEADLINE_FRACTION: Final = 0.8
#: Bounds of the heartbeat interval (``ttl / 3`` is clamped into them).
MIN_INTERVAL: Final = 0.5
MAX_INTERVAL: Final = 30.0
#: The ttl assumed before the server named one (it bounds the first heartbeat call).
ASSUMED_TTL: Final = 60.0
#: The longest the first heartbeat is retried by default.
MAX_START_TIMEOUT: Final = 30.0

_STOP_STATES: Final = frozenset({WorkState.STOPPING, WorkState.STOPPED})
#: The jitter source of keepers given no ``rng``: one for all of them, since
#: seeding a fresh ``random.Random`` reads the OS's entropy on every session.
_SHARED_RNG: Final = random.Random()
#: Outcomes that give the item back (``requeue``) instead of stopping it: the
#: session could not be served here, but another worker may serve it.
REQUEUE_OUTCOMES: Final = frozenset({OutcomeStatus.WEDGED})
#: How many current tokens named by a 412 the final stop takes before it gives up.
_MAX_ADOPTED_TOKENS: Final = 3


def heartbeat_interval(ttl: float) -> float:
    """The pause between heartbeats for a lease of ``ttl`` seconds.

    A third of the ttl leaves room for two more attempts after a failed beat
    before the deadline at ``0.8 * ttl``; the clamp keeps tiny ttls from
    turning into a busy loop and huge ones from going quiet for minutes.
    """
    if not ttl > 0:  # also catches NaN
        return MIN_INTERVAL
    return min(MAX_INTERVAL, max(MIN_INTERVAL, ttl / 3))


class LeaseLost(SupervisorError):
    """The lease on a work item is gone, so its session must stop now.

    Attributes:
        work_id: the work item whose lease was lost.
        reason: a short human-readable cause (``"fencing conflict"``, ``"deadline passed"``, ...).
    """

    def __init__(self, work_id: str, reason: str) -> None:
        super().__init__(f"lease on work item {work_id!r} lost: {reason}")
        self.work_id = work_id
        self.reason = reason


class MeasureFrom(enum.StrEnum):
    """Which instant of a successful heartbeat the lease deadline counts from.

    ``SEND`` is the contract. ``ANSWER`` reproduces the classic defect (the
    deadline counted from when the answer arrived) and exists only so that a
    simulation can plant it and show that its split-brain check catches it.
    """

    SEND = "send"
    ANSWER = "answer"


class KeeperOptions(TypedDict, total=False):
    """The `LeaseKeeper` keywords a worker passes on to every keeper it makes.

    A worker sets ``start_timeout`` from its lease ttl; the others keep the
    keeper's defaults unless given here (tests and the simulator inject timing
    and a seeded ``rng``). Each key means what the `LeaseKeeper` argument of the
    same name means.
    """

    retry_initial: float
    retry_max: float
    start_timeout: float | None
    stop_timeout: float
    rng: random.Random | None
    measure_from: MeasureFrom | str
    account_for_beats: bool


@attrs.define(eq=False)
class Lease:
    """Live lease state of one work item, shared by its keeper and its runner.

    The keeper writes the lease fields; the runner watches
    :attr:`stop_requested` (a clean stop asked for by the control plane) and
    sets :attr:`outcome` before it ends, which the keeper reports with the
    final ``stop``. All times are on the trio clock.

    Attributes:
        work_id: the work item this lease is for.
        token: the fencing token to send with the next heartbeat and the final
            stop (``NO_HEARTBEAT`` until the first beat succeeded). Kept out of
            ``repr``: whoever holds it can stop the item.
        ttl: the ttl the server granted with the last good beat.
        interval: the current heartbeat interval.
        deadline: when the lease must be assumed lost (``inf`` until confirmed).
        last_sent_at: when the last successful heartbeat was sent.
        beats: successful heartbeats so far.
        failures: consecutive failed heartbeat attempts (0 after a success).
        lost: why the lease was lost, once it was; never reset.
        stop_reason: why a clean stop was requested, once it was.
        stop_requested: set when the control plane asked the session to stop.
        outcome: what the session produced; reported by the final stop.
    """

    work_id: str
    token: str = attrs.field(default=NO_HEARTBEAT, repr=False)
    ttl: float | None = None
    interval: float | None = None
    deadline: float = math.inf
    last_sent_at: float | None = None
    beats: int = 0
    failures: int = 0
    lost: str | None = None
    stop_reason: str | None = None
    stop_requested: trio.Event = attrs.field(factory=trio.Event, repr=False)
    outcome: Outcome | None = attrs.field(default=None, repr=False)
    #: Whether the final stop (or requeue) carrying ``outcome`` was accepted.
    reported: bool = False
    #: Whether the control plane answered that stop by queueing the item again
    #: (its retry policy): ``outcome`` is then one attempt's, not the item's.
    retried: bool = False
    _on_stop: list[trio.CancelScope] = attrs.field(factory=list, init=False, repr=False)
    _on_renew: list[Callable[[], None]] = attrs.field(factory=list, init=False, repr=False)

    @property
    def confirmed(self) -> bool:
        """Whether the first heartbeat succeeded (the lease was granted to us)."""
        return self.beats > 0

    @property
    def alive(self) -> bool:
        """Confirmed, not lost, and still before the deadline (trio clock)."""
        return self.confirmed and self.lost is None and trio.current_time() < self.deadline

    def time_left(self) -> float:
        """Seconds until the deadline (negative once it passed; ``inf`` before the first beat)."""
        return self.deadline - trio.current_time()

    def request_stop(self, reason: str) -> None:
        """Ask the session to wind down cleanly; the first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()
        scopes, self._on_stop = self._on_stop, []
        for scope in scopes:
            scope.cancel()

    def on_renew(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` each time the deadline moves; returns what unsubscribes it.

        The reaper (DESIGN §3.8) hears of every new deadline this way, so that
        it can kill the agent at that deadline even if this worker freezes.
        A callback runs on the event loop, synchronously, and must be quick.
        """
        self._on_renew.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._on_renew.remove(callback)

        return forget

    def renewed(self) -> None:
        """Tell the subscribers that the deadline moved (the keeper calls this)."""
        for callback in list(self._on_renew):
            try:
                callback()
            except Exception:
                logger.exception("a lease renewal callback of work item %s failed", self.work_id)

    def cancel_on_stop_request(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when a stop is requested (at once if it already was).

        What a runner uses instead of a task waiting on `stop_requested`.
        """
        if self.stop_requested.is_set():
            scope.cancel()
        else:
            self._on_stop.append(scope)


class LeaseKeeper:
    """Keeps one work item's lease alive while its session runs.

    A plain Trio service: ``await nursery.start(keeper.run)`` returns the
    :class:`Lease` once the first heartbeat succeeded. It then renews the
    lease until it is cancelled (the session ended), the control plane asks
    for a stop (it sets :attr:`Lease.stop_requested` and keeps renewing while
    the runner winds down), or the lease is lost (it raises
    :class:`~supervisor.LeaseLost`). It never returns on its own.

    Args:
        control_plane: where the lease lives.
        work_id: the acknowledged work item.
        desired_ttl: the ``desired_ttl_seconds`` to ask for (the server clamps it).
        lease: a :class:`Lease` to fill in, when the runner needs it before the
            keeper is ready; a fresh one otherwise.
        grant: the claim that already granted the lease (`LeasedClaim`): the
            keeper starts from it instead of sending the first heartbeat, its
            deadline counted from when that claim was asked for (and a grant
            whose deadline has passed is refused, as a late first answer is).
        retry_initial: first pause after a transient heartbeat failure; it
            doubles on each further failure, bounded by ``retry_max``, the
            interval and always by the deadline.
        retry_max: longest pause between transient retries.
        start_timeout: how long, from its first send, the first heartbeat may
            keep failing transiently before the claim is given up. Defaults to
            ``min(30 s, 0.8 x ttl)`` (ttl: ``desired_ttl``, else 60 s): the first
            beat carries no token, so a retry sent after a lease granted by an
            unanswered attempt expired could be taken for the first beat of
            another worker that claimed the item since.
        stop_timeout: upper bound for the final ``stop`` call (it is also
            bounded by the time left to the deadline).
        rng: random source of the retry jitter (inject a seeded one in tests);
            keepers without one share a module-wide generator.
        measure_from: test hook, see :class:`MeasureFrom`; never change it in
            production.
        account_for_beats: test hook; ``False`` reproduces the classic defect
            of abandoning a heartbeat in flight when the session ends and
            ignoring the token a 412 names, so that a simulation can plant it
            and show that its check catches it. Never change it in production.

    Raises:
        ValueError: on a non-positive ttl or timing option.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        work_id: str,
        *,
        desired_ttl: float | None = None,
        lease: Lease | None = None,
        retry_initial: float = 0.25,
        retry_max: float = 5.0,
        start_timeout: float | None = None,
        stop_timeout: float = 10.0,
        rng: random.Random | None = None,
        measure_from: MeasureFrom | str = MeasureFrom.SEND,
        account_for_beats: bool = True,
        grant: LeasedClaim | None = None,
    ) -> None:
        if desired_ttl is not None and not desired_ttl > 0:
            raise ValueError(f"desired_ttl must be > 0, got {desired_ttl!r}")
        if start_timeout is None:
            ttl = desired_ttl if desired_ttl is not None else ASSUMED_TTL
            start_timeout = min(MAX_START_TIMEOUT, DEADLINE_FRACTION * ttl)
        for name, value in (
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
            ("start_timeout", start_timeout),
            ("stop_timeout", stop_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if lease is not None and lease.work_id != work_id:
            raise ValueError(f"lease is for {lease.work_id!r}, not {work_id!r}")
        if grant is not None and grant.item.id != work_id:
            raise ValueError(f"grant is for {grant.item.id!r}, not {work_id!r}")
        self.control_plane = control_plane
        self.work_id = work_id
        self.desired_ttl = desired_ttl
        self.lease = lease if lease is not None else Lease(work_id)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.measure_from = MeasureFrom(measure_from)
        self.account_for_beats = account_for_beats
        self.grant = grant
        self._rng = rng if rng is not None else _SHARED_RNG
        # The last tokens this keeper held, so that none leaks into a log line
        # through a control-plane error message (older ones are worthless).
        self._tokens: collections.deque[str] = collections.deque(maxlen=4)
        # When an unconfirmed lease counts as lost (set by the first send).
        self._give_up_at = math.inf

    def __repr__(self) -> str:
        return f"<LeaseKeeper work_id={self.work_id!r} lease={self.lease!r}>"

    async def run(self, *, task_status: trio.TaskStatus[Lease] = trio.TASK_STATUS_IGNORED) -> None:
        """Confirm the lease, signal ready with it, then keep it alive.

        Raises:
            LeaseLost: the lease is gone (fatal answer, fencing conflict,
                deadline passed, or the first beat never succeeded). The final
                stop is not sent in that case.
        """
        try:
            await self._confirm()
            task_status.started(self.lease)
            await self._renew_forever()
        finally:
            budget = self._final_stop_budget()
            if budget is not None:
                # Shielded so the item gets its outcome even when we are being
                # cancelled, bounded so a dead control plane cannot hold up the
                # teardown, and never past the deadline.
                with trio.move_on_after(budget, shield=True) as scope:
                    await self._send_final_stop()
                if scope.cancelled_caught:
                    logger.warning(
                        "final stop of work item %s got no answer within %.3gs",
                        self.work_id,
                        budget,
                    )

    # --- heartbeats ----------------------------------------------------------

    async def _confirm(self) -> None:
        """Send the first heartbeat, retrying transient failures within ``start_timeout``
        (or take the lease the claim granted)."""
        lease = self.lease
        if self.grant is not None:
            # Taken before any checkpoint: a keeper cancelled right away still holds
            # the granted token, so its final stop (or requeue) is accepted.
            self._give_up_at = self.grant.asked_at + self.start_timeout
            self._accept(self.grant.heartbeat, self.grant.asked_at, first=True)
            if trio.current_time() >= lease.deadline:
                self._lose("the claim that granted the lease was answered after its deadline")
            await trio.lowlevel.checkpoint()
            return
        give_up_at = self._give_up_at = trio.current_time() + self.start_timeout
        bound = heartbeat_interval(
            self.desired_ttl if self.desired_ttl is not None else ASSUMED_TTL
        )
        while True:
            left = give_up_at - trio.current_time()
            if left <= 0:
                self._lose(f"first heartbeat did not succeed within {self.start_timeout:g}s")
            try:
                result, t_send = await self._beat(min(bound, left))
            except TransientError as exc:
                lease.failures += 1
                self._log_failure(exc, lease.failures)
                delay = self._retry_delay(lease.failures, bound)
                await trio.sleep_until(min(trio.current_time() + delay, give_up_at))
                continue
            except FatalError as exc:
                self._lose(f"first heartbeat refused: {self._describe(exc)}", exc)
            self._accept(result, t_send, first=True)
            if trio.current_time() >= lease.deadline:
                # A slow answer with a short ttl: the lease ended before we
                # heard of it. Never start a session on it.
                self._lose("the first heartbeat was answered after its lease deadline")
            return

    async def _renew_forever(self) -> None:
        lease = self.lease
        assert lease.last_sent_at is not None
        assert lease.interval is not None
        next_at = lease.last_sent_at + lease.interval
        while True:
            await trio.sleep_until(min(next_at, lease.deadline))
            now = trio.current_time()
            if now >= lease.deadline:
                self._lose(self._deadline_reason())
            interval = lease.interval
            try:
                result, t_send = await self._beat(min(interval, lease.deadline - now))
            except TransientError as exc:
                lease.failures += 1
                self._log_failure(exc, lease.failures)
                next_at = trio.current_time() + self._retry_delay(lease.failures, interval)
                continue
            except FencingConflict as exc:
                if not self._adopt_named_token(exc, "heartbeat"):
                    self._lose(self._describe(exc), exc)
                # One answer behind: beat again at once with the token the
                # server named. The deadline stays where the last beat we
                # heard of put it (the lost one's send time is unknown).
                lease.failures += 1
                next_at = trio.current_time()
                continue
            except FatalError as exc:
                self._lose(self._describe(exc), exc)
            if lease.failures:
                logger.info(
                    "heartbeat for work item %s recovered after %d failed attempt(s)",
                    self.work_id,
                    lease.failures,
                )
            self._accept(result, t_send, first=False)
            next_at = t_send + lease.interval

    async def _beat(self, bound: float) -> tuple[HeartbeatResult, float]:
        """One heartbeat call, bounded; returns the answer and the send time.

        Raises:
            TransientError: also when the bound ran out (a timeout is transient).
            FatalError: as the control plane raised it.
        """
        t_send = trio.current_time()
        # Shielded: once sent, the beat may be processed (and a new token
        # minted) whatever happens here, so a keeper cancelled meanwhile (its
        # session ended) still waits for the answer, at most ``bound`` (never
        # past the deadline), and its final stop carries the newest token.
        with trio.move_on_after(max(0.0, bound), shield=self.account_for_beats):
            result = await self.control_plane.heartbeat(
                self.work_id,
                expected_last_heartbeat=self.lease.token,
                desired_ttl_seconds=self.desired_ttl,
            )
            return result, t_send
        raise TransientError(f"heartbeat got no answer within {bound:.3g}s")

    def _adopt_named_token(self, exc: FencingConflict, what: str) -> bool:
        """Take the current token a 412 named, when it is safe to; whether it was taken.

        The server names it only to a stale token of the same lease (a beat
        whose answer we never got). Taken only while our own deadline holds:
        that deadline falls before any expiry the server could apply, so the
        lease is still ours and nobody else's session can be hit.
        """
        lease = self.lease
        named = exc.current_token if self.account_for_beats else None
        if named is None or named == lease.token or lease.lost is not None:
            return False
        if not lease.confirmed or lease.time_left() <= 0:
            return False
        logger.info(
            "%s of work item %s was one answer behind; continuing with the current token",
            what,
            self.work_id,
        )
        lease.token = named
        self._tokens.append(named)
        return True

    def _accept(self, result: HeartbeatResult, t_send: float, *, first: bool) -> None:
        lease = self.lease
        lease.token = result.last_heartbeat
        self._tokens.append(result.last_heartbeat)
        lease.beats += 1
        lease.failures = 0
        ttl = result.ttl_seconds if result.ttl_seconds > 0 else 0.0
        lease.interval = heartbeat_interval(ttl)
        # A beat that did not extend the lease leaves the old deadline in
        # place; the first beat is the grant itself, so it always sets one.
        if result.lease_extended or first:
            basis = t_send if self.measure_from is MeasureFrom.SEND else trio.current_time()
            lease.ttl = ttl
            lease.last_sent_at = t_send
            lease.deadline = basis + DEADLINE_FRACTION * ttl
            lease.renewed()
        if result.state in _STOP_STATES:
            self._request_stop(f"control plane state is {result.state.value}")
        elif not result.lease_extended:
            self._request_stop("control plane did not extend the lease")

    def _request_stop(self, reason: str) -> None:
        if not self.lease.stop_requested.is_set():
            logger.info("work item %s: stop requested (%s)", self.work_id, reason)
        self.lease.request_stop(reason)

    def _retry_delay(self, failures: int, interval: float) -> float:
        base = min(self.retry_max, interval, self.retry_initial * 2.0 ** min(failures - 1, 30))
        return base * (1.0 + 0.1 * self._rng.random())

    def _deadline_reason(self) -> str:
        lease = self.lease
        return (
            f"no successful heartbeat since t={lease.last_sent_at:.3f}; "
            f"deadline {lease.deadline:.3f} (0.8 x ttl {lease.ttl:g}s) passed"
        )

    def _lose(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        self.lease.lost = reason
        logger.warning("lease on work item %s lost: %s", self.work_id, reason)
        raise LeaseLost(self.work_id, reason) from cause

    def _log_failure(self, exc: TransientError, failures: int) -> None:
        # One warning per run of failures, details at DEBUG: a flapping
        # network must not flood the log.
        log = logger.warning if failures == 1 else logger.debug
        log(
            "heartbeat for work item %s failed (attempt %d): %s",
            self.work_id,
            failures,
            self._describe(exc),
        )

    def _describe(self, exc: BaseException) -> str:
        # Fencing tokens are capabilities: never in a log line.
        return describe_exception(exc, status=True, redact=self._tokens)

    # --- the final stop ------------------------------------------------------

    def _final_stop_budget(self) -> float | None:
        """Seconds the final stop may take, or ``None`` when it must not be sent.

        Before the first answer the start budget stands in for the deadline:
        past it, a grant we never heard of may have expired and the item been
        acknowledged by another worker, whose token is ``NO_HEARTBEAT`` too.
        """
        lease = self.lease
        if lease.lost is not None:
            logger.debug("work item %s: no final stop, the lease was lost", self.work_id)
            return None
        if not lease.confirmed:
            left = self._give_up_at - trio.current_time()
            if left <= 0:
                lease.lost = f"first heartbeat did not succeed within {self.start_timeout:g}s"
                logger.warning(
                    "work item %s: no final stop, the start budget ran out at shutdown",
                    self.work_id,
                )
                return None
            return min(self.stop_timeout, left)
        left = lease.time_left()
        if left <= 0:
            lease.lost = self._deadline_reason()
            logger.warning(
                "work item %s: no final stop, the lease deadline passed at shutdown", self.work_id
            )
            return None
        return min(self.stop_timeout, left)

    async def _send_final_stop(self) -> None:
        lease = self.lease
        outcome = lease.outcome or Outcome(
            OutcomeStatus.FAILED, reason="the session ended without reporting an outcome"
        )
        requeue = outcome.status in REQUEUE_OUTCOMES
        delay = 0.05
        adopted = 0
        while True:
            try:
                await self._report(outcome, requeue=requeue)
            except FencingConflict as exc:
                # Refused while the lease is ours: a beat was processed whose
                # answer we never had. Never drop a finished session for that:
                # report again with the token the server named (a few times at
                # most, in case beats of ours are still in flight somewhere).
                if adopted < _MAX_ADOPTED_TOKENS and self._adopt_named_token(exc, "final stop"):
                    adopted += 1
                    continue
                logger.warning(
                    "final stop of work item %s refused, the lease moved on: %s",
                    self.work_id,
                    self._describe(exc),
                )
                return
            except TransientError as exc:
                # Worth another try while the budget (bounded by the deadline) lasts:
                # a lost answer would otherwise turn a finished session into a re-run.
                logger.debug(
                    "final stop of work item %s: %s; retrying", self.work_id, self._describe(exc)
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            return

    async def _report(self, outcome: Outcome, *, requeue: bool) -> None:
        lease = self.lease
        try:
            if requeue:
                await self.control_plane.requeue(
                    self.work_id, expected_last_heartbeat=lease.token, outcome=outcome
                )
            else:
                answer = await self.control_plane.stop(
                    self.work_id,
                    force=True,
                    expected_last_heartbeat=lease.token,
                    outcome=outcome,
                )
                lease.retried = answer.state is not WorkState.STOPPED
            lease.reported = True
        except Conflict:
            logger.debug("work item %s was already stopped", self.work_id)
        except (FencingConflict, TransientError):
            raise  # the caller decides, within its budget
        except ControlPlaneError as exc:
            logger.warning(
                "final stop of work item %s failed: %s", self.work_id, self._describe(exc)
            )
        except Exception as exc:
            # A defect in the control-plane implementation must not replace the
            # exception (or the cancellation) this keeper is exiting with. No
            # traceback: it would print the raw message, which may hold a token.
            logger.error(  # noqa: TRY400
                "final stop of work item %s raised unexpectedly: %s",
                self.work_id,
                self._describe(exc),
            )
        else:
            if requeue:
                logger.info(
                    "work item %s given back for another try (%s)", self.work_id, outcome.status
                )
            elif lease.retried:
                logger.info(
                    "work item %s ended %s; its retry policy queues it again",
                    self.work_id,
                    outcome.status,
                )
            else:
                logger.debug("work item %s stopped with outcome %s", self.work_id, outcome.status)
