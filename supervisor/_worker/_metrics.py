"""Worker metrics: heartbeat timing and the Prometheus view of a worker.

Two halves, so that a worker embedded without the local API pays for neither
a registry nor a text format:

- :class:`HeartbeatMeter` and :class:`TimedControlPlane` measure lease
  heartbeats where they happen (every call the lease keepers make goes through
  the wrapper). The meter is plain counters; the worker owns one.
- :class:`WorkerCollector` reads a worker's counters at scrape time and
  :func:`worker_registry` puts it in a ``CollectorRegistry`` of its own, one
  per worker: two workers in one process never share (or double-count)
  metrics, and nothing lands in ``prometheus_client``'s global registry.

Every figure is read at scrape time from the worker itself, so the counters
cannot drift from what ``status`` and ``/health`` show. ``prometheus_client`` is
imported only by the second half, when a registry is made: a worker's own
import does not load it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import attrs
import trio

from ..controlplane._exceptions import ControlPlaneError
from ..controlplane._models import HeartbeatResult, OutcomeStatus, WorkStats
from ..controlplane._protocol import ControlPlane

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from ._config import WorkerConfig
    from ._wedge import WedgeState

__all__ = [
    "HEARTBEAT_BUCKETS",
    "HeartbeatMeter",
    "LatencyHistogram",
    "TimedControlPlane",
    "MeteredWorker",
    "WorkerCollector",
    "WorkerStats",
    "render_metrics",
    "timed_control_plane",
    "worker_registry",
]

#: Upper bounds (seconds) of the heartbeat latency buckets: a loopback or LAN
#: control plane answers in milliseconds; anything past a second eats into the
#: 0.8 x ttl deadline and deserves its own bucket.
HEARTBEAT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The content type of the Prometheus text format ``render_metrics`` produces.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class LatencyHistogram:
    """Observations counted in fixed buckets, the way a Prometheus histogram is.

    Attributes:
        bounds: the buckets' upper bounds, ascending (``+Inf`` is implicit).
        count: observations so far.
        total: their sum, in seconds.
    """

    bounds: tuple[float, ...] = HEARTBEAT_BUCKETS
    count: int = 0
    total: float = 0.0
    _counts: list[int] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or not all(
            math.isfinite(b) and b > 0 for b in self.bounds
        ):
            raise ValueError(f"bucket bounds must be ascending positive numbers: {self.bounds}")
        self._counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations <= it)`` pairs ending with ``+Inf``, as exposed."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(_bound_text, self.bounds), "+Inf"), self._counts, strict=True):
            running += n
            pairs.append((bound, running))
        return pairs


def _bound_text(bound: float) -> str:
    return repr(float(bound))


@attrs.define(eq=False)
class HeartbeatMeter:
    """What the worker's lease heartbeats cost and how often they failed.

    Attributes:
        latency: seconds per heartbeat call that got an answer (success or refusal).
        failures: heartbeat calls that raised a control-plane error.
    """

    latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)
    failures: int = 0


class TimedControlPlane:
    """A ``ControlPlane`` that times every ``heartbeat`` on its way through.

    Everything else is passed on untouched (use :func:`timed_control_plane`
    for a statically typed one). A cancelled heartbeat is not counted: it has
    no latency, only an interruption.

    Args:
        inner: the control plane doing the work.
        meter: where the figures go.
    """

    def __init__(self, inner: ControlPlane, meter: HeartbeatMeter) -> None:
        self.inner = inner
        self.meter = meter

    def __repr__(self) -> str:
        return f"<TimedControlPlane {self.inner!r}>"

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        started = trio.current_time()
        try:
            result = await self.inner.heartbeat(
                work_id,
                expected_last_heartbeat=expected_last_heartbeat,
                desired_ttl_seconds=desired_ttl_seconds,
            )
        except ControlPlaneError:
            self.meter.failures += 1
            self.meter.latency.observe(trio.current_time() - started)
            raise
        self.meter.latency.observe(trio.current_time() - started)
        return result

    def __getattr__(self, name: str) -> Any:
        # Everything but ``heartbeat`` goes straight through, including methods
        # the protocol gains later: the wrapper never has to follow its growth.
        return getattr(self.inner, name)

    async def aclose(self) -> None:
        """Does nothing: the wrapped control plane belongs to whoever opened it."""


def timed_control_plane(inner: ControlPlane, meter: HeartbeatMeter) -> ControlPlane:
    """``inner`` with its heartbeats timed into ``meter``.

    Typed as the protocol it passes on: the wrapper forwards every other
    member dynamically, which a static checker cannot follow.
    """
    return cast(ControlPlane, TimedControlPlane(inner, meter))


# --- the Prometheus view ---------------------------------------------------------------


@attrs.frozen
class WorkerStats:
    """Counters for health checks and metrics.

    Attributes:
        worker_id: this worker's id.
        capacity: ``max_concurrency``.
        active: sessions running now.
        outcomes: finished sessions by outcome status.
        lease_losses: sessions that ended because their lease was lost.
        started: sessions started since the worker started.
        draining: whether the worker stopped claiming work.
        restarts: restarts the worker's supervisors made (services, poller, ...).
    """

    worker_id: str
    capacity: int
    active: int
    outcomes: Mapping[str, int]
    lease_losses: int
    started: int
    draining: bool
    restarts: int = 0

    @property
    def busy(self) -> bool:
        return self.active >= self.capacity


class MeteredWorker(Protocol):
    """What the collector reads of a worker (a ``Worker`` is one).

    A Protocol rather than ``Worker`` itself, so that the worker can import its
    meter from here without this module importing the worker back.
    """

    @property
    def worker_id(self) -> str: ...

    @property
    def config(self) -> WorkerConfig: ...

    @property
    def heartbeat_meter(self) -> HeartbeatMeter: ...

    @property
    def wedge(self) -> WedgeState: ...

    def stats(self) -> WorkerStats: ...


class WorkerCollector:
    """A ``prometheus_client`` collector that reads one worker at scrape time.

    Args:
        worker: the worker to describe.

    Attributes:
        queue: the control plane's queue figures, when the caller fetched them
            for this scrape (the collector itself never does I/O: collection is
            synchronous).
    """

    def __init__(self, worker: MeteredWorker) -> None:
        self.worker = worker
        self.queue: WorkStats | None = None

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        worker = self.worker
        stats = worker.stats()
        info = InfoMetricFamily(
            "supervisor_worker", "The worker this process runs.", labels=["worker_id"]
        )
        info.add_metric([worker.worker_id], {"environment_id": worker.config.environment_id})
        yield info

        sessions = CounterMetricFamily(
            "supervisor_sessions", "Sessions that ended, by outcome.", labels=["outcome"]
        )
        for status in OutcomeStatus:
            sessions.add_metric([status.value], stats.outcomes.get(status.value, 0))
        yield sessions
        yield CounterMetricFamily(
            "supervisor_sessions_started", "Sessions started.", value=stats.started
        )
        yield GaugeMetricFamily(
            "supervisor_sessions_active", "Sessions running now.", value=stats.active
        )
        yield GaugeMetricFamily(
            "supervisor_session_capacity", "Sessions allowed at once.", value=stats.capacity
        )
        yield GaugeMetricFamily(
            "supervisor_draining",
            "1 while the worker has stopped claiming work (draining), else 0.",
            value=int(stats.draining),
        )
        yield CounterMetricFamily(
            "supervisor_restarts",
            "Restarts made by the worker's supervisors (services, work, poller).",
            value=stats.restarts,
        )
        yield CounterMetricFamily(
            "supervisor_lease_losses",
            "Sessions that ended because their lease was lost.",
            value=stats.lease_losses,
        )

        meter = worker.heartbeat_meter
        histogram = HistogramMetricFamily(
            "supervisor_heartbeat_latency_seconds",
            "Lease heartbeat round trips that got an answer.",
        )
        histogram.add_metric([], meter.latency.cumulative(), sum_value=meter.latency.total)
        yield histogram
        yield CounterMetricFamily(
            "supervisor_heartbeat_failures",
            "Lease heartbeats the control plane refused or did not answer.",
            value=meter.failures,
        )

        wedge = worker.wedge
        yield GaugeMetricFamily(
            "supervisor_wedged",
            "1 while the agent runtime is marked wedged, else 0.",
            value=int(wedge.is_wedged),
        )
        yield CounterMetricFamily(
            "supervisor_wedges", "Times the agent runtime was marked wedged.", value=wedge.marks
        )

        if self.queue is not None:
            yield GaugeMetricFamily(
                "supervisor_queue_depth",
                "Work items waiting in the control plane's queue (this environment).",
                value=self.queue.depth,
            )
            yield GaugeMetricFamily(
                "supervisor_queue_pending",
                "Work items handed out and not yet stopped (this environment).",
                value=self.queue.pending,
            )


def worker_registry(worker: MeteredWorker) -> tuple[CollectorRegistry, WorkerCollector]:
    """A registry of the worker's own, holding only its collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    collector = WorkerCollector(worker)
    registry.register(collector)
    return registry, collector


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry))
