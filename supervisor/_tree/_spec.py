"""Specifications of a supervision tree: what to run and how to restart it.

All specs are frozen attrs classes validated at construction, so a mistake in a
tree's shape fails where the tree is written, not at the first crash.
"""

from __future__ import annotations

import enum
import inspect
import math
import random
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs

__all__ = ["AutoShutdown", "Backoff", "ChildSpec", "Restart", "Strategy", "SupervisorSpec"]


class Restart(enum.Enum):
    """When a child that ended by itself is restarted (OTP ``restart`` types).

    ``PERMANENT`` always, ``TRANSIENT`` only after an abnormal exit (an
    exception other than ``Shutdown``), ``TEMPORARY`` never (and it is removed
    from the supervisor once it has ended).
    """

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children a restart affects (OTP strategies).

    ``ONE_FOR_ONE`` only the child that exited; ``ONE_FOR_ALL`` every child
    (the others are terminated in reverse start order, then all start again in
    order); ``REST_FOR_ONE`` the child and those started after it.
    """

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class AutoShutdown(enum.Enum):
    """Whether the exit of *significant* children stops the whole supervisor.

    Triggered only when a significant child ends by itself and is not restarted
    (never by a terminate or by a sibling's restart). ``ANY_SIGNIFICANT``: the
    first such exit; ``ALL_SIGNIFICANT``: once no significant child is left running.
    """

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


def _non_negative(name: str) -> Callable[[Any, attrs.Attribute[Any], float], None]:
    def check(_inst: Any, _attr: attrs.Attribute[Any], value: float) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")

    return check


@attrs.frozen
class Backoff:
    """The delay before a child is restarted: exponential, capped, jittered.

    The n-th consecutive restart of a child waits
    ``min(maximum, initial * multiplier**n)``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``. After ``reset_after`` seconds of stable running
    the count starts again from zero (``None``: after the supervisor's ``period``,
    i.e. once earlier restarts no longer count against the intensity budget).

    ``rng`` is the random source (``random.Random``); pass a seeded one in tests.
    """

    initial: float = attrs.field(default=0.1, validator=_non_negative("Backoff.initial"))
    maximum: float = attrs.field(default=30.0, validator=_non_negative("Backoff.maximum"))
    multiplier: float = attrs.field(default=2.0, validator=_non_negative("Backoff.multiplier"))
    jitter: float = attrs.field(default=0.1, validator=_non_negative("Backoff.jitter"))
    reset_after: float | None = None
    rng: random.Random = attrs.field(factory=random.Random, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier!r}")
        if self.jitter > 1:
            raise ValueError(f"Backoff.jitter is a fraction in [0, 1], got {self.jitter!r}")
        if self.maximum < self.initial:
            raise ValueError(
                f"Backoff.maximum ({self.maximum!r}) must be >= Backoff.initial ({self.initial!r})"
            )
        if self.reset_after is not None:
            _non_negative("Backoff.reset_after")(self, None, self.reset_after)  # type: ignore[arg-type]

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (0-based)."""
        base = self.initial * self.multiplier ** min(attempt, 1024)
        base = min(self.maximum, base)
        if self.jitter:
            base *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        return max(0.0, base)


# Looking at a signature costs tens of microseconds; specs for the same function
# (a bound method of a fresh object each time) are built once per session.
_TAKES_TASK_STATUS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _accepts_task_status(target: Callable[..., Any]) -> bool:
    key = getattr(target, "__func__", target)
    try:
        return _TAKES_TASK_STATUS[key]
    except (KeyError, TypeError):
        pass
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    found = "task_status" in params
    try:
        _TAKES_TASK_STATUS[key] = found
    except TypeError:  # not weakly referenceable: just not cached
        pass
    return found


def _to_args(value: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(value)


def _to_children(value: Iterable[ChildSpec]) -> tuple[ChildSpec, ...]:
    return tuple(value)


_check_shutdown_seconds = _non_negative("ChildSpec.shutdown")


def _check_shutdown(_inst: Any, _attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        _check_shutdown_seconds(_inst, _attr, value)


def _check_id(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"ChildSpec.id must be a non-empty string, got {value!r}")


@attrs.frozen
class ChildSpec:
    """One supervised child.

    Args:
        id: unique among the supervisor's children.
        target: an async callable. If it takes a ``task_status`` argument it is
            started with ``nursery.start`` and counts as started once it calls
            ``task_status.started(value)``; otherwise it counts as started at once.
        args: positional arguments for ``target``.
        restart: when it is restarted after ending by itself.
        shutdown: seconds between the cooperative stop request and cancellation;
            ``0`` cancels at once, ``None`` waits forever (never cancels).
        significant: whether its exit can trigger the supervisor's ``auto_shutdown``.
        backoff: the delay before restarts; ``None`` uses the supervisor's.
    """

    id: str = attrs.field(validator=_check_id)
    target: Callable[..., Awaitable[Any]] = attrs.field()
    args: tuple[Any, ...] = attrs.field(default=(), converter=_to_args)
    restart: Restart = attrs.field(default=Restart.PERMANENT, kw_only=True)
    shutdown: float | None = attrs.field(default=5.0, kw_only=True, validator=_check_shutdown)
    significant: bool = attrs.field(default=False, kw_only=True)
    backoff: Backoff | None = attrs.field(default=None, kw_only=True)
    accepts_task_status: bool = attrs.field(init=False, eq=False, repr=False)

    @target.validator
    def _check_target(self, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not callable(value):
            raise TypeError(f"ChildSpec.target for {self.id!r} must be callable, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.restart, Restart):
            raise TypeError(
                f"ChildSpec.restart for {self.id!r} must be a Restart, got {self.restart!r}"
            )
        if self.significant and self.restart is Restart.PERMANENT:
            raise ValueError(
                f"child {self.id!r}: a PERMANENT child cannot be significant "
                "(it is always restarted, so its exit could never stop the supervisor)"
            )
        object.__setattr__(self, "accepts_task_status", _accepts_task_status(self.target))


@attrs.frozen
class SupervisorSpec:
    """A supervisor's shape and policy.

    Args:
        children: started in this order, stopped in reverse.
        strategy: which children a restart affects.
        intensity: at most this many restarts within ``period`` seconds, counted
            across all children of this supervisor; one more escalates.
        period: the sliding window for ``intensity``, in seconds (> 0).
        backoff: default delay before restarts for children without their own.
        auto_shutdown: whether significant children's exits stop the supervisor.
        name: used in events, logs, snapshots and errors.
        unresponsive_after: seconds after cancelling a child before it is reported
            ``unresponsive`` (it shielded itself); the supervisor keeps waiting.
        parallel_stop: when the whole supervisor stops, stop all children at once
            instead of one by one in reverse start order. Meant for supervisors of
            many independent, interchangeable children (OTP's ``simple_one_for_one``
            stops its children concurrently too); strategy restarts are unaffected.
    """

    children: tuple[ChildSpec, ...] = attrs.field(default=(), converter=_to_children)
    strategy: Strategy = attrs.field(default=Strategy.ONE_FOR_ONE, kw_only=True)
    intensity: int = attrs.field(default=3, kw_only=True)
    period: float = attrs.field(default=5.0, kw_only=True)
    backoff: Backoff | None = attrs.field(default=None, kw_only=True)
    auto_shutdown: AutoShutdown = attrs.field(default=AutoShutdown.NEVER, kw_only=True)
    name: str = attrs.field(default="supervisor", kw_only=True)
    unresponsive_after: float = attrs.field(
        default=1.0, kw_only=True, validator=_non_negative("SupervisorSpec.unresponsive_after")
    )
    parallel_stop: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            raise TypeError(f"{self.name}: strategy must be a Strategy, got {self.strategy!r}")
        if not isinstance(self.auto_shutdown, AutoShutdown):
            raise TypeError(
                f"{self.name}: auto_shutdown must be an AutoShutdown, got {self.auto_shutdown!r}"
            )
        if isinstance(self.intensity, bool) or not isinstance(self.intensity, int):
            raise TypeError(f"{self.name}: intensity must be an int, got {self.intensity!r}")
        if self.intensity < 0:
            raise ValueError(f"{self.name}: intensity must be >= 0, got {self.intensity!r}")
        period = self.period
        if (
            not isinstance(period, int | float)
            or isinstance(period, bool)
            or math.isnan(period)
            or period < 0
        ):  # the usual message, naming this supervisor
            _non_negative(f"{self.name}: period")(self, None, period)  # type: ignore[arg-type]
        if self.period <= 0:
            raise ValueError(f"{self.name}: period must be > 0, got {self.period!r}")
        seen: set[str] = set()
        for child in self.children:
            if not isinstance(child, ChildSpec):
                raise TypeError(f"{self.name}: children must be ChildSpec, got {child!r}")
            if child.id in seen:
                raise ValueError(f"{self.name}: duplicate child id {child.id!r}")
            seen.add(child.id)
            self.check_child(child)

    def check_child(self, child: ChildSpec) -> None:
        """Raise ``ValueError`` if ``child`` cannot belong to this supervisor."""
        if child.significant and self.auto_shutdown is AutoShutdown.NEVER:
            raise ValueError(
                f"{self.name}: child {child.id!r} is significant but auto_shutdown is NEVER "
                "(significant children only make sense with ANY_SIGNIFICANT or ALL_SIGNIFICANT)"
            )
