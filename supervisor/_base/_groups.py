"""Exception-group handling shared by the tree and the worker.

Trio nurseries group what their tasks raise. Where a single exception is the
honest answer (one child's ``KeyboardInterrupt``, an escalation, an outer
``Cancelled``), callers re-raise it bare so users can ``except`` it normally.
"""

from __future__ import annotations

from typing import NoReturn

import trio

__all__ = ["collapse_group", "raise_saving_context"]


def raise_saving_context(exc: BaseException) -> NoReturn:
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


def collapse_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to re-raise for a group out of a nursery.

    A lone exception (ignoring the ``Cancelled`` that came with it) bare; a
    lone ``Cancelled`` bare; anything else as the group it is.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return group
