"""Deterministic fleet simulation: real workers, one control plane, seeded faults.

A simulation runs several real :class:`~supervisor.Worker`\\ s against one
embedded control plane (an in-memory SQLite store) inside a single
``trio.run`` under ``trio.testing.MockClock(autojump_threshold=0)``: hours of
leases, timeouts and back-offs pass in a fraction of a second, and the same
seed replays the same run exactly.

What is real and what is simulated
----------------------------------

Real: the workers (poller, sessions, lease keepers, the supervision tree), the
control-plane store and its lease rules, the in-process agent runner.
Simulated: the network between each worker and the control plane (a
:class:`~supervisor.testing.FaultyControlPlane` per worker, driven by a
seeded fault schedule), the agents (in-process functions whose behaviour --
finish, crash, hang, wedge, ignore cancellation for a while -- is drawn per
attempt), and the workspaces (:class:`~supervisor.testing.MemoryWorkspaces`:
directories made in worker threads would let the mock clock jump while a
thread works); the worker's other blocking call, the fsync of a session's
journal entry, runs inline (``Worker(offload=run_inline)``) for the same reason.

Determinism
-----------

Everything random is drawn from ``random.Random`` instances seeded from the
seed: the schedule, each link's per-call draws, each worker's poll pauses and
lease-keeper jitter, the agents' behaviour. Trio's scheduler also breaks ties
with a module-level ``random.Random`` (``trio._core._run._r``); the
simulation seeds it for the run and restores it afterwards. Ids the store
mints at random never reach the trace (items are named by their submission
index), so the trace hash is a fingerprint of the run's behaviour.

The faults and how they are modelled
------------------------------------

* 5xx, timeouts, spurious 412s, 401 bursts, latency and partitions act on one
  worker's link (see :mod:`supervisor.testing._faults`).
* **Killed worker**: the link is cut first (:meth:`FaultyControlPlane.kill`),
  then the worker's cancel scope is cancelled. A process killed with
  ``SIGKILL`` sends no goodbye; in one Trio run the worker's tasks do get
  cancelled and its lease keepers do try their shielded final ``stop``, but
  over a dead link it never arrives, which is the same thing as seen from the
  control plane. The worker comes back later under a new id (a restarted
  process), or never.
* **Revoked key**: every call of one worker answers 401 from some instant on.
  Its poller crashes at once each time it is restarted, so the worker must
  give up with ``RestartIntensityExceeded``: the one way a run may end in an
  escalation. Short 401 bursts (at most two bursts of at most two calls per
  worker, fewer than the ``work`` supervisor's intensity of five) must never
  escalate.
* **Slow clocks**: all workers share one ``MockClock``, so a worker whose clock
  runs slow cannot be modelled as such. What a slow clock does to a lease is
  stretch the time between the instant the control plane starts a ttl and the
  instant the worker believes it started; that is exactly what answer latency
  does, so slow clocks are modelled as heartbeat latency (``LATENCY`` faults,
  answers delayed by up to half a ttl). The lease keeper's deadline counts from
  the send time, so no amount of it may cause split brain; counted from the
  answer (the planted bug), it does.
* **Agents** finish, crash, fall silent (the wedge detector's silence
  watchdog ends them, or ``session_timeout``), print the wedge pattern and
  hang (the detector cancels the session as ``wedged``, the item is requeued
  and the worker's claim breaker trips), or ignore cancellation for a while (a
  shielded clean-up of at most 15 % of the ttl, inside the 20 % margin the
  0.8 x ttl deadline leaves before the control plane may hand the item to
  someone else). Working agents report progress every half ttl.
* **Operator cancels**: ``request_stop`` on an item at a random instant.
* **Control-plane restart**: every link refuses calls (connection refused) for
  a while, and a call processed just before it loses its answer; the state
  survives, as a durable store's does.
* **Wall-clock step** of the control plane: backwards by up to two ttls (leases
  last longer), or forwards by a sliver (a forward step eats into the margin
  between the worker's deadline and the server's expiry; no worker can
  defend against a larger one).
* **Poison**: a submit holding a lone surrogate (it must be refused), and
  agents whose result holds one (it must be recorded, repaired).

Invariants
----------

Checked when an agent starts and ends, on every monitor tick, and at the end
(a :class:`Violation` each time one fails):

* ``split-brain``: an agent serves an item while the control plane says the
  lease is not its worker's (expired, requeued, or held by another worker).
* ``deadline``: an agent runs past its worker's own lease deadline (plus the
  time the agent is known to ignore cancellation).
* ``lost``: an item has not ended by the time limit.
* ``finished-twice``: the control plane accepted more than one final ``stop``
  for an item, or recorded another outcome than the accepted stop carried.
* ``attempts``: an item used more attempts than allowed, or was dead-lettered
  before using them all.
* ``restart-budget``: a worker gave up (``RestartIntensityExceeded``) without a
  revoked key, kept going with one, or crashed with another exception.
* ``stuck``: a worker did not stop within ``stop_timeout`` of being cancelled.
* ``leak``: tasks, sessions or workspaces left behind once every worker stopped.
* ``completed-lost``: a session that completed was lost or run again because
  of the worker: its last final stop was refused for a stale token of its own
  still-live lease, or nothing else (no fault of any kind on its link, no
  restart, clock step, kill or cancel around it) can be blamed.
* ``poison``: a lone surrogate was accepted, or the store holds text that
  UTF-8 cannot encode.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio
import trio.testing

from .._tree._exceptions import RestartIntensityExceeded
from .._worker._agent import AgentContext
from .._worker._config import WorkerConfig
from .._worker._lease import KeeperOptions
from .._worker._worker import Worker
from ..controlplane import _codec as codec
from ..controlplane._embedded import EmbeddedControlPlane
from ..controlplane._exceptions import BadRequest, ControlPlaneError
from ..controlplane._models import Outcome, WorkItem, WorkState
from ..controlplane._store import LeasePolicy, SQLiteStore
from ._faults import CallRecord, Fault, FaultKind, FaultyControlPlane
from ._workspaces import MemoryWorkspaces

__all__ = [
    "AgentBehaviour",
    "Behaviour",
    "FaultMix",
    "SimConfig",
    "SimResult",
    "Simulation",
    "Violation",
    "generate_schedule",
    "run_inline",
    "run_simulation",
]

#: The line a wedged agent runtime prints (DESIGN §3.5's default pattern matches it).
WEDGE_LINE: Final = "Error: Control request timeout: initialize"
#: POSIX time the simulated control-plane clock starts from.
BASE_TIME: Final = 1_700_000_000.0
#: Slack for float comparisons of trio times.
_EPSILON: Final = 1e-6
_LIVE_STATES: Final = frozenset({WorkState.STARTING, WorkState.ACTIVE, WorkState.STOPPING})

SimAgent = Callable[[AgentContext], Awaitable[object]]


class Behaviour(enum.StrEnum):
    """What a simulated agent does on one attempt."""

    OK = "ok"  # works a while, then returns a result
    SLOW = "slow"  # works for several ttls (heartbeats matter)
    CRASH = "crash"  # raises after a while
    HANG = "hang"  # never returns (ends by session_timeout)
    WEDGE = "wedge"  # prints the wedge pattern, then never returns
    SHIELDED = "shielded"  # works a while; ignores cancellation for ``shield`` seconds


@attrs.frozen
class AgentBehaviour:
    """One attempt's behaviour, drawn from the seed, the item and the attempt number."""

    kind: Behaviour
    duration: float = 0.0
    shield: float = 0.0


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class FaultMix:
    """How many faults of each kind a schedule draws, per worker (or per run).

    Each value is an expected count within the fault window: ``1.4`` means one
    fault, and a second one with probability 0.4. Set a value to 0 to leave
    that fault out; :meth:`none` leaves them all out.
    """

    latency: float = attrs.field(default=1.0, validator=_non_negative)
    errors: float = attrs.field(default=0.6, validator=_non_negative)
    timeouts: float = attrs.field(default=0.4, validator=_non_negative)
    fencing: float = attrs.field(default=0.3, validator=_non_negative)
    unauthorized: float = attrs.field(default=0.3, validator=_non_negative)
    partition: float = attrs.field(default=0.5, validator=_non_negative)
    kill: float = attrs.field(default=0.25, validator=_non_negative)
    #: Per run: the chance that one worker's key is revoked (it must give up).
    revoked: float = attrs.field(default=0.03, validator=_non_negative)
    #: Per run: expected operator cancels (``request_stop``).
    cancels: float = attrs.field(default=0.2, validator=_non_negative)
    #: Per run: expected control-plane restarts (every link refuses calls for a while).
    restarts: float = attrs.field(default=0.15, validator=_non_negative)
    #: Per run: expected steps of the control plane's wall clock.
    clock_steps: float = attrs.field(default=0.15, validator=_non_negative)
    #: Per item and attempt: the chance that a finishing agent's result holds a
    #: lone surrogate (it must be recorded, repaired); and per run, one submit
    #: with a lone surrogate (it must be refused) when above 0.
    poison: float = attrs.field(default=0.1, validator=_non_negative)

    @classmethod
    def none(cls) -> FaultMix:
        return cls(
            latency=0,
            errors=0,
            timeouts=0,
            fencing=0,
            unauthorized=0,
            partition=0,
            kill=0,
            revoked=0,
            cancels=0,
            restarts=0,
            clock_steps=0,
            poison=0,
        )


def _default_behaviours() -> dict[Behaviour, float]:
    return {
        Behaviour.OK: 0.55,
        Behaviour.SLOW: 0.15,
        Behaviour.CRASH: 0.08,
        Behaviour.HANG: 0.04,
        Behaviour.WEDGE: 0.06,
        Behaviour.SHIELDED: 0.12,
    }


@attrs.frozen(kw_only=True)
class SimConfig:
    """The shape of every simulated run (the seed picks the details).

    Attributes:
        workers: workers sharing the control plane.
        items: work items submitted per run.
        max_concurrency: sessions per worker.
        lease_ttl: the ttl the workers ask for (and the store's ack lease).
        session_timeout: execution limit per session (ends hanging agents).
        max_attempts: the store's attempts before it dead-letters an item.
        fault_window: faults start within ``[0, fault_window)`` seconds.
        time_limit: simulated seconds after which an unfinished item is lost.
        stop_timeout: how long a cancelled worker may take to stop.
        tick: the monitor's period, in simulated seconds.
        poll_block_ms: the workers' long-poll.
        faults: how many faults of each kind to draw.
        behaviours: weights of the agents' behaviours.
        agent: your agent, run for ``ok`` and ``slow`` attempts instead of the
            built-in sleep (crash, hang, wedge and shielded attempts stay
            simulated around it). It must not touch its workspace path.
        worker_options: extra `WorkerConfig` fields (your configuration); the
            simulation's own defaults include ``wedge_timeout`` (two thirds of
            ``session_timeout``) and ``probe_interval`` (five ttls).
        keeper_options: extra ``LeaseKeeper`` options for every worker (this is
            how a test plants ``measure_from=MeasureFrom.ANSWER``).
    """

    workers: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    items: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    max_concurrency: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    lease_ttl: float = attrs.field(default=6.0, validator=attrs.validators.gt(0))
    session_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    fault_window: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    time_limit: float = attrs.field(default=1800.0, validator=attrs.validators.gt(0))
    stop_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    tick: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    poll_block_ms: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    faults: FaultMix = attrs.field(factory=FaultMix)
    behaviours: Mapping[Behaviour, float] = attrs.field(factory=_default_behaviours)
    agent: SimAgent | None = None
    worker_options: Mapping[str, Any] = attrs.field(factory=dict)
    keeper_options: KeeperOptions = attrs.field(factory=KeeperOptions)


@attrs.frozen
class Violation:
    """A broken invariant.

    Attributes:
        kind: which invariant (see the module notes).
        time: simulated seconds since the start of the run.
        detail: what happened, with item indexes and worker names.
    """

    kind: str
    time: float
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at t={self.time:.3f}: {self.detail}"


@attrs.frozen
class SimResult:
    """What one seeded run found.

    Attributes:
        seed: the seed.
        violations: broken invariants, in the order found.
        trace_hash: SHA-256 of the event trace; equal for equal runs.
        trace: the event lines, when the run kept them.
        faults: the schedule that was applied.
        outcomes: final outcome status per item (or the item's state if it did not end).
        sim_time: simulated seconds the run took.
        wall_time: real seconds the run took.
        events: lines in the trace.
    """

    seed: int
    violations: tuple[Violation, ...]
    trace_hash: str
    trace: tuple[str, ...]
    faults: tuple[Fault, ...]
    outcomes: tuple[str, ...]
    sim_time: float
    wall_time: float
    events: int

    @property
    def ok(self) -> bool:
        return not self.violations


# --- the schedule ---------------------------------------------------------------------


def _how_many(rng: random.Random, expected: float) -> int:
    whole = int(expected)
    return whole + (1 if rng.random() < expected - whole else 0)


def generate_schedule(seed: int, config: SimConfig) -> list[Fault]:
    """The faults of run ``seed``: a pure function of the seed and the config.

    Durations are in units of the lease ttl, so that the same schedule shape
    stresses short and long leases alike: partitions from a fifth of a ttl
    (harmless) to three ttls (the lease is lost), answer delays up to half a
    ttl (a heartbeat answered after the deadline of a keeper that counts from
    the answer).
    """
    rng = random.Random(f"supervisor-sim:{seed}:schedule")
    mix = config.faults
    ttl = config.lease_ttl
    window = config.fault_window
    faults: list[Fault] = []
    # At most workers - 1 workers may be gone for good (revoked key or never
    # restarted), so someone is always left to finish the items.
    gone_for_good = 0
    revoked: int | None = None
    if config.workers > 1 and rng.random() < mix.revoked:
        revoked = rng.randrange(config.workers)
        gone_for_good += 1
        faults.append(Fault(FaultKind.REVOKED, revoked, rng.uniform(0, window)))
    for worker in range(config.workers):
        for _ in range(_how_many(rng, mix.latency)):
            low = rng.uniform(0.05, 0.25) * ttl
            slow = Fault(
                FaultKind.LATENCY,
                worker,
                rng.uniform(0, window),
                duration=rng.uniform(1.0, 8.0) * ttl,
                delay=(0.0, rng.uniform(0.0, 0.1) * ttl),
                response_delay=(low, low + rng.uniform(0.0, 0.25) * ttl),
            )
            faults.append(slow)
            if rng.random() < 0.5:
                # A brown-out that ends in an outage: the last answers came late,
                # then nothing comes for a while.
                faults.append(
                    Fault(
                        FaultKind.PARTITION,
                        worker,
                        rng.uniform(slow.start, slow.end),
                        duration=rng.uniform(0.5, 3.0) * ttl,
                    )
                )
        for _ in range(_how_many(rng, mix.errors)):
            faults.append(
                Fault(
                    FaultKind.ERRORS,
                    worker,
                    rng.uniform(0, window),
                    duration=rng.uniform(0.3, 3.0) * ttl,
                    rate=rng.uniform(0.2, 0.9),
                )
            )
        for _ in range(_how_many(rng, mix.timeouts)):
            faults.append(
                Fault(
                    FaultKind.TIMEOUTS,
                    worker,
                    rng.uniform(0, window),
                    duration=rng.uniform(0.5, 3.0) * ttl,
                    rate=rng.uniform(0.1, 0.6),
                    timeout=rng.uniform(0.1, 1.0) * ttl,
                )
            )
        for _ in range(_how_many(rng, mix.fencing)):
            faults.append(Fault(FaultKind.FENCING, worker, rng.uniform(0, window), count=1))
        for _ in range(min(2, _how_many(rng, mix.unauthorized))):
            faults.append(
                Fault(
                    FaultKind.UNAUTHORIZED, worker, rng.uniform(0, window), count=rng.randint(1, 2)
                )
            )
        for _ in range(_how_many(rng, mix.partition)):
            faults.append(
                Fault(
                    FaultKind.PARTITION,
                    worker,
                    rng.uniform(0, window),
                    duration=rng.uniform(0.2, 3.0) * ttl,
                )
            )
        if worker != revoked:
            for _ in range(min(2, _how_many(rng, mix.kill))):
                forever = gone_for_good < config.workers - 1 and rng.random() < 0.2
                gone_for_good += forever
                faults.append(
                    Fault(
                        FaultKind.KILL,
                        worker,
                        rng.uniform(0, window),
                        duration=math.inf if forever else rng.uniform(0.2, 5.0) * ttl,
                    )
                )
    # Run-wide faults, from their own stream so the per-worker faults above
    # stay what they were for every seed.
    extra = random.Random(f"supervisor-sim:{seed}:schedule:run-wide")
    for _ in range(_how_many(extra, mix.restarts)):
        at, down = extra.uniform(0, window), extra.uniform(0.1, 1.5) * ttl
        faults.extend(
            Fault(FaultKind.RESTART, worker, at, duration=down) for worker in range(config.workers)
        )
    for _ in range(_how_many(extra, mix.clock_steps)):
        # Backwards by up to two ttls (leases last longer: harmless), or forwards
        # by a sliver. A forward step eats into the 20 % of the ttl the worker's
        # deadline leaves before the server's expiry, as much as the step: no
        # worker can defend against a server clock that jumps ahead further.
        step = (
            -extra.uniform(0, 2.0) * ttl if extra.random() < 0.7 else extra.uniform(0, 0.02) * ttl
        )
        faults.append(Fault(FaultKind.CLOCK_STEP, 0, extra.uniform(0, window), offset=step))
    faults.sort(key=lambda f: (f.start, f.worker, f.kind.value))
    return faults


def _draw_behaviour(seed: int, item: int, attempt: int, config: SimConfig) -> AgentBehaviour:
    rng = random.Random(f"supervisor-sim:{seed}:agent:{item}:{attempt}")
    kinds = sorted(config.behaviours, key=lambda b: b.value)
    weights = [config.behaviours[k] for k in kinds]
    kind = rng.choices(kinds, weights)[0] if sum(weights) > 0 else Behaviour.OK
    ttl = config.lease_ttl
    if kind is Behaviour.SLOW:
        return AgentBehaviour(kind, duration=rng.uniform(2.0, 5.0) * ttl)
    if kind is Behaviour.SHIELDED:
        return AgentBehaviour(
            kind, duration=rng.uniform(0.5, 4.0) * ttl, shield=rng.uniform(0.01, 0.15) * ttl
        )
    return AgentBehaviour(kind, duration=rng.uniform(0.05, 1.5) * ttl)


# --- the run ------------------------------------------------------------------------------


async def run_inline(function: Callable[..., Any], *args: Any) -> Any:
    """``Worker(offload=...)`` for simulations: call the blocking function in the Trio thread.

    A worker thread would let ``MockClock``'s autojump move time while it works
    (a task waiting on a thread counts as blocked), and threads finish in an
    order the seed does not decide. The calls are short local file writes.
    """
    await trio.lowlevel.checkpoint()
    return function(*args)


class _SimClock:
    """The control plane's wall clock: a fixed base plus Trio's (mock) time.

    Read outside a Trio run (after it ended) it answers the last value it read.
    """

    def __init__(self, base: float) -> None:
        self.base = base
        self.last = base

    def __call__(self) -> float:
        with contextlib.suppress(RuntimeError):
            self.last = self.base + trio.current_time()
        return self.last


@attrs.define(eq=False)
class _AgentRun:
    worker: str
    work_id: str
    item: int
    attempt: int
    behaviour: AgentBehaviour
    started: float
    ended: float | None = None
    flagged: set[str] = attrs.field(factory=set)
    #: The agent returned a result (the session completed).
    completed: bool = False


@attrs.define(eq=False)
class _WorkerSlot:
    """One simulated worker process across its incarnations (killed, restarted)."""

    index: int
    link: FaultyControlPlane
    workspaces: MemoryWorkspaces
    worker: Worker | None = None
    scope: trio.CancelScope | None = None
    incarnation: int = 0
    killed_until: float | None = None
    gave_up: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    workers: list[Worker] = attrs.field(factory=list)


@contextlib.contextmanager
def _deterministic_trio(seed: int) -> Iterator[None]:
    """Make Trio's scheduling a function of ``seed`` for the runs inside the block.

    Trio runs each batch of runnable tasks in an order that depends on how
    they were woken (heap ties broken by ``id()``, sets of tasks), then
    reverses it at random. Trio has a switch for exactly this purpose (its
    Hypothesis integration uses it): sort every batch by task creation order,
    then shuffle it with the module's ``random.Random``. The simulation turns
    it on, seeds the generator, and restores both afterwards. Different seeds
    still explore different orders. Both are private to Trio: there is no
    public hook, so a future Trio may need this revisited (the determinism
    test in the test suite would say so).
    """
    from trio._core import _run as trio_run

    generator = getattr(trio_run, "_r", None)
    flag = getattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", None)
    if not isinstance(generator, random.Random) or flag is None:  # pragma: no cover
        yield
        return
    state = generator.getstate()
    generator.seed(f"supervisor-sim:{seed}:trio")
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    try:
        yield
    finally:
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]
        generator.setstate(state)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the package's loggers for a run: faults are the point, not news."""
    if verbose:
        yield
        return
    root = logging.getLogger("supervisor")
    level = root.level
    root.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        root.setLevel(level)


class Simulation:
    """One seeded run of a fleet (use :func:`run_simulation` for the common case).

    Args:
        seed: picks the fault schedule, the agents' behaviour and the scheduling order.
        config: the shape of the run.
        keep_trace: keep the event lines in the result (the hash is always computed).
        verbose: let the package log (to whatever logging is configured).
        schedule: these faults instead of the seed's (to replay a scenario you
            wrote by hand); the seed still picks agents and scheduling order.
    """

    def __init__(
        self,
        seed: int,
        config: SimConfig | None = None,
        *,
        keep_trace: bool = False,
        verbose: bool = False,
        schedule: Sequence[Fault] | None = None,
    ) -> None:
        self.seed = seed
        self.config = config if config is not None else SimConfig()
        self.keep_trace = keep_trace
        self.verbose = verbose
        if schedule is None:
            self.schedule = generate_schedule(seed, self.config)
        else:
            self.schedule = sorted(schedule, key=lambda f: (f.start, f.worker, f.kind.value))
            for fault in self.schedule:
                if fault.worker >= self.config.workers:
                    raise ValueError(f"{fault.describe()}: there are {self.config.workers} workers")
        self._clock = _SimClock(BASE_TIME)
        self._hash = hashlib.sha256()
        self._trace: list[str] = []
        self._events = 0
        self._violations: list[Violation] = []
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._starts: dict[int, int] = {}
        self._live: list[_AgentRun] = []
        self._workers: dict[str, Worker] = {}
        self._slots: list[_WorkerSlot] = []
        self._accepted_stops: dict[str, list[Outcome | None]] = {}
        self._stopping = False
        self._store: SQLiteStore | None = None
        self._plane: EmbeddedControlPlane | None = None
        self._state_root: Path | None = None
        self._outcomes: list[str] = []
        self._all_done = trio.Event()
        self._runs: list[_AgentRun] = []
        self._cancelled_items: set[int] = set()
        #: Per (worker, work id): whether that worker's last stop (or requeue)
        #: of the item was refused for a stale token while the lease was its own.
        self._last_stop: dict[tuple[str, str], bool] = {}

    # --- entry points ------------------------------------------------------------

    def run(self) -> SimResult:
        """Run to the end in a fresh ``trio.run`` under a ``MockClock``; return what was found."""
        started = time.perf_counter()
        clock = trio.testing.MockClock(autojump_threshold=0)
        with (
            _deterministic_trio(self.seed),
            _quiet(self.verbose),
            tempfile.TemporaryDirectory(prefix="supervisor-sim-") as root,
        ):
            self._state_root = Path(root)
            end = trio.run(self._main, clock=clock)
        return SimResult(
            seed=self.seed,
            violations=tuple(self._violations),
            trace_hash=self._hash.hexdigest(),
            trace=tuple(self._trace),
            faults=tuple(self.schedule),
            outcomes=tuple(self._outcomes),
            sim_time=end,
            wall_time=time.perf_counter() - started,
            events=self._events,
        )

    # --- bookkeeping -------------------------------------------------------------

    def _now(self) -> float:
        return trio.current_time()

    def _event(self, text: str) -> None:
        line = f"{self._now():.6f} {text}"
        self._events += 1
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        if self.keep_trace:
            self._trace.append(line)

    def _violate(self, kind: str, detail: str) -> None:
        violation = Violation(kind, self._now(), detail)
        self._violations.append(violation)
        self._event(f"VIOLATION {violation}")

    def _item_name(self, work_id: str | None) -> str:
        if work_id is None:
            return "-"
        index = self._index.get(work_id)
        return f"#{index}" if index is not None else "?"

    def _observe(self, call: CallRecord) -> None:
        outcome = "ok" if call.error is None else call.error
        injected = f" [{call.injected}]" if call.injected else ""
        processed = " processed" if call.processed and call.error is not None else ""
        self._event(
            f"{call.name} {call.op} {self._item_name(call.work_id)} {outcome}{injected}{processed}"
        )
        if call.op in ("stop", "requeue") and call.work_id is not None:
            # The last word of a worker on an item: a refusal of a stale token
            # of its own, still live lease, never followed by another try.
            refused_own = (
                call.injected is None
                and call.error == "FencingConflict"
                and self._held_by(call.work_id, call.name)
            )
            self._last_stop[(call.name, call.work_id)] = refused_own
        if call.op == "stop" and call.processed and call.work_id is not None:
            outcome_sent = call.args.get("outcome")
            self._accepted_stops.setdefault(call.work_id, []).append(
                outcome_sent if isinstance(outcome_sent, Outcome) else None
            )

    def _held_by(self, work_id: str, worker: str) -> bool:
        """Whether the control plane says ``worker`` holds the item's lease right now."""
        if self._store is None or self._plane is None:
            return False
        try:
            item = self._store.get(self._plane.environment_id, work_id, now=self._clock())
        except ControlPlaneError:
            return False
        return item.state in _LIVE_STATES and item.worker_id == worker

    # --- the main task -----------------------------------------------------------

    async def _main(self) -> float:
        config = self.config
        store = self._store = SQLiteStore(
            ":memory:",
            lease_policy=LeasePolicy(
                default_ttl=config.lease_ttl,
                min_ttl=min(0.5, config.lease_ttl),
                max_ttl=max(3600.0, config.lease_ttl),
                max_attempts=config.max_attempts,
                reclaim_older_than_ms=max(1, int(config.lease_ttl * 1000)),
            ),
        )
        plane = self._plane = EmbeddedControlPlane(
            store, threaded=False, clock=self._clock, poll_interval=0.5
        )
        baseline = trio.lowlevel.current_statistics().tasks_living
        try:
            await self._run_fleet(plane)
        finally:
            with trio.CancelScope(shield=True):
                await plane.aclose()
            try:
                self._final_checks(baseline)
            finally:
                store.close()
        return self._now()

    async def _run_fleet(self, plane: EmbeddedControlPlane) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            for index in range(config.workers):
                slot = _WorkerSlot(
                    index,
                    FaultyControlPlane(
                        plane,
                        self.schedule,
                        worker=index,
                        rng=random.Random(f"supervisor-sim:{self.seed}:link:{index}"),
                        name=f"w{index}",
                        observer=self._observe,
                    ),
                    MemoryWorkspaces(),
                )
                self._slots.append(slot)
                nursery.start_soon(self._run_slot, slot)
            nursery.start_soon(self._drive_faults)
            nursery.start_soon(self._monitor)
            await self._submit_items()
            await self._wait_until_done()
            await self._stop_workers()
            nursery.cancel_scope.cancel()

    async def _submit_items(self) -> None:
        config = self.config
        assert self._plane is not None
        rng = random.Random(f"supervisor-sim:{self.seed}:submits")
        times = sorted(
            0.0 if n < (config.items + 1) // 2 else rng.uniform(0, config.fault_window / 2)
            for n in range(config.items)
        )
        if config.faults.poison > 0:
            await self._submit_poison()
        for number, at in enumerate(times):
            await trio.sleep_until(at)
            item = await self._plane.submit(f"simulated task {number}", session_id=f"sim-{number}")
            self._index[item.id] = number
            self._ids.append(item.id)
            self._starts[number] = 0
            self._event(f"submit #{number}")

    async def _submit_poison(self) -> None:
        """A submit holding a lone surrogate must be refused before anything is written."""
        assert self._plane is not None and self._store is not None
        env = self._plane.environment_id
        before = len(self._store.list_work(env, now=self._clock(), limit=1000))
        try:
            item = await self._plane.submit("poison \udfff", metadata={"k": "\ud800"})
        except BadRequest:
            self._event("poison submit refused")
        except Exception as exc:  # the store failing to write it is the bug, found
            self._violate("poison", f"a submit with a lone surrogate raised {type(exc).__name__}")
        else:
            self._violate("poison", f"a submit with a lone surrogate was accepted as {item.id}")
        if len(self._store.list_work(env, now=self._clock(), limit=1000)) != before:
            self._violate("poison", "a refused submit wrote an item")

    async def _wait_until_done(self) -> None:
        """Until every item ended (and any revoked key had time to bite), or the time limit."""
        config = self.config
        revoked = [f.start for f in self.schedule if f.kind is FaultKind.REVOKED]
        settle = max(revoked, default=0.0) + 5 * config.lease_ttl + 10.0 if revoked else 0.0
        with trio.move_on_at(config.time_limit):
            await self._all_done.wait()  # the monitor sets it
            await trio.sleep_until(settle)

    def _all_ended(self) -> bool:
        assert self._store is not None and self._plane is not None
        env = self._plane.environment_id
        now = self._clock()
        return all(
            self._store.get(env, work_id, now=now).state is WorkState.STOPPED
            for work_id in self._ids
        )

    async def _stop_workers(self) -> None:
        self._stopping = True
        self._event("stopping workers")
        for slot in self._slots:
            if slot.scope is not None:
                slot.scope.cancel()
        with trio.move_on_after(self.config.stop_timeout):
            for slot in self._slots:
                await slot.done.wait()
        for slot in self._slots:
            if not slot.done.is_set():
                self._violate(
                    "stuck",
                    f"worker w{slot.index} did not stop within {self.config.stop_timeout:g}s "
                    "of being cancelled",
                )

    # --- workers -----------------------------------------------------------------

    def _worker_config(self, name: str, index: int) -> WorkerConfig:
        config = self.config
        assert self._state_root is not None
        values: dict[str, Any] = {
            "state_dir": self._state_root / name,
            "worker_id": name,
            "max_concurrency": config.max_concurrency,
            "lease_ttl": config.lease_ttl,
            # in-process agents have no grace; it only has to fit the lease
            "agent_grace": 0.1 * config.lease_ttl,
            "session_timeout": config.session_timeout,
            "poll_block_ms": config.poll_block_ms,
            "api_enabled": False,
            "drain_timeout": 0.0,
            # Silent agents count as wedged before the session timeout ends them,
            # and a wedged worker probes again within a few leases.
            "wedge_timeout": config.session_timeout * 2 / 3,
            "probe_interval": 5 * config.lease_ttl,
        }
        values.update(config.worker_options)
        return WorkerConfig(**values)

    async def _run_slot(self, slot: _WorkerSlot) -> None:
        try:
            while not self._stopping:
                name = f"w{slot.index}" + (f".{slot.incarnation}" if slot.incarnation else "")
                slot.link.name = name
                seed = f"supervisor-sim:{self.seed}:{name}"
                keeper_options = KeeperOptions(rng=random.Random(f"{seed}:lease"))
                keeper_options.update(self.config.keeper_options)
                worker = Worker(
                    self._worker_config(name, slot.index),
                    control_plane=slot.link,
                    agent=self._agent_for(name),
                    keeper_options=keeper_options,
                    rng=random.Random(f"{seed}:poller"),
                    workspaces=slot.workspaces,
                    offload=run_inline,
                )
                slot.worker = worker
                slot.workers.append(worker)
                self._workers[name] = worker
                self._event(f"{name} starts")
                with trio.CancelScope() as scope:
                    slot.scope = scope
                    try:
                        await worker.run()
                    except RestartIntensityExceeded as exc:
                        slot.gave_up = True
                        self._event(f"{name} gave up: {exc.supervisor}")
                        revoked = any(
                            f.kind is FaultKind.REVOKED
                            and f.worker == slot.index
                            and f.start <= self._now()
                            for f in self.schedule
                        )
                        if not revoked:
                            self._violate(
                                "restart-budget",
                                f"{name} gave up without a revoked key: {exc}",
                            )
                        return
                    except Exception as exc:
                        self._violate(
                            "restart-budget", f"{name} crashed: {type(exc).__name__}: {exc}"
                        )
                        return
                self._event(f"{name} stopped")
                if slot.killed_until is None or math.isinf(slot.killed_until):
                    return
                with trio.CancelScope() as scope:
                    slot.scope = scope  # the end of the run interrupts the wait
                    await trio.sleep_until(slot.killed_until)
                slot.scope = None
                if scope.cancelled_caught:
                    return
                slot.killed_until = None
                slot.link.revive()
                slot.incarnation += 1
        finally:
            slot.done.set()

    def _kill(self, slot: _WorkerSlot, fault: Fault) -> None:
        if slot.done.is_set() or self._stopping:
            return
        if slot.killed_until is not None:
            return  # already down: a dead worker cannot be killed again
        restart = fault.start + fault.duration
        slot.killed_until = restart
        self._event(f"kill {slot.link.name} (back at {restart:.3f})")
        slot.link.kill()
        if slot.scope is not None:
            slot.scope.cancel()

    async def _drive_faults(self) -> None:
        """Apply the faults the links cannot apply themselves: kills and operator cancels."""
        assert self._plane is not None
        rng = random.Random(f"supervisor-sim:{self.seed}:cancels")
        actions: list[tuple[float, str, Any]] = [
            (f.start, "kill", f) for f in self.schedule if f.kind is FaultKind.KILL
        ]
        actions += [(f.start, "clock", f) for f in self.schedule if f.kind is FaultKind.CLOCK_STEP]
        if self.config.items:
            for _ in range(_how_many(rng, self.config.faults.cancels)):
                at = rng.uniform(0, self.config.fault_window)
                actions.append((at, "cancel", rng.randrange(self.config.items)))
        actions.sort(key=lambda a: (a[0], a[1]))
        for at, what, arg in actions:
            await trio.sleep_until(at)
            if what == "kill":
                self._kill(self._slots[arg.worker], arg)
            elif what == "clock":
                self._clock.base += arg.offset
                self._event(f"control plane clock steps by {arg.offset:+.3f}s")
            elif arg < len(self._ids):
                self._cancelled_items.add(arg)
                self._event(f"operator cancels #{arg}")
                with contextlib.suppress(ControlPlaneError):
                    await self._plane.request_stop(self._ids[arg])

    # --- agents ------------------------------------------------------------------

    def _agent_for(self, worker: str) -> SimAgent:
        async def agent(ctx: AgentContext) -> object:
            return await self._serve(worker, ctx)

        agent.__name__ = agent.__qualname__ = f"simulated_agent_{worker}"
        return agent

    async def _serve(self, worker: str, ctx: AgentContext) -> object:
        item = self._index[ctx.work_id]
        attempt = self._starts[item]
        self._starts[item] = attempt + 1
        behaviour = _draw_behaviour(self.seed, item, attempt, self.config)
        run = _AgentRun(worker, ctx.work_id, item, attempt, behaviour, started=self._now())
        self._live.append(run)
        self._runs.append(run)
        self._event(f"{worker} agent #{item}/{attempt} {behaviour.kind.value} starts")
        self._check_run(run)
        try:
            result = await self._behave(behaviour, ctx, item)
            run.completed = True
            if self._poisoned(item, attempt) and isinstance(result, str):
                result += " \ud800"  # valid JSON escape, not valid Unicode
            return result
        finally:
            run.ended = self._now()
            self._check_run(run)
            self._live.remove(run)
            self._event(f"{worker} agent #{item}/{attempt} ends")

    def _poisoned(self, item: int, attempt: int) -> bool:
        rng = random.Random(f"supervisor-sim:{self.seed}:poison:{item}:{attempt}")
        return rng.random() < self.config.faults.poison

    async def _behave(self, behaviour: AgentBehaviour, ctx: AgentContext, item: int) -> object:
        kind = behaviour.kind
        if kind is Behaviour.WEDGE:
            ctx.emit(WEDGE_LINE)
            await trio.sleep_forever()
        if kind is Behaviour.HANG:
            await trio.sleep_forever()
        if kind is Behaviour.SHIELDED:
            try:
                await self._work(ctx, behaviour.duration)
            except trio.Cancelled:
                # Ignore the cancellation for a while (a slow clean-up), then honour it.
                with trio.CancelScope(shield=True):
                    await trio.sleep(behaviour.shield)
                raise
            return f"done #{item}"
        if kind is Behaviour.CRASH:
            await self._work(ctx, behaviour.duration)
            raise RuntimeError(f"simulated crash of the agent for #{item}")
        if self.config.agent is not None:
            return await self.config.agent(ctx)
        await self._work(ctx, behaviour.duration)
        return f"done #{item}"

    async def _work(self, ctx: AgentContext, seconds: float) -> None:
        """Work for ``seconds``, reporting progress every half ttl (as live agents do).

        Only hanging and wedged agents fall silent, so the silence watchdog
        (``wedge_timeout``) has something to tell apart.
        """
        step = self.config.lease_ttl / 2
        end = trio.current_time() + seconds
        while (left := end - trio.current_time()) > 0:
            await trio.sleep(min(step, left))
            ctx.emit("progress")

    # --- invariants --------------------------------------------------------------

    def _check_run(self, run: _AgentRun) -> None:
        """Split brain and deadline, for one agent, at this instant."""
        assert self._store is not None and self._plane is not None
        now = self._now()
        item = self._store.get(self._plane.environment_id, run.work_id, now=self._clock())
        holder = item.worker_id if item.state in _LIVE_STATES else None
        if holder != run.worker and "split-brain" not in run.flagged:
            run.flagged.add("split-brain")
            whose = f"held by {holder}" if holder else f"{item.state.value}, no lease"
            self._violate(
                "split-brain",
                f"{run.worker} serves #{run.item} (attempt {run.attempt}, "
                f"{run.behaviour.kind.value}) but the control plane says the item is {whose}",
            )
        deadline = self._deadline_of(run)
        if (
            deadline is not None
            and now > deadline + run.behaviour.shield + _EPSILON
            and "deadline" not in run.flagged
        ):
            run.flagged.add("deadline")
            self._violate(
                "deadline",
                f"{run.worker} serves #{run.item} at t={now:.3f}, past its lease deadline "
                f"{deadline:.3f} (+{run.behaviour.shield:.3f}s the agent ignores cancellation)",
            )

    def _deadline_of(self, run: _AgentRun) -> float | None:
        worker = self._workers.get(run.worker)
        if worker is None:
            return None
        for record in reversed(worker.sessions()):
            if record.work_id == run.work_id and record.lease is not None:
                return record.lease.deadline
        return None

    async def _monitor(self) -> None:
        while True:
            await trio.sleep(self.config.tick)
            for run in list(self._live):
                self._check_run(run)
            if len(self._ids) == self.config.items and self._all_ended():
                self._all_done.set()

    def _final_checks(self, baseline: int) -> None:
        assert self._store is not None and self._plane is not None
        config = self.config
        env = self._plane.environment_id
        now = self._clock()
        for work_id in self._ids:
            name = self._item_name(work_id)
            item = self._store.get(env, work_id, now=now)
            self._outcomes.append(
                item.outcome.status.value if item.outcome is not None else item.state.value
            )
            if item.state is not WorkState.STOPPED or item.outcome is None:
                self._violate(
                    "lost",
                    f"{name} is {item.state.value} after {self._now():.0f}s "
                    f"(attempts {item.attempts})",
                )
                continue
            stops = self._accepted_stops.get(work_id, [])
            if len(stops) > 1:
                self._violate("finished-twice", f"{name}: {len(stops)} final stops accepted")
            elif stops and stops[0] is not None and stops[0] != item.outcome:
                self._violate(
                    "finished-twice",
                    f"{name}: recorded {item.outcome.status.value} but the accepted stop "
                    f"reported {stops[0].status.value}",
                )
            if item.attempts > config.max_attempts:
                self._violate(
                    "attempts", f"{name}: {item.attempts} attempts > {config.max_attempts}"
                )
            if (
                not stops
                and item.outcome.reason == "lease expired"
                and item.attempts != config.max_attempts
            ):
                self._violate(
                    "attempts",
                    f"{name}: dead-lettered after {item.attempts} of "
                    f"{config.max_attempts} attempts",
                )
            self._check_completed_kept(work_id, item)
            self._check_text(work_id, item)
        listed = self._store.list_work(env, now=now, limit=1000)
        if len(listed) != len(self._ids):
            self._violate(
                "lost", f"{len(listed)} items on the control plane, {len(self._ids)} submitted"
            )
        for slot in self._slots:
            revoked = any(
                f.kind is FaultKind.REVOKED and f.worker == slot.index for f in self.schedule
            )
            if revoked and not slot.gave_up and slot.done.is_set():
                self._violate("restart-budget", f"w{slot.index} kept going with a revoked key")
            for worker in slot.workers:
                active = worker.stats().active
                if active:
                    self._violate("leak", f"{worker.worker_id} still has {active} sessions")
            if slot.workspaces.active:
                self._violate(
                    "leak", f"w{slot.index}: {slot.workspaces.active} workspaces never released"
                )
        if self._live:
            self._violate("leak", f"{len(self._live)} agents still running")
        living = trio.lowlevel.current_statistics().tasks_living
        if living != baseline:
            self._violate("leak", f"{living - baseline} tasks left behind")

    def _check_completed_kept(self, work_id: str, item: WorkItem) -> None:
        """A session that completed is never lost or re-run because of the worker.

        Two rules. A worker whose last stop was refused for a stale token while
        the control plane still gave that worker the lease is always at fault
        (it did not account for a heartbeat it sent). Otherwise a loss
        counts only where nothing else can be blamed: no fault of any kind on
        that worker's link (latency included), no restart or clock step, no
        kill and no operator cancel from the agent's start to a ttl after it
        ended.
        """
        assert item.outcome is not None
        index = self._index[work_id]
        runs = sorted((r for r in self._runs if r.work_id == work_id), key=lambda r: r.started)
        for number, run in enumerate(runs):
            if not run.completed or run.ended is None:
                continue
            rerun = number < len(runs) - 1
            lost = item.outcome.status.value != "completed"
            if not (rerun or lost):
                continue
            what = "ran again" if rerun else f"ended {item.outcome.status.value}"
            key = (run.worker, work_id)
            if self._last_stop.get(key, False):
                self._violate(
                    "completed-lost",
                    f"#{index}: {run.worker}'s agent completed, its final stop was refused "
                    f"with a stale token of its own lease and never sent again; the item {what}",
                )
            elif self._blameless(run):
                self._violate(
                    "completed-lost",
                    f"#{index}: {run.worker}'s agent completed, then the item {what} "
                    "with no fault to blame",
                )
            return

    def _blameless(self, run: _AgentRun) -> bool:
        assert run.ended is not None
        if run.item in self._cancelled_items:
            return False
        low, high = run.started, run.ended + self.config.lease_ttl
        slot = _slot_of(run.worker)
        for fault in self.schedule:
            run_wide = fault.kind in (FaultKind.RESTART, FaultKind.CLOCK_STEP)
            if fault.worker != slot and not run_wide:
                continue
            if fault.kind is FaultKind.REVOKED and fault.start <= high:
                return False
            end = fault.end if fault.duration > 0 else fault.start
            if fault.kind in (FaultKind.FENCING, FaultKind.UNAUTHORIZED, FaultKind.KILL):
                end = math.inf  # a burst lasts until used; a kill until the restart
            if fault.start <= high and end >= low:
                return False
        return True

    def _check_text(self, work_id: str, item: WorkItem) -> None:
        """What the store holds can always be answered as UTF-8 JSON (no lone surrogate)."""
        try:
            json.dumps(codec.encode_work_item(item), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            self._violate("poison", f"#{self._index[work_id]} holds text UTF-8 cannot encode")


def _slot_of(worker: str) -> int:
    return int(worker[1:].partition(".")[0])


def run_simulation(
    seed: int,
    config: SimConfig | None = None,
    *,
    keep_trace: bool = False,
    verbose: bool = False,
    schedule: Sequence[Fault] | None = None,
) -> SimResult:
    """Run one seeded simulation to the end and return what it found.

    Synchronous: it starts its own ``trio.run`` (under a ``MockClock``), so call
    it from plain code, not from inside a Trio run. One at a time per process:
    it seeds Trio's scheduler, which is process-wide (run seeds in parallel in
    separate processes). See :class:`Simulation` for the arguments.
    """
    return Simulation(seed, config, keep_trace=keep_trace, verbose=verbose, schedule=schedule).run()
