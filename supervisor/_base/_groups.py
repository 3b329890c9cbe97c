"""Exception-group handling shared by the tree and the worker.

Trio nurseries group what their tasks raise. Where a single exception is the
honest answer (one child's ``KeyboardInterrupt``, an escalation, an outer
``Cancelled``), callers re-raise it bare so users can ``except`` it normally.
"""

from __future__ import annotations

from typing import NoReturn

import trio

__all__ = ["collapse_group", "leaves", "raise_saving_context"]


def raise_saving_context(exc: BaseException) -> NoReturn:
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception in ``group`` and its nested groups, in order, groups flattened."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(leaves(exc))
        else:
            found.append(exc)
    return found


def collapse_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to re-raise for a group out of a nursery.

    A lone exception (ignoring the ``Cancelled`` that came with it) bare; a
    lone ``Cancelled`` bare; anything else as the group it is. The one rule for
    every nursery the package opens, so that a caller never has to ``except*``
    to catch what a plain call would have raised.
    """
    found = leaves(group)
    real = [e for e in found if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and found:
        return found[0]
    return group
