"""Worker metrics: the heartbeat meter, the timing wrapper, the Prometheus view."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from supervisor import (
    ChildSpec,
    ControlPlaneUnavailable,
    Restart,
    Supervisor,
    SupervisorSpec,
    Worker,
    WorkerConfig,
)
from supervisor._worker._metrics import (
    HeartbeatMeter,
    LatencyHistogram,
    TimedControlPlane,
    render_metrics,
    worker_registry,
)
from supervisor.controlplane import NO_HEARTBEAT, ControlPlane, WorkStats
from supervisor.testing import ScriptedControlPlane


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_histogram_counts_each_observation_in_its_bucket_cumulatively() -> None:
    histogram = LatencyHistogram(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0, -1.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert histogram.count == 5
    assert histogram.total == pytest.approx(3.65)


@pytest.mark.parametrize("bounds", [(1.0, 0.5), (0.5, 0.5), (0.0, 1.0), (float("inf"),)])
def test_histogram_refuses_bounds_that_are_not_ascending_positive(
    bounds: tuple[float, ...],
) -> None:
    with pytest.raises(ValueError, match="ascending"):
        LatencyHistogram(bounds=bounds)


def test_timed_control_plane_is_a_control_plane() -> None:
    """Every protocol method is passed through, so the wrapper fits wherever a plane does."""
    assert isinstance(TimedControlPlane(ScriptedControlPlane(), HeartbeatMeter()), ControlPlane)


async def test_heartbeat_latency_and_failures_are_measured_on_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = ScriptedControlPlane()
    meter = HeartbeatMeter()
    plane = TimedControlPlane(inner, meter)
    item = await plane.submit("x")
    assert await plane.poll(worker_id="w") is not None
    await plane.ack(item.id, worker_id="w")
    inner.set_latency("heartbeat", request=0.02, answer=0.01)
    beat = await plane.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert meter.latency.count == 1
    assert meter.latency.total == pytest.approx(0.03)
    inner.fail_next("heartbeat", ControlPlaneUnavailable("down"))
    with pytest.raises(ControlPlaneUnavailable):
        await plane.heartbeat(item.id, expected_last_heartbeat=beat.last_heartbeat)
    assert meter.failures == 1
    assert meter.latency.count == 2


async def test_a_cancelled_heartbeat_is_not_observed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = ScriptedControlPlane()
    meter = HeartbeatMeter()
    plane = TimedControlPlane(inner, meter)
    inner.hang("heartbeat")
    with trio.move_on_after(1):
        await plane.heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT)
    assert (meter.latency.count, meter.failures) == (0, 0)


async def test_total_restarts_keeps_counting_across_reruns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Per-child restart counts start over with each run; the supervisor's total does not."""
    crashes = 0

    async def flaky() -> None:
        nonlocal crashes
        await trio.sleep(1)
        crashes += 1
        raise RuntimeError("boom")

    sup = Supervisor(
        SupervisorSpec([ChildSpec("flaky", flaky, restart=Restart.TRANSIENT)], intensity=10)
    )
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(2.5)
            await sup.shutdown()
    assert crashes == 4
    assert sup.total_restarts == 4


def test_exposition_reflects_the_workers_counters(tmp_path: Path) -> None:
    worker = Worker(WorkerConfig(state_dir=tmp_path, worker_id="w-metrics", api_enabled=False))
    registry, collector = worker_registry(worker)
    worker.heartbeat_meter.latency.observe(0.003)
    worker.wedge.mark("control request timeout")
    collector.queue = WorkStats(depth=5, pending=2, oldest_queued_at=None, workers_polling=1)
    found = samples(render_metrics(registry).decode())
    assert (
        found[
            ("supervisor_worker_info", (("environment_id", "default"), ("worker_id", "w-metrics")))
        ]
        == 1
    )
    assert found[("supervisor_sessions_total", (("outcome", "completed"),))] == 0
    assert found[("supervisor_sessions_total", (("outcome", "lease_lost"),))] == 0
    assert found[("supervisor_session_capacity", ())] == 4
    assert found[("supervisor_sessions_active", ())] == 0
    assert found[("supervisor_restarts_total", ())] == 0
    assert found[("supervisor_lease_losses_total", ())] == 0
    assert found[("supervisor_heartbeat_latency_seconds_count", ())] == 1
    assert found[("supervisor_heartbeat_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert found[("supervisor_heartbeat_latency_seconds_bucket", (("le", "0.001"),))] == 0
    assert found[("supervisor_wedged", ())] == 1
    assert found[("supervisor_wedges_total", ())] == 1
    assert found[("supervisor_queue_depth", ())] == 5
    collector.queue = None
    worker.wedge.clear()
    found = samples(render_metrics(registry).decode())
    assert found[("supervisor_wedged", ())] == 0
    assert ("supervisor_queue_depth", ()) not in found


def test_two_workers_never_share_a_registry(tmp_path: Path) -> None:
    one = Worker(WorkerConfig(state_dir=tmp_path, worker_id="one", api_enabled=False))
    two = Worker(WorkerConfig(state_dir=tmp_path, worker_id="two", api_enabled=False))
    one.heartbeat_meter.latency.observe(0.5)
    text_two = render_metrics(worker_registry(two)[0]).decode()
    assert samples(text_two)[("supervisor_heartbeat_latency_seconds_count", ())] == 0
    assert 'worker_id="one"' not in text_two
