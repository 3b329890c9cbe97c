"""The poller: claims work only when a session can start at once (DESIGN §3.3).

Every claim goes through the same steps, in this order:

1. take a session slot from the worker's ``trio.CapacityLimiter`` (blocking
   while every slot is busy, so the worker never holds a lease on work it
   cannot start, and never asks for work it would have to sit on);
2. wait for the :class:`ClaimGate` (the wedge circuit breaker pauses claims);
3. long-poll the control plane (``block_ms``); nothing there → poll again at
   once after a real long poll (the call took at least half of ``block_ms``,
   so a server that ignores ``block_ms`` cannot turn this into a busy loop),
   else after a random 1-3 s pause;
4. acknowledge the item and hand it, with its slot, to ``on_claim``.

Errors on poll are retried with ``min(60, 2**n)`` seconds plus up to 1 s of
jitter (``n`` counts consecutive failures from 0 and is reset by any
successful call). A fatal answer (bad key, unknown environment) stops the
poller with that error, logged once: the supervisor's restart budget decides
what happens next, and the operator reads why in one line instead of a flood.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar, runtime_checkable

import attrs
import trio

from ..controlplane._exceptions import (
    Conflict,
    ControlPlaneError,
    FatalError,
    Gone,
    NotFound,
    TransientError,
)
from ..controlplane._models import WorkItem, WorkState
from ..controlplane._protocol import ClaimsBatches, ClaimsLeases, ControlPlane, LeasedClaim

__all__ = [
    "MAX_BACKOFF",
    "BatchGate",
    "ClaimGate",
    "OpenGate",
    "Poller",
    "PollerState",
    "PollerStatistics",
    "Slot",
    "poll_backoff",
]

logger = logging.getLogger("supervisor.poller")

#: Longest pause between failing polls, before jitter.
MAX_BACKOFF: Final = 60.0
#: Random pause after an empty poll that did not wait server-side.
EMPTY_PAUSE: Final = (1.0, 3.0)
#: Ack refusals that concern only the one item (it went elsewhere or away).
_SKIP_ON_ACK: Final = (Conflict, NotFound, Gone)


def poll_backoff(failures: int) -> float:
    """Pause (before jitter) after ``failures`` consecutive failed polls: 1, 2, 4, ... 60."""
    return min(MAX_BACKOFF, 2.0 ** min(max(failures - 1, 0), 16))


@runtime_checkable
class ClaimGate(Protocol):
    """A veto on claiming new work: the hook of the wedge circuit breaker (§3.5).

    The poller calls :meth:`wait_for_permission` before each poll (while it
    already holds a free slot) and reports every permitted attempt back
    through :meth:`claim_result`. A breaker pauses claims by blocking in
    ``wait_for_permission`` and lets one probe through every
    ``probe_interval``; it learns whether the probe *session* succeeded from
    the session outcome, not from here. :meth:`claim_result` only tells it
    whether the permission was used, so a probe that found an empty queue can
    be granted again at once.
    """

    async def wait_for_permission(self) -> None:
        """Return when a claim may be attempted; block while claiming is paused."""
        ...

    def claim_result(self, work_id: str | None) -> None:
        """Report a permitted attempt: the id of the item handed to a session, or ``None``.

        ``None`` means nothing was claimed (the queue was empty, the poll or
        the ack failed, or the hand-over raised).
        """
        ...


@runtime_checkable
class BatchGate(Protocol):
    """A :class:`ClaimGate` that may let one permission claim several items.

    A gate without this method permits one item per permission.
    """

    def permitted_claims(self, wanted: int) -> int:
        """How many of ``wanted`` items the permission just granted may claim (at least 1)."""
        ...


class OpenGate:
    """The default :class:`ClaimGate`: never pauses."""

    async def wait_for_permission(self) -> None:
        await trio.lowlevel.checkpoint()

    def permitted_claims(self, wanted: int) -> int:
        return wanted

    def claim_result(self, work_id: str | None) -> None:
        pass


@attrs.define(eq=False)
class Slot:
    """One unit of session capacity, held from before the poll until the session ends.

    The borrower token of the ``CapacityLimiter``: the poller acquires it on
    this object's behalf (not the poller task's), so the session can release
    it from whatever task it ends in. :meth:`release` is idempotent, which
    makes "always release in a finally" safe in every layer that touches it.
    """

    _limiter: trio.CapacityLimiter = attrs.field(alias="limiter", repr=False)
    released: bool = attrs.field(default=False, init=False)
    #: The lease granted with the claim of the slot's item, when the control
    #: plane grants leases in the claim (`ClaimsLeases`); the session's lease
    #: keeper starts from it.
    grant: LeasedClaim | None = attrs.field(default=None, init=False, repr=False)

    async def acquire(self) -> None:
        """Wait for a free slot (done by the poller)."""
        await self._limiter.acquire_on_behalf_of(self)

    def acquire_nowait(self) -> bool:
        """Take a free slot if there is one; whether it was taken."""
        try:
            self._limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            return False
        return True

    def release(self) -> None:
        """Give the slot back; further calls do nothing."""
        if not self.released:
            self.released = True
            self._limiter.release_on_behalf_of(self)


class PollerState(enum.StrEnum):
    """What the poller is waiting for right now (for status pages)."""

    IDLE = "idle"
    WAITING_FOR_SLOT = "waiting_for_slot"
    PAUSED = "paused"
    POLLING = "polling"
    ACKING = "acking"
    HANDING_OVER = "handing_over"
    EMPTY_PAUSE = "empty_pause"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@attrs.frozen
class PollerStatistics:
    """Counters since the poller was created (they survive restarts of ``run``).

    Attributes:
        state: what it is waiting for now.
        polls: poll calls made.
        claims: items acknowledged and handed to a session.
        empty_polls: polls that found nothing.
        errors: failed poll or ack calls.
        skipped: items whose ack was refused (claimed elsewhere, gone).
        consecutive_errors: failures since the last successful call.
    """

    state: PollerState
    polls: int
    claims: int
    empty_polls: int
    errors: int
    skipped: int
    consecutive_errors: int


OnClaim = Callable[[WorkItem, Slot], Awaitable[None]]

#: What a poll or a claim hands out: an item, or a batch of items.
_Found = TypeVar("_Found", WorkItem, list[WorkItem])


class Poller:
    """Claims work items for the worker, one free session slot at a time.

    A plain Trio service (``await nursery.start(poller.run)``), meant to run
    as a ``PERMANENT`` child next to the sessions supervisor.

    Args:
        control_plane: where to poll.
        worker_id: the identity the items are claimed for.
        slots: the worker's session capacity; a slot is taken before every poll.
        on_claim: ``await on_claim(item, slot)`` starts the session for an
            acknowledged item. From its return on, the slot belongs to the
            session, which must call ``slot.release()`` when it ends. If it
            raises, the poller releases the slot and re-raises.
        block_ms: how long the control plane may hold a poll open (0 = no long poll).
        gate: the circuit breaker; :class:`OpenGate` when not given.
        rng: the random source of the pauses and the jitter.
        reclaim_older_than_ms: passed on to ``poll`` (when an unacknowledged
            item may be handed out again).
        ack_timeout: seconds an ``ack`` may take before the claim is abandoned
            (``None``: no limit). An ack starts a lease on the control plane;
            one answered after that lease ran out may belong to an item that
            was requeued and acked by another worker meanwhile, and the first
            heartbeat cannot tell the two claims apart. The worker sets it well
            inside the ack lease.
        labels: the worker's routing labels, carried by every poll: the control
            plane hands out only items whose required labels are among them.
        claim_leases: with a control plane that grants the first lease in the
            claim (`ClaimsLeases`), claim that way, asking for ``lease_ttl``:
            each slot handed over carries its item's grant (``slot.grant``),
            and the session's lease keeper starts from it.
        lease_ttl: the ttl asked for with ``claim_leases`` (``None``: the
            control plane's default).

    Raises:
        ValueError: on a negative ``block_ms`` or ``reclaim_older_than_ms``.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        *,
        worker_id: str,
        slots: trio.CapacityLimiter,
        on_claim: OnClaim,
        block_ms: int = 900,
        gate: ClaimGate | None = None,
        rng: random.Random | None = None,
        reclaim_older_than_ms: int | None = None,
        ack_timeout: float | None = None,
        max_batch: int = 1,
        labels: tuple[str, ...] = (),
        claim_leases: bool = False,
        lease_ttl: float | None = None,
    ) -> None:
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0, got {block_ms!r}")
        if reclaim_older_than_ms is not None and reclaim_older_than_ms < 0:
            raise ValueError(f"reclaim_older_than_ms must be >= 0, got {reclaim_older_than_ms!r}")
        if ack_timeout is not None and not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0, got {ack_timeout!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.control_plane = control_plane
        self.worker_id = worker_id
        self.slots = slots
        self.on_claim = on_claim
        self.block_ms = block_ms
        self.gate: ClaimGate = gate if gate is not None else OpenGate()
        self.reclaim_older_than_ms = reclaim_older_than_ms
        self.ack_timeout = ack_timeout
        self.max_batch = max_batch
        self._leases: ClaimsLeases | None = (
            control_plane
            if claim_leases
            and isinstance(control_plane, ClaimsLeases)
            and isinstance(control_plane, ClaimsBatches)
            else None
        )
        self.lease_ttl = lease_ttl
        # Claims go through the batch path when several slots may be filled at once,
        # and whenever the claim grants leases (a batch of one, then).
        self._batches: ClaimsBatches | None = (
            control_plane
            if (max_batch > 1 or self._leases is not None)
            and isinstance(control_plane, ClaimsBatches)
            else None
        )
        self.labels = tuple(labels)
        self._rng = rng if rng is not None else random.Random()
        self._state = PollerState.IDLE
        self._polls = 0
        self._claims = 0
        self._empty = 0
        self._errors = 0
        self._skipped = 0
        self._failures = 0
        self._fatal_reported = False
        self._poll_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Poller worker_id={self.worker_id!r} state={self._state.value}>"

    def interrupt_poll(self) -> bool:
        """Abandon the poll in flight, if any; the poller then asks its gate again.

        For a circuit breaker that trips while a poll it permitted is still
        waiting on the server: without this, that poll would claim work for a
        worker that is now wedged (typically the very item its wedged session
        just gave back). Returns whether a poll was interrupted. An item the
        server handed out in the instant before the interruption is not acked;
        it comes back after the reclaim window.
        """
        scope = self._poll_scope
        if scope is None:
            return False
        scope.cancel()
        return True

    def statistics(self) -> PollerStatistics:
        """A snapshot of the counters and the current state."""
        return PollerStatistics(
            state=self._state,
            polls=self._polls,
            claims=self._claims,
            empty_polls=self._empty,
            errors=self._errors,
            skipped=self._skipped,
            consecutive_errors=self._failures,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim work forever (until cancelled).

        Raises:
            FatalError: the control plane refused the poll (or an ack) for a
                reason retrying cannot fix; logged once per poller.
        """
        task_status.started()
        try:
            while True:
                await self._claim_one()
        finally:
            self._state = PollerState.STOPPED

    async def _claim_one(self) -> None:
        """Take a slot, claim one item into it, hand both over (or give the slot back).

        With a control plane that claims in batches, every other slot free at
        that moment is taken too, and one call claims up to that many items.
        """
        slot = Slot(self.slots)
        self._state = PollerState.WAITING_FOR_SLOT
        await slot.acquire()
        if self._batches is not None:
            await self._claim_batch(self._batches, slot)
            return
        handed_over = False
        try:
            item = await self._poll_until_claimed()
            if item is None:
                return  # the ack was refused: the slot goes back, we start over
            self._state = PollerState.HANDING_OVER
            try:
                await self.on_claim(item, slot)
            except BaseException:
                self.gate.claim_result(None)
                raise
            handed_over = True
            self._claims += 1
            self.gate.claim_result(item.id)
        finally:
            if not handed_over:
                slot.release()

    async def _claim_batch(self, plane: ClaimsBatches, first: Slot) -> None:
        """Claim up to one item per free slot in one call; hand each over with its slot.

        Every slot is taken before the claim (DESIGN §3.3: no lease on work that
        cannot start at once), and the slots no item came for go back at once.
        """
        slots = [first]
        try:
            while len(slots) < self.max_batch:
                extra = Slot(self.slots)
                if not extra.acquire_nowait():
                    break
                slots.append(extra)
            grants: dict[str, LeasedClaim] = {}
            items = await self._claim_until_some(plane, slots, grants)
            self._state = PollerState.HANDING_OVER
            for item in items:
                slot = slots.pop(0)
                slot.grant = grants.get(item.id)
                try:
                    await self.on_claim(item, slot)
                except BaseException:
                    slot.release()
                    self.gate.claim_result(None)
                    raise
                self._claims += 1
                self.gate.claim_result(item.id)
        finally:
            for slot in slots:
                slot.release()

    async def _claim_until_some(
        self, plane: ClaimsBatches, slots: list[Slot], grants: dict[str, LeasedClaim]
    ) -> list[WorkItem]:
        """Claim (holding ``slots``) until at least one item came; a leased claim's
        grants go to ``grants``, by item id."""

        async def claim() -> list[WorkItem]:
            # Asked after the gate's permission: a probe claims one item, and a gate
            # that knows nothing of batches grants one item per permission.
            gate, wanted = self.gate, len(slots)
            if isinstance(gate, BatchGate):
                wanted = max(1, min(wanted, gate.permitted_claims(wanted)))
            else:
                wanted = 1
            if self._leases is None:
                return await plane.claim(
                    worker_id=self.worker_id,
                    limit=wanted,
                    block_ms=self.block_ms,
                    reclaim_older_than_ms=self.reclaim_older_than_ms,
                    labels=self.labels,
                )
            claimed = await self._leases.claim_leased(
                worker_id=self.worker_id,
                limit=wanted,
                block_ms=self.block_ms,
                reclaim_older_than_ms=self.reclaim_older_than_ms,
                labels=self.labels,
                desired_ttl_seconds=self.lease_ttl,
            )
            grants.clear()  # only the answer that is handed over counts
            grants.update((claim.item.id, claim) for claim in claimed)
            return [claim.item for claim in claimed]

        # As for an ack (see ``ack_timeout``): a claim answered too late is not
        # trusted; its items come back when their ack leases run out.
        limit = math.inf if self.ack_timeout is None else self.block_ms / 1000 + self.ack_timeout
        return await self._ask_until_found("claim", claim, limit=limit)

    async def _poll_until_claimed(self) -> WorkItem | None:
        """Poll (holding a slot) until an item is acknowledged; ``None`` if its ack was refused."""

        async def poll() -> WorkItem | None:
            return await self.control_plane.poll(
                worker_id=self.worker_id,
                block_ms=self.block_ms,
                reclaim_older_than_ms=self.reclaim_older_than_ms,
                labels=self.labels,
            )

        item = await self._ask_until_found("poll", poll)
        return await self._ack(item)

    async def _ask_until_found(
        self, call: str, request: Callable[[], Awaitable[_Found | None]], *, limit: float = math.inf
    ) -> _Found:
        """Ask the control plane (``request``, a poll or a claim) until it hands out work.

        Each try waits for the gate's permission first and reports back to it;
        failures back off, an empty answer pauses (see `_after_empty_poll`), an
        interruption (`interrupt_poll`) asks the gate again, and an answer later
        than ``limit`` seconds is not trusted.
        """
        while True:
            self._state = PollerState.PAUSED
            await self.gate.wait_for_permission()
            self._state = PollerState.POLLING
            self._polls += 1
            started = trio.current_time()
            found: _Found | None = None
            scope = self._poll_scope = trio.CancelScope()
            try:
                with scope, trio.fail_after(limit):
                    found = await request()
            except trio.TooSlowError:
                self.gate.claim_result(None)
                late = TransientError(f"no answer within {limit:g}s; {call} abandoned")
                await self._back_off(call, late)
                continue
            except TransientError as exc:
                self.gate.claim_result(None)
                await self._back_off(call, exc)
                continue
            except FatalError as exc:
                self.gate.claim_result(None)
                self._report_fatal(call, exc)
                raise
            finally:
                self._poll_scope = None
            if scope.cancelled_caught:
                self.gate.claim_result(None)  # interrupted: ask the gate again
                continue
            self._succeeded()
            if not found:
                self._empty += 1
                self.gate.claim_result(None)
                await self._after_empty_poll(trio.current_time() - started)
                continue
            return found

    async def _ack(self, item: WorkItem) -> WorkItem | None:
        self._state = PollerState.ACKING
        limit = math.inf if self.ack_timeout is None else self.ack_timeout
        try:
            with trio.fail_after(limit):
                acked = await self.control_plane.ack(item.id, worker_id=self.worker_id)
        except trio.TooSlowError:
            # Too late to trust: the item comes back when its ack lease runs out.
            self.gate.claim_result(None)
            await self._back_off(
                "ack", TransientError(f"no answer within {limit:g}s; claim of {item.id} abandoned")
            )
            return None
        except _SKIP_ON_ACK as exc:
            self._skipped += 1
            self.gate.claim_result(None)
            logger.warning(
                "skipping work item %s: ack refused (%s: %s)", item.id, type(exc).__name__, exc
            )
            return None
        except TransientError as exc:
            landed = await self._ack_landed(item, limit)
            if landed is None:
                # The item comes back to the queue after the reclaim window.
                self.gate.claim_result(None)
                await self._back_off("ack", exc)
                return None
            acked = landed
        except FatalError as exc:
            self.gate.claim_result(None)
            self._report_fatal("ack", exc)
            raise
        self._succeeded()
        # The ack's answer is the fresh state; the session credential only
        # comes with the poll.
        if acked.secret is None and item.secret is not None:
            acked = attrs.evolve(acked, secret=item.secret)
        return acked

    async def _ack_landed(self, item: WorkItem, limit: float) -> WorkItem | None:
        """After an ack whose answer was lost: the item, if the ack took effect after all.

        A server that dies (or a connection that breaks) after committing the
        ack but before answering leaves the item ``starting`` and bound to this
        worker; giving up on it would strand it until its ack lease runs out and
        spend one of its attempts. One look (through whichever server answers
        now) tells: bound to us and never beaten means the ack is ours.
        """
        try:
            with trio.fail_after(limit):
                current = await self.control_plane.get(item.id)
        except (trio.TooSlowError, ControlPlaneError):
            return None
        if (
            current.state is WorkState.STARTING
            and current.worker_id == self.worker_id
            and current.latest_heartbeat_at is None
        ):
            logger.info("ack of work item %s took effect although its answer was lost", item.id)
            return current
        return None

    async def _after_empty_poll(self, elapsed: float) -> None:
        if self.block_ms > 0 and elapsed >= 0.5 * self.block_ms / 1000:
            # The server held the poll open: asking again at once is not a busy loop.
            await trio.lowlevel.checkpoint()
            return
        self._state = PollerState.EMPTY_PAUSE
        await trio.sleep(self._rng.uniform(*EMPTY_PAUSE))

    async def _back_off(self, call: str, exc: TransientError) -> None:
        self._errors += 1
        self._failures += 1
        delay = poll_backoff(self._failures) + self._rng.uniform(0.0, 1.0)
        # One warning per run of failures; the rest at DEBUG, so a long outage
        # does not flood the log.
        log = logger.warning if self._failures == 1 else logger.debug
        log(
            "%s failed (%d in a row), retrying in %.1fs: %s: %s",
            call,
            self._failures,
            delay,
            type(exc).__name__,
            exc,
        )
        self._state = PollerState.BACKOFF
        await trio.sleep(delay)

    def _succeeded(self) -> None:
        if self._failures:
            logger.info("control plane reachable again after %d failed call(s)", self._failures)
        self._failures = 0

    def _report_fatal(self, call: str, exc: FatalError) -> None:
        self._errors += 1
        if self._fatal_reported:
            return
        self._fatal_reported = True
        status = f" {exc.status_code}" if exc.status_code is not None else ""
        logger.error(
            "the control plane refused the %s (%s%s: %s); the poller stops claiming work. "
            "Check the environment key and the environment id.",
            call,
            type(exc).__name__,
            status,
            exc,
        )
