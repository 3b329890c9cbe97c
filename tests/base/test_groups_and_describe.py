"""The shared base's group flattening and exception description, used by every layer."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from supervisor._base._describe import describe_exception
from supervisor._base._groups import collapse_group, leaves


class _StatusError(Exception):
    status_code = 503


def _cancelled() -> trio.Cancelled:
    # Cancelled has no public constructor; take a real one from a cancelled scope.
    caught: list[trio.Cancelled] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                caught.append(exc)
                raise

    trio.run(main)
    return caught[0]


def test_leaves_flattens_nested_groups_in_order() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    group = BaseExceptionGroup(
        "outer", [a, BaseExceptionGroup("inner", [b, ExceptionGroup("x", [c])])]
    )
    assert leaves(group) == [a, b, c]


def test_a_lone_exception_is_collapsed_out_of_nested_groups() -> None:
    error = RuntimeError("boom")
    group = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [error])])
    assert collapse_group(group) is error


def test_the_cancelled_that_came_with_one_error_is_dropped() -> None:
    error = RuntimeError("boom")
    cancelled = _cancelled()
    assert collapse_group(BaseExceptionGroup("g", [cancelled, error])) is error


def test_only_cancelled_collapses_to_a_bare_cancelled() -> None:
    first, second = _cancelled(), _cancelled()
    assert collapse_group(BaseExceptionGroup("g", [first, second])) is first


def test_two_real_errors_stay_a_group() -> None:
    group = BaseExceptionGroup("g", [ValueError("a"), KeyError("b")])
    assert collapse_group(group) is group


@pytest.mark.parametrize(
    ("exc", "kwargs", "expected"),
    [
        (ValueError("bad value"), {}, "ValueError: bad value"),
        (ValueError(), {}, "ValueError"),
        (None, {}, ""),
        (_StatusError("down"), {}, "_StatusError: down"),
        (_StatusError("down"), {"status": True}, "_StatusError (503): down"),
        (ValueError("no status"), {"status": True}, "ValueError: no status"),
        (
            ValueError("token tok-1 refused"),
            {"redact": ["tok-1", ""]},
            "ValueError: token <token> refused",
        ),
        (ValueError("two\n  lines"), {"one_line": True}, "ValueError: two lines"),
        (ValueError("two\n  lines"), {}, "ValueError: two\n  lines"),
        (ValueError("x" * 50), {"limit": 20}, "ValueError: xxxxx..."),
        (ValueError("short"), {"limit": 20}, "ValueError: short"),
    ],
)
def test_describe_exception(
    exc: BaseException | None, kwargs: dict[str, Any], expected: str
) -> None:
    text = describe_exception(exc, **kwargs)
    assert text == expected
    if "limit" in kwargs:
        assert len(text) <= 20
