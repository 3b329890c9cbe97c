"""Focused tests of the supervision tree: one behaviour of DESIGN §2 each."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from supervisor import (
    AutoShutdown,
    Backoff,
    ChildSpec,
    ChildStartError,
    ChildState,
    EventKind,
    ExitKind,
    Restart,
    RestartIntensityExceeded,
    Shutdown,
    Strategy,
    Supervisor,
    SupervisorError,
    SupervisorEvent,
    SupervisorSpec,
    current_child,
    open_supervisor,
)


class Log:
    """Records what children do, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.starts: dict[str, int] = {}

    def add(self, line: str) -> None:
        self.lines.append(line)

    def started(self, name: str) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        self.add(f"start {name}")


def forever(log: Log, name: str) -> Callable[..., Awaitable[None]]:
    async def child(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.started(name)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            log.add(f"stop {name}")

    return child


class Controlled:
    """A child whose fate the test decides: crash, return or raise Shutdown on cue."""

    def __init__(self, log: Log, name: str) -> None:
        self.log = log
        self.name = name
        self.order: trio.MemorySendChannel[str] | None = None

    async def __call__(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        send, receive = trio.open_memory_channel[str](1)
        self.order = send
        self.log.started(self.name)
        task_status.started()
        try:
            what = await receive.receive()
        finally:
            self.log.add(f"stop {self.name}")
        if what == "crash":
            raise ValueError(f"{self.name} crashed")
        if what == "shutdown":
            raise Shutdown()

    async def do(self, what: str) -> None:
        assert self.order is not None
        order, self.order = self.order, None
        await order.send(what)
        await trio.testing.wait_all_tasks_blocked()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# ---------------------------------------------------------------- validation


def _noop_target() -> Callable[..., Awaitable[None]]:
    async def target() -> None:
        await trio.lowlevel.checkpoint()

    return target


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda t: SupervisorSpec([ChildSpec("a", t), ChildSpec("a", t)]),
            "duplicate child id 'a'",
        ),
        (
            lambda t: ChildSpec("a", t, restart=Restart.PERMANENT, significant=True),
            "PERMANENT child cannot be significant",
        ),
        (
            lambda t: SupervisorSpec(
                [ChildSpec("a", t, restart=Restart.TEMPORARY, significant=True)]
            ),
            "significant but auto_shutdown is NEVER",
        ),
        (lambda t: SupervisorSpec([], intensity=-1), "intensity must be >= 0"),
        (lambda t: SupervisorSpec([], period=0), "period must be > 0"),
        (lambda t: SupervisorSpec([], period=-2.0), "must be >= 0"),
        (lambda t: ChildSpec("a", t, shutdown=-1), "shutdown must be >= 0"),
        (lambda t: ChildSpec("", t), "non-empty string"),
        (lambda t: Backoff(initial=-0.1), "initial must be >= 0"),
        (lambda t: Backoff(jitter=2.0), "jitter is a fraction"),
        (lambda t: Backoff(initial=5, maximum=1), "maximum"),
        (lambda t: Backoff(multiplier=0.5), "multiplier must be >= 1"),
    ],
)
def test_specs_are_validated_with_a_clear_message(
    make: Callable[[Any], object], message: str
) -> None:
    """Bad specs fail at construction with ValueError naming the problem."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make(_noop_target())


def test_target_must_be_callable() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        ChildSpec("a", 42)  # type: ignore[arg-type]


def test_child_spec_detects_task_status() -> None:
    """Targets taking task_status start via nursery.start; others count as started at once."""

    async def with_status(*, task_status: trio.TaskStatus[None]) -> None: ...

    async def without() -> None: ...

    assert ChildSpec("a", with_status).accepts_task_status
    assert not ChildSpec("b", without).accepts_task_status


# ---------------------------------------------------------------- start / stop


async def test_children_start_in_order_and_stop_in_reverse() -> None:
    log = Log()
    spec = SupervisorSpec([ChildSpec(n, forever(log, n)) for n in "abc"])
    async with open_supervisor(spec) as sup:
        assert log.lines == ["start a", "start b", "start c"]
        assert [c.state for c in sup.which_children()] == [ChildState.RUNNING] * 3
    assert log.lines[3:] == ["stop c", "stop b", "stop a"]


async def test_each_child_is_awaited_for_readiness_before_the_next_starts() -> None:
    log = Log()

    async def slow(*, task_status: trio.TaskStatus[str]) -> None:
        await trio.sleep(1)
        log.add("slow ready")
        task_status.started("slow-value")
        await trio.sleep_forever()

    async with open_supervisor(
        SupervisorSpec([ChildSpec("slow", slow), ChildSpec("b", forever(log, "b"))])
    ):
        assert log.lines == ["slow ready", "start b"]


async def test_nursery_start_returns_once_all_children_started(nursery: trio.Nursery) -> None:
    log = Log()
    sup = Supervisor(SupervisorSpec([ChildSpec(n, forever(log, n)) for n in "ab"]))
    value = await nursery.start(sup.run)
    assert value is sup
    assert log.starts == {"a": 1, "b": 1}
    await sup.shutdown()
    assert not sup.running


async def test_start_failure_rolls_back_started_children_in_reverse() -> None:
    log = Log()

    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise OSError("port in use")

    spec = SupervisorSpec(
        [
            ChildSpec("a", forever(log, "a")),
            ChildSpec("b", forever(log, "b")),
            ChildSpec("c", broken),
        ]
    )
    started: list[object] = []

    class Status:
        def started(self, value: object = None) -> None:
            started.append(value)

    with pytest.raises(ChildStartError, match="'c' failed to start: OSError: port in use") as info:
        await Supervisor(spec).run(task_status=Status())
    assert started == []  # run() never signalled readiness
    assert isinstance(info.value.__cause__, OSError)
    assert log.lines == ["start a", "start b", "stop b", "stop a"]


async def test_child_returning_before_started_is_a_start_failure() -> None:
    async def lazy(*, task_status: trio.TaskStatus[None]) -> None:
        return None

    with pytest.raises(ChildStartError, match="'lazy' failed to start"):
        await Supervisor(SupervisorSpec([ChildSpec("lazy", lazy)])).run()


# ---------------------------------------------------------- exits and restarts


@pytest.mark.parametrize(
    ("restart", "fate", "restarted"),
    [
        (Restart.PERMANENT, "return", True),
        (Restart.PERMANENT, "shutdown", True),
        (Restart.PERMANENT, "crash", True),
        (Restart.TRANSIENT, "return", False),
        (Restart.TRANSIENT, "shutdown", False),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TEMPORARY, "return", False),
        (Restart.TEMPORARY, "shutdown", False),
        (Restart.TEMPORARY, "crash", False),
    ],
)
async def test_restart_table(restart: Restart, fate: str, restarted: bool) -> None:
    """Every row of the exit-kind x restart-type table."""
    log = Log()
    child = Controlled(log, "x")
    async with open_supervisor(SupervisorSpec([ChildSpec("x", child, restart=restart)])) as sup:
        await child.do(fate)
        assert log.starts["x"] == (2 if restarted else 1)
        ids = [c.id for c in sup.which_children()]
        if restart is Restart.TEMPORARY:
            assert ids == []  # a temporary child is removed once it ended
        else:
            assert ids == ["x"]
            expected = ChildState.RUNNING if restarted else ChildState.STOPPED
            assert sup.which_children()[0].state is expected


async def test_terminated_child_is_not_restarted_and_temporary_is_removed() -> None:
    log = Log()
    spec = SupervisorSpec(
        [
            ChildSpec("p", forever(log, "p")),
            ChildSpec("t", forever(log, "t"), restart=Restart.TEMPORARY),
        ]
    )
    async with open_supervisor(spec) as sup:
        await sup.terminate_child("p")
        await sup.terminate_child("t")
        await settle()
        assert log.starts == {"p": 1, "t": 1}
        assert [(c.id, c.state) for c in sup.which_children()] == [("p", ChildState.STOPPED)]
        snap = sup.snapshot().find("p")
        assert snap is not None
        assert snap.last_exit_kind is ExitKind.SHUTDOWN


@pytest.mark.parametrize(
    ("strategy", "expected_restarted"),
    [
        (Strategy.ONE_FOR_ONE, {"b"}),
        (Strategy.ONE_FOR_ALL, {"a", "b", "c"}),
        (Strategy.REST_FOR_ONE, {"b", "c"}),
    ],
)
async def test_strategies(strategy: Strategy, expected_restarted: set[str]) -> None:
    log = Log()
    b = Controlled(log, "b")
    spec = SupervisorSpec(
        [ChildSpec("a", forever(log, "a")), ChildSpec("b", b), ChildSpec("c", forever(log, "c"))],
        strategy=strategy,
    )
    async with open_supervisor(spec):
        log.lines.clear()
        await b.do("crash")
        restarted = {name for name, n in log.starts.items() if n == 2}
        assert restarted == expected_restarted
        stops = [line for line in log.lines if line.startswith("stop")]
        starts = [line for line in log.lines if line.startswith("start")]
        # the others stop in reverse start order; all restart in start order
        assert stops == ["stop b"] + [f"stop {n}" for n in "ca" if n in expected_restarted]
        assert starts == [f"start {n}" for n in "abc" if n in expected_restarted]


async def test_intensity_is_counted_per_supervisor_and_escalates() -> None:
    """4 restarts of *different* children within the period exceed intensity 3."""
    log = Log()
    kids = {n: Controlled(log, n) for n in "ab"}
    spec = SupervisorSpec(
        [ChildSpec(n, kids[n]) for n in "ab"], intensity=3, period=10.0, name="top"
    )
    with pytest.raises(RestartIntensityExceeded) as info:
        async with open_supervisor(spec):
            for name in "abab":
                await kids[name].do("crash")
            await trio.sleep_forever()
    error = info.value
    assert error.supervisor == "top"
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "b crashed"
    assert {e.child_id for e in error.history} == {"a", "b"}
    assert "top" in str(error) and "3 restarts in 10s" in str(error)
    assert isinstance(error, SupervisorError)
    assert log.starts == {"a": 3, "b": 2}  # the 4th restart was refused


async def test_intensity_window_slides(autojump_clock: trio.testing.MockClock) -> None:
    """Restarts spread wider than the period never escalate."""
    log = Log()
    kid = Controlled(log, "a")
    async with open_supervisor(
        SupervisorSpec([ChildSpec("a", kid)], intensity=1, period=5.0)
    ) as sup:
        for _ in range(6):
            await kid.do("crash")
            await trio.sleep(5.01)
        assert log.starts["a"] == 7
        assert sup.snapshot().restarts_in_window == 0


async def test_permanent_child_returning_in_a_loop_escalates() -> None:
    async def quitter() -> None:
        await trio.lowlevel.checkpoint()

    with pytest.raises(RestartIntensityExceeded) as info:
        await Supervisor(SupervisorSpec([ChildSpec("q", quitter)], intensity=2)).run()
    assert info.value.__cause__ is None
    # the three exits that spent the budget of 2, the escalating one last
    assert [e.kind for e in info.value.history] == [ExitKind.NORMAL] * 3


async def test_keyboard_interrupt_propagates_without_restart() -> None:
    starts = 0

    async def interrupted() -> None:
        nonlocal starts
        starts += 1
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    log = Log()
    spec = SupervisorSpec([ChildSpec("a", forever(log, "a")), ChildSpec("k", interrupted)])
    with pytest.raises(KeyboardInterrupt):
        await Supervisor(spec).run()
    assert starts == 1
    assert log.lines == ["start a", "stop a"]


# ------------------------------------------------------------ auto_shutdown


async def test_any_significant_stops_the_supervisor_and_records_the_reason() -> None:
    log = Log()
    lease = Controlled(log, "lease")
    spec = SupervisorSpec(
        [
            ChildSpec("lease", lease, restart=Restart.TEMPORARY, significant=True),
            ChildSpec(
                "runner", forever(log, "runner"), restart=Restart.TEMPORARY, significant=True
            ),
        ],
        strategy=Strategy.ONE_FOR_ALL,
        auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
    )
    sup = Supervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await lease.do("crash")
    assert not sup.running
    assert sup.exit_reason is not None
    assert sup.exit_reason.child_id == "lease"
    assert sup.exit_reason.kind is ExitKind.ABNORMAL
    assert isinstance(sup.exit_reason.exception, ValueError)
    assert log.lines[-2:] == ["stop lease", "stop runner"]


async def test_all_significant_waits_for_the_last_one() -> None:
    log = Log()
    a, b = Controlled(log, "a"), Controlled(log, "b")
    spec = SupervisorSpec(
        [
            ChildSpec("a", a, restart=Restart.TRANSIENT, significant=True),
            ChildSpec("b", b, restart=Restart.TRANSIENT, significant=True),
            ChildSpec("other", forever(log, "other")),
        ],
        auto_shutdown=AutoShutdown.ALL_SIGNIFICANT,
    )
    sup = Supervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await a.do("return")
        running_after_a = sup.running
        await b.do("shutdown")
    assert running_after_a
    assert not sup.running
    assert sup.exit_reason is not None and sup.exit_reason.child_id == "b"


async def test_terminating_a_significant_child_does_not_auto_shutdown() -> None:
    log = Log()
    spec = SupervisorSpec(
        [ChildSpec("s", forever(log, "s"), restart=Restart.TRANSIENT, significant=True)],
        auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
    )
    async with open_supervisor(spec) as sup:
        await sup.terminate_child("s")
        await settle()
        assert sup.running
        assert sup.exit_reason is None


async def test_restarted_significant_child_does_not_auto_shutdown() -> None:
    log = Log()
    s = Controlled(log, "s")
    spec = SupervisorSpec(
        [ChildSpec("s", s, restart=Restart.TRANSIENT, significant=True)],
        auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
    )
    async with open_supervisor(spec) as sup:
        await s.do("crash")
        assert sup.running and log.starts["s"] == 2


# ---------------------------------------------------------------- backoff


async def test_backoff_delays_restarts_exponentially(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []

    async def crasher() -> None:
        times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise RuntimeError("boom")

    backoff = Backoff(initial=1.0, maximum=4.0, multiplier=2.0, jitter=0.0, reset_after=100.0)
    spec = SupervisorSpec([ChildSpec("c", crasher)], intensity=5, period=1000.0, backoff=backoff)
    with pytest.raises(RestartIntensityExceeded):
        await Supervisor(spec).run()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps == [1.0, 2.0, 4.0, 4.0, 4.0]


async def test_backoff_jitter_uses_the_injected_random_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def run_once(seed: int) -> list[float]:
        backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rng=random.Random(seed))
        return [backoff.delay(n) for n in range(4)]

    first, again = run_once(7), run_once(7)
    assert first == again
    for n, delay in enumerate(first):
        base = min(8.0, 2.0**n)
        assert base * 0.5 <= delay <= base * 1.5
    assert run_once(8) != first


async def test_backoff_resets_after_stable_running(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []
    runs = [0.0, 0.0, 50.0, 0.0]  # how long each run lasts before crashing

    async def crasher() -> None:
        times.append(trio.current_time())
        await trio.sleep(runs[len(times) - 1] if len(times) <= len(runs) else 0)
        if len(times) > len(runs):
            await trio.sleep_forever()
        raise RuntimeError("boom")

    backoff = Backoff(initial=1.0, maximum=30.0, jitter=0.0, reset_after=10.0)
    async with open_supervisor(
        SupervisorSpec([ChildSpec("c", crasher)], intensity=10, period=1000.0, backoff=backoff)
    ):
        await trio.sleep(500)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    # delays 1, 2; then a 50 s stable run resets the count: delay 1 again, then 2
    assert gaps == [1.0, 2.0, 50.0 + 1.0, 2.0]


async def test_child_in_backoff_is_reported_and_can_be_terminated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    kid = Controlled(log, "k")
    spec = SupervisorSpec(
        [ChildSpec("k", kid)], backoff=Backoff(initial=10.0, maximum=10.0, jitter=0.0)
    )
    async with open_supervisor(spec) as sup:
        await kid.do("crash")
        assert sup.which_children()[0].state is ChildState.BACKOFF
        await sup.terminate_child("k")
        await trio.sleep(20)
        assert log.starts["k"] == 1
        assert sup.which_children()[0].state is ChildState.STOPPED


# ------------------------------------------------------- two-phase shutdown


async def test_cooperative_child_gets_its_grace_then_stops_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()

    async def polite() -> None:
        await current_child().stop_requested.wait()
        await trio.sleep(2)  # finishing its work
        log.add("finished cleanly")

    async with open_supervisor(SupervisorSpec([ChildSpec("p", polite, shutdown=5.0)])) as sup:
        start = trio.current_time()
        await sup.terminate_child("p")
        assert trio.current_time() - start == pytest.approx(2.0)
    assert log.lines == ["finished cleanly"]


async def test_cooperative_child_is_cancelled_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()

    async def slowpoke() -> None:
        current_child().stop_requested  # noqa: B018 - looking at it opts into the grace period
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            log.add("cancelled")
            raise

    async with open_supervisor(SupervisorSpec([ChildSpec("s", slowpoke, shutdown=3.0)])) as sup:
        start = trio.current_time()
        await sup.terminate_child("s")
        assert trio.current_time() - start == pytest.approx(3.0)
    assert log.lines == ["cancelled"]


async def test_child_that_never_looks_at_the_stop_request_is_cancelled_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with open_supervisor(
        SupervisorSpec([ChildSpec("a", forever(log, "a"), shutdown=30.0)])
    ) as sup:
        start = trio.current_time()
        await sup.terminate_child("a")
        assert trio.current_time() == start


async def test_shielded_child_is_reported_unresponsive_and_awaited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stubborn() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(10)

    async with open_supervisor(
        SupervisorSpec([ChildSpec("s", stubborn, shutdown=0)], unresponsive_after=1.0)
    ) as sup:
        events = sup.subscribe()
        start = trio.current_time()
        await sup.terminate_child("s")
        assert trio.current_time() - start == pytest.approx(10.0)
        kinds = []
        while True:
            try:
                kinds.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        unresponsive = [e for e in kinds if e.kind is EventKind.CHILD_UNRESPONSIVE]
        assert len(unresponsive) == 1
        assert unresponsive[0].time - start == pytest.approx(1.0)


async def test_host_cancellation_stops_children_in_order_then_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()

    async def polite(name: str) -> None:
        log.started(name)
        await current_child().stop_requested.wait()
        await trio.sleep(1)
        log.add(f"stop {name}")

    spec = SupervisorSpec([ChildSpec(n, polite, args=(n,)) for n in "abc"])
    with trio.move_on_after(5) as scope:
        await Supervisor(spec).run()
    assert scope.cancelled_caught
    assert log.lines[3:] == ["stop c", "stop b", "stop a"]


# ------------------------------------------------------------ nesting


async def test_nested_escalation_is_the_parents_abnormal_exit() -> None:
    log = Log()
    inner_kid = Controlled(log, "leaf")
    inner = Supervisor(SupervisorSpec([ChildSpec("leaf", inner_kid)], intensity=0, name="inner"))
    outer = Supervisor(SupervisorSpec([ChildSpec("inner", inner.run)], intensity=5, name="outer"))
    events: list[SupervisorEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        channel = outer.subscribe()
        await inner_kid.do("crash")
        await settle()
        while True:
            try:
                events.append(channel.receive_nowait())
            except trio.WouldBlock:
                break
        assert log.starts["leaf"] == 2  # the parent restarted the whole inner supervisor
        info = outer.which_children()[0]
        assert info.is_supervisor
        await outer.shutdown()
    exits = [e for e in events if e.kind is EventKind.CHILD_EXITED]
    assert exits[0].exit is not None and exits[0].exit.kind is ExitKind.ABNORMAL
    assert isinstance(exits[0].exit.exception, RestartIntensityExceeded)


async def test_snapshot_is_nested_frozen_and_json_serialisable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    inner = Supervisor(
        SupervisorSpec(
            [ChildSpec("leaf", forever(log, "leaf"))], name="inner", strategy=Strategy.ONE_FOR_ALL
        )
    )
    spec = SupervisorSpec(
        [
            ChildSpec("inner", inner.run),
            ChildSpec("w", forever(log, "w"), restart=Restart.TRANSIENT),
        ],
        name="root",
    )
    async with open_supervisor(spec) as sup:
        await trio.sleep(3)
        snap = sup.snapshot()
        data = json.loads(json.dumps(snap.as_dict()))
        assert data["name"] == "root"
        assert [c["id"] for c in data["children"]] == ["inner", "w"]
        nested = data["children"][0]["supervisor"]
        assert nested["name"] == "inner" and nested["strategy"] == "one_for_all"
        assert nested["children"][0]["state"] == "running"
        assert data["children"][1]["restart"] == "transient"
        assert data["children"][1]["uptime"] == pytest.approx(3.0)
        leaf = snap.find("inner", "leaf")
        assert leaf is not None and leaf.state is ChildState.RUNNING
        with pytest.raises(AttributeError):
            snap.name = "x"  # type: ignore[misc]
        counts = sup.count_children()
        assert (counts.specs, counts.active, counts.supervisors, counts.workers) == (2, 2, 1, 1)


async def test_parent_stop_request_shuts_nested_supervisor_down_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()

    async def polite(name: str) -> None:
        log.started(name)
        await current_child().stop_requested.wait()
        log.add(f"stop {name}")

    inner = Supervisor(
        SupervisorSpec([ChildSpec(n, polite, args=(n,)) for n in "xy"], name="inner")
    )
    async with open_supervisor(SupervisorSpec([ChildSpec("inner", inner.run)])) as sup:
        await sup.terminate_child("inner")
        # targets without task_status count as started at once, so their first lines may
        # run in any order; the stop order is the contract
        assert sorted(log.lines[:2]) == ["start x", "start y"]
        assert log.lines[2:] == ["stop y", "stop x"]


# ------------------------------------------------------- dynamic children


async def test_dynamic_children_lifecycle() -> None:
    log = Log()

    async def valued(*, task_status: trio.TaskStatus[int]) -> None:
        log.started("v")
        task_status.started(42)
        await trio.sleep_forever()

    async with open_supervisor(SupervisorSpec([], name="dyn")) as sup:
        assert await sup.start_child(ChildSpec("v", valued)) == 42
        with pytest.raises(ValueError, match="already has a child 'v'"):
            await sup.start_child(ChildSpec("v", valued))
        assert await sup.restart_child("v") == 42
        assert log.starts["v"] == 2
        with pytest.raises(RuntimeError, match="terminate it first"):
            await sup.delete_child("v")
        await sup.terminate_child("v")
        await sup.delete_child("v")
        assert sup.which_children() == []
        with pytest.raises(LookupError, match="no child 'v'"):
            await sup.terminate_child("v")


async def test_start_child_failure_raises_and_keeps_nothing() -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise OSError("nope")

    async with open_supervisor(SupervisorSpec([])) as sup:
        with pytest.raises(ChildStartError, match="OSError: nope"):
            await sup.start_child(ChildSpec("b", broken))
        assert sup.which_children() == []
        assert sup.running


async def test_dynamic_child_significance_is_validated() -> None:
    async with open_supervisor(SupervisorSpec([])) as sup:
        with pytest.raises(ValueError, match="auto_shutdown is NEVER"):
            await sup.start_child(
                ChildSpec("s", _noop_target(), restart=Restart.TEMPORARY, significant=True)
            )


async def test_calls_on_a_stopped_supervisor_raise() -> None:
    sup = Supervisor(SupervisorSpec([]))
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start_child(ChildSpec("a", _noop_target()))


async def test_supervisor_can_run_again_after_it_stopped() -> None:
    log = Log()
    sup = Supervisor(SupervisorSpec([ChildSpec("a", forever(log, "a"))]))
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.shutdown()
    assert log.starts["a"] == 2


async def test_running_twice_at_once_is_refused(nursery: trio.Nursery) -> None:
    sup = Supervisor(SupervisorSpec([]))
    await nursery.start(sup.run)
    with pytest.raises(RuntimeError, match="already running"):
        await sup.run()
    await sup.shutdown()


# ------------------------------------------------------- events and logs


async def test_events_are_published_in_order() -> None:
    log = Log()
    kid = Controlled(log, "k")
    async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], name="ev")) as sup:
        channel = sup.subscribe()
        await kid.do("crash")
        got = [channel.receive_nowait() for _ in range(3)]
    assert [e.kind for e in got] == [
        EventKind.CHILD_EXITED,
        EventKind.CHILD_RESTARTING,
        EventKind.CHILD_STARTED,
    ]
    assert all(e.supervisor == "ev" and e.child_id == "k" for e in got)


async def test_slow_subscriber_loses_events_but_never_blocks() -> None:
    log = Log()
    kid = Controlled(log, "k")
    async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], intensity=10)) as sup:
        sup.subscribe(max_buffer=1)
        await kid.do("crash")
        await kid.do("crash")
        assert log.starts["k"] == 3
        assert sup.dropped_events >= 4


async def test_logging_levels(caplog: pytest.LogCaptureFixture) -> None:
    """Absorbed crashes: a WARNING line, traceback only at DEBUG; escalation: ERROR + traceback."""
    log = Log()
    kid = Controlled(log, "k")
    caplog.set_level(logging.WARNING, logger="supervisor")
    with pytest.raises(RestartIntensityExceeded):
        async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], intensity=1)):
            await kid.do("crash")
            await kid.do("crash")
            await trio.sleep_forever()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # the second crash came within the period: summarised later, not repeated
    assert len(warnings) == 1 and all(r.exc_info is None for r in warnings)
    assert "exited abnormally: ValueError: k crashed" in warnings[0].getMessage()
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "restart intensity exceeded" in errors[0].getMessage()


async def test_repeated_crashes_are_summarised_not_flooded(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """One WARNING per child per period; the next one counts the crashes in between."""
    log = Log()
    kid = Controlled(log, "k")
    caplog.set_level(logging.WARNING, logger="supervisor")
    async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], intensity=10, period=5)):
        for _ in range(3):
            await kid.do("crash")
        await trio.sleep(6)
        await kid.do("crash")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert messages[0].endswith("exited abnormally: ValueError: k crashed")
    assert messages[1].endswith("(and 2 more times in the last 5s)")


async def test_open_supervisor_raises_the_escalation_bare() -> None:
    log = Log()
    kid = Controlled(log, "k")
    with pytest.raises(RestartIntensityExceeded):
        async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], intensity=0)):
            await kid.do("crash")
            await trio.sleep_forever()


async def test_open_supervisor_passes_body_errors_through_after_shutdown() -> None:
    log = Log()
    with pytest.raises(ZeroDivisionError):
        async with open_supervisor(SupervisorSpec([ChildSpec("a", forever(log, "a"))])):
            _ = 1 / 0
    assert log.lines == ["start a", "stop a"]


async def test_parallel_stop_stops_all_children_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With parallel_stop, n cooperative children taking 1 s each stop in 1 s, not n."""
    stopped_at: list[float] = []

    async def polite() -> None:
        await current_child().stop_requested.wait()
        await trio.sleep(1)
        stopped_at.append(trio.current_time())

    spec = SupervisorSpec([ChildSpec(f"c{i}", polite) for i in range(5)], parallel_stop=True)
    async with open_supervisor(spec):
        start = trio.current_time()
    assert len(stopped_at) == 5
    assert max(stopped_at) - start == pytest.approx(1.0)


# ------------------------------------------------ shielding and cancellation


def _drain(channel: trio.MemoryReceiveChannel[SupervisorEvent]) -> list[SupervisorEvent]:
    events = []
    while True:
        try:
            events.append(channel.receive_nowait())
        except trio.WouldBlock:
            return events


async def test_keyboard_interrupt_cancels_the_siblings_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As in a nursery: no stop request, no grace, no exit event for the siblings."""
    log = Log()

    async def polite(*, task_status: trio.TaskStatus[None]) -> None:
        stop = current_child().stop_requested
        task_status.started()
        try:
            await stop.wait()
            log.add("asked to stop")
        except trio.Cancelled:
            log.add("cancelled")
            raise

    async def interrupted() -> None:
        await trio.sleep(1)
        raise KeyboardInterrupt

    sup = Supervisor(
        SupervisorSpec(
            [ChildSpec("p", polite, shutdown=30.0), ChildSpec("k", interrupted)], name="ki"
        )
    )
    events = sup.subscribe()
    with pytest.raises(KeyboardInterrupt):
        await sup.run()
    assert trio.current_time() == pytest.approx(1.0)
    assert log.lines == ["cancelled"]
    assert [(e.kind, e.child_id) for e in _drain(events)] == [
        (EventKind.CHILD_STARTED, "p"),
        (EventKind.CHILD_STARTED, "k"),
    ]
    assert not sup.running
    assert [(c.id, c.state) for c in sup.which_children()] == [
        ("p", ChildState.STOPPED),
        ("k", ChildState.STOPPED),
    ]


async def test_keyboard_interrupt_of_a_dynamic_child_cancels_the_initial_ones() -> None:
    log = Log()

    async def interrupted(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    sup = Supervisor(SupervisorSpec([ChildSpec("a", forever(log, "a"), shutdown=30.0)]))
    interrupted_run = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.start_child(ChildSpec("k", interrupted, restart=Restart.TEMPORARY))
    except* KeyboardInterrupt:
        interrupted_run = True
    assert interrupted_run
    assert log.lines == ["start a", "stop a"]
    assert not sup.running


async def test_host_cancellation_reaches_a_child_still_starting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Until it calls started() a child is under its starter's cancellation, not shielded."""
    log = Log()

    async def slow(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            log.add("cancelled while starting")
            raise
        task_status.started()

    sup = Supervisor(SupervisorSpec([ChildSpec("a", forever(log, "a")), ChildSpec("s", slow)]))
    with trio.move_on_after(1) as scope:
        await sup.run()
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(1.0)
    assert log.lines == ["start a", "cancelled while starting", "stop a"]
    assert not sup.running


async def test_child_started_after_its_starter_was_cancelled_is_not_shielded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Trio leaves such a child under the cancelled start: it must see the cancellation."""
    log = Log()

    async def stubborn(*, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(2)
        task_status.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            log.add("cancelled")
            raise

    async with open_supervisor(SupervisorSpec([], name="dyn")) as sup:
        with trio.fail_after(60):
            with trio.move_on_after(1):
                await sup.start_child(ChildSpec("s", stubborn, restart=Restart.TEMPORARY))
        assert trio.current_time() == pytest.approx(2.0)
        assert log.lines == ["cancelled"]
        assert sup.running


async def test_a_started_child_is_shielded_from_the_host_until_its_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Host cancellation: children stop last-first, each asked first, then cancelled."""
    log = Log()

    async def ready(name: str, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            log.add(f"{name} cancelled at {trio.current_time():g}")
            raise

    async def polite(name: str) -> None:
        await current_child().stop_requested.wait()
        await trio.sleep(1)
        log.add(f"{name} stopped at {trio.current_time():g}")

    spec = SupervisorSpec(
        [
            ChildSpec("a", ready, args=("a",)),
            ChildSpec("b", polite, args=("b",)),
            ChildSpec("c", ready, args=("c",)),
        ]
    )
    with trio.move_on_after(5):
        await Supervisor(spec).run()
    assert log.lines == ["c cancelled at 5", "b stopped at 6", "a cancelled at 6"]


async def test_restart_timers_are_cancelled_with_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    kid = Controlled(log, "k")
    spec = SupervisorSpec(
        [ChildSpec("k", kid)], backoff=Backoff(initial=100.0, maximum=100.0, jitter=0.0)
    )
    async with open_supervisor(spec) as sup:
        await kid.do("crash")
        assert sup.which_children()[0].state is ChildState.BACKOFF
    assert trio.current_time() < 100.0
    assert log.starts["k"] == 1


async def test_session_shape_exits_through_the_runner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The worker's session tree: the runner's return shuts it down, the lease stopped."""
    log = Log()

    async def runner() -> None:
        await trio.sleep(1)
        log.add("runner done")

    spec = SupervisorSpec(
        [
            ChildSpec(
                "lease",
                forever(log, "lease"),
                restart=Restart.TEMPORARY,
                significant=True,
                shutdown=0,
            ),
            ChildSpec("runner", runner, restart=Restart.TEMPORARY, significant=True, shutdown=0),
        ],
        strategy=Strategy.ONE_FOR_ALL,
        auto_shutdown=AutoShutdown.ANY_SIGNIFICANT,
        intensity=0,
        name="session:1",
    )
    sup = Supervisor(spec)
    events = sup.subscribe()
    await sup.run()
    assert log.lines == ["start lease", "runner done", "stop lease"]
    assert sup.exit_reason is not None
    assert (sup.exit_reason.child_id, sup.exit_reason.kind) == ("runner", ExitKind.NORMAL)
    seen = _drain(events)
    assert [(e.kind, e.child_id) for e in seen] == [
        (EventKind.CHILD_STARTED, "lease"),
        (EventKind.CHILD_STARTED, "runner"),
        (EventKind.CHILD_EXITED, "runner"),
        (EventKind.SUPERVISOR_AUTO_SHUTDOWN, "runner"),
        (EventKind.CHILD_EXITED, "lease"),
    ]
    lease_exit = seen[-1].exit
    assert lease_exit is not None
    assert (lease_exit.kind, lease_exit.requested) == (ExitKind.SHUTDOWN, True)
    assert sup.which_children() == []


async def test_dynamic_temporary_children_come_and_go(nursery: trio.Nursery) -> None:
    """Many TEMPORARY children started, ended and removed; ids can be used again."""

    async def brief(*, task_status: trio.TaskStatus[int]) -> None:
        task_status.started(7)
        await trio.lowlevel.checkpoint()

    sup = Supervisor(SupervisorSpec([], name="sessions", parallel_stop=True))
    await nursery.start(sup.run)
    for round_ in range(3):
        for n in range(50):
            assert await sup.start_child(ChildSpec(f"s{n}", brief, restart=Restart.TEMPORARY)) == 7
        await settle()
        assert sup.which_children() == [], round_
    await sup.shutdown()


async def test_concurrent_calls_take_turns(autojump_clock: trio.testing.MockClock) -> None:
    """start_child calls that overlap run one after the other, never two starts at once."""
    starting: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    def slow(name: str) -> Callable[..., Awaitable[None]]:
        async def child(*, task_status: trio.TaskStatus[None]) -> None:
            starting.append(name)
            if len(starting) > 1:
                overlaps.append(tuple(starting))
            await trio.sleep(1)
            starting.remove(name)
            task_status.started()
            await trio.sleep_forever()

        return child

    async with open_supervisor(SupervisorSpec([], name="dyn")) as sup:
        begin = trio.current_time()
        async with trio.open_nursery() as nursery:
            for name in "abcd":
                nursery.start_soon(sup.start_child, ChildSpec(name, slow(name)))
        assert trio.current_time() - begin == pytest.approx(4.0)
        assert overlaps == []
        assert sorted(c.id for c in sup.which_children()) == list("abcd")


async def test_an_exit_waits_for_a_call_in_progress_and_is_handled_alike(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A crash while start_child holds the lock: the same events, once the start is done."""

    async def slow(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(5)
        task_status.started()
        await trio.sleep_forever()

    async def crash_and_watch(contended: bool) -> list[tuple[EventKind, str | None]]:
        log = Log()
        kid = Controlled(log, "k")
        async with open_supervisor(SupervisorSpec([ChildSpec("k", kid)], name="s")) as sup:
            events = sup.subscribe()
            async with trio.open_nursery() as nursery:
                if contended:
                    nursery.start_soon(sup.start_child, ChildSpec("slow", slow))
                    await trio.sleep(1)  # the start holds the lock now
                await kid.do("crash")
                if contended:
                    assert log.starts["k"] == 1  # not handled yet
            await settle()
            assert log.starts["k"] == 2
            return [(e.kind, e.child_id) for e in _drain(events)]

    quiet = await crash_and_watch(contended=False)
    busy = await crash_and_watch(contended=True)
    assert quiet == [
        (EventKind.CHILD_EXITED, "k"),
        (EventKind.CHILD_RESTARTING, "k"),
        (EventKind.CHILD_STARTED, "k"),
    ]
    assert busy == [(EventKind.CHILD_EXITED, "k"), (EventKind.CHILD_STARTED, "slow"), *quiet[1:]]


async def test_child_started_while_the_host_cancels_is_stopped_the_orderly_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A start_child whose child calls started() just as the host cancels run().

    The child lands among the others, so the host's cancellation must not reach
    it (nor the tasks it runs): it gets its stop request and its grace like them.
    """
    log = Log()
    go = trio.Event()

    async def helper() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            log.add(f"helper cancelled at {trio.current_time():g}")
            raise

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        stop = current_child().stop_requested
        async with trio.open_nursery() as inner:
            inner.start_soon(helper)
            await go.wait()
            task_status.started()
            await stop.wait()
            await trio.sleep(1)
            log.add(f"child stopping at {trio.current_time():g}")
            inner.cancel_scope.cancel()

    sup = Supervisor(SupervisorSpec([], name="dyn"))
    async with trio.open_nursery() as outer:
        host = trio.CancelScope()

        async def hosted(*, task_status: trio.TaskStatus[Supervisor]) -> None:
            with host:
                await sup.run(task_status=task_status)

        await outer.start(hosted)
        outer.start_soon(sup.start_child, ChildSpec("c", child, restart=Restart.TEMPORARY))
        await settle()
        host.cancel()
        go.set()
    assert log.lines == ["child stopping at 1", "helper cancelled at 1"]
    assert not sup.running


@pytest.mark.parametrize("restart", [Restart.PERMANENT, Restart.TEMPORARY])
async def test_a_child_restarted_while_the_host_cancels_does_not_outlive_run(
    autojump_clock: trio.testing.MockClock, restart: Restart
) -> None:
    """restart_child started it again behind the teardown's back: it is cancelled at the end."""
    log = Log()
    live = 0

    async def polite(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal live
        stop = current_child().stop_requested
        log.started("p")
        live += 1
        try:
            task_status.started()
            await stop.wait()
            await trio.sleep(1)
        finally:
            live -= 1

    sup = Supervisor(SupervisorSpec([ChildSpec("p", polite, restart=restart)]))
    outcomes: list[str] = []

    async def restart_it() -> None:
        try:
            await sup.restart_child("p")
        except (ChildStartError, RuntimeError) as exc:
            outcomes.append(type(exc).__name__)
        else:
            outcomes.append("restarted")

    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            host = trio.CancelScope()

            async def hosted(*, task_status: trio.TaskStatus[Supervisor]) -> None:
                with host:
                    await sup.run(task_status=task_status)

            await outer.start(hosted)
            outer.start_soon(restart_it)
            await trio.sleep(0.5)  # restart_child waits for p's grace to end
            host.cancel()
    assert not sup.running
    assert outcomes == ["restarted"]
    assert log.starts == {"p": 2}
    assert live == 0


async def test_run_under_a_cancelled_scope_stops_its_children_and_returns() -> None:
    """Cancelled before it began: the children that started are stopped, Cancelled goes on."""
    log = Log()
    sup = Supervisor(SupervisorSpec([ChildSpec("a", forever(log, "a"))]))
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await sup.run()
    assert scope.cancelled_caught
    assert not sup.running
    assert log.lines in ([], ["start a", "stop a"])


@pytest.mark.parametrize(
    ("shutdown", "looks", "stopped_after"),
    [(None, True, 4.0), (2.0, True, 2.0), (0, True, 0.0), (30.0, False, 0.0)],
)
async def test_host_cancellation_keeps_each_childs_shutdown_setting(
    autojump_clock: trio.testing.MockClock,
    shutdown: float | None,
    looks: bool,
    stopped_after: float,
) -> None:
    """The teardown under a host cancellation: grace, cancel, unresponsive, as for a terminate."""
    ended: list[float] = []

    async def child() -> None:
        stop = current_child().stop_requested if looks else None
        try:
            if stop is not None:
                await stop.wait()
                await trio.sleep(4)
            else:
                await trio.sleep_forever()
        finally:
            ended.append(trio.current_time())

    async def stubborn() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(3)

    sup = Supervisor(
        SupervisorSpec(
            [ChildSpec("c", child, shutdown=shutdown), ChildSpec("s", stubborn, shutdown=0)],
            unresponsive_after=1.0,
        )
    )
    events = sup.subscribe()
    with trio.move_on_after(10) as scope:
        await sup.run()
    assert scope.cancelled_caught
    # "s" stops first (3 s, reported unresponsive after 1 s), then "c" by its setting
    assert ended == [pytest.approx(13.0 + stopped_after)]
    assert trio.current_time() == pytest.approx(13.0 + stopped_after)
    seen = [(e.kind, e.child_id, round(e.time, 6)) for e in _drain(events)]
    assert (EventKind.CHILD_UNRESPONSIVE, "s", 11.0) in seen


async def test_restart_child_after_a_keyboard_interrupt_fails_to_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a child's KeyboardInterrupt is tearing the supervisor down, nothing starts."""
    log = Log()

    async def polite(*, task_status: trio.TaskStatus[None]) -> None:
        stop = current_child().stop_requested
        log.started("p")
        task_status.started()
        await stop.wait()
        await trio.sleep(1)

    async def interrupted() -> None:
        await trio.sleep(0.5)
        raise KeyboardInterrupt

    sup = Supervisor(SupervisorSpec([ChildSpec("p", polite), ChildSpec("k", interrupted)]))
    failures: list[BaseException] = []

    async def restart() -> None:
        try:
            await sup.restart_child("p")
        except ChildStartError as exc:
            failures.append(exc)

    interrupted_run = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            nursery.start_soon(restart)
    except* KeyboardInterrupt:
        interrupted_run = True
    assert interrupted_run
    assert len(failures) == 1
    assert log.starts == {"p": 1}
    assert not sup.running
