"""Hypothesis strategies shared by the property-based tests.

The supervision-tree strategies draw *plans* (plain data), not specs: a spec
needs child targets, which only the test harness can build, and plain data
prints readably when hypothesis reports a failing example.
"""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from supervisor import AutoShutdown, Restart, Strategy

__all__ = [
    "ChildPlan",
    "SupervisorPlan",
    "child_plans",
    "clock_steps",
    "restart_types",
    "supervisor_plans",
]


@attrs.frozen
class ChildPlan:
    """What a supervised child is.

    ``cooperative`` children look at their stop request and return when asked
    (they get their shutdown grace); the others are cancelled at once.
    ``ready`` children take ``task_status`` and are awaited until they call
    ``started()``; the others count as started at once.
    """

    id: str
    restart: Restart
    significant: bool = False
    cooperative: bool = False
    ready: bool = True


@attrs.frozen
class SupervisorPlan:
    """A supervisor's policy and its initial children, in start order."""

    strategy: Strategy
    intensity: int
    period: float
    auto_shutdown: AutoShutdown
    children: tuple[ChildPlan, ...]
    parallel_stop: bool = False


restart_types = st.sampled_from(Restart)


def child_plans(child_id: str, auto_shutdown: AutoShutdown) -> st.SearchStrategy[ChildPlan]:
    """A child that ``SupervisorSpec`` validation accepts under ``auto_shutdown``.

    Only non-permanent children may be significant, and only when the supervisor
    has an auto_shutdown mode at all.
    """

    def shape(restart: Restart) -> st.SearchStrategy[ChildPlan]:
        allowed = restart is not Restart.PERMANENT and auto_shutdown is not AutoShutdown.NEVER
        return st.builds(
            ChildPlan,
            st.just(child_id),
            st.just(restart),
            significant=st.booleans() if allowed else st.just(False),
            cooperative=st.booleans(),
            ready=st.booleans(),
        )

    return restart_types.flatmap(shape)


@st.composite
def supervisor_plans(draw: st.DrawFn) -> SupervisorPlan:
    """A supervisor with 1 to 5 children of random restart types.

    ``period`` is a whole number of seconds and the clock moves in multiples of
    a quarter second (see :data:`clock_steps`), so the times the supervisor and
    a model compare are exact binary fractions: which restarts fall out of the
    window is never decided by float rounding.
    """
    auto_shutdown = draw(st.sampled_from(AutoShutdown))
    count = draw(st.integers(min_value=1, max_value=5))
    children = tuple(draw(child_plans(f"c{i}", auto_shutdown)) for i in range(count))
    return SupervisorPlan(
        strategy=draw(st.sampled_from(Strategy)),
        intensity=draw(st.integers(min_value=0, max_value=4)),
        period=float(draw(st.integers(min_value=1, max_value=10))),
        auto_shutdown=auto_shutdown,
        children=children,
        parallel_stop=draw(st.booleans()),
    )


#: How far a test moves a ``MockClock``: whole seconds (so a step can land exactly on
#: the edge of a whole-second intensity window) or quarter seconds, up to 12 s.
clock_steps = st.one_of(
    st.integers(min_value=1, max_value=10).map(float),
    st.integers(min_value=1, max_value=48).map(lambda quarters: quarters / 4),
)
