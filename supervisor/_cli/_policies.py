"""The environment policies' flags, shared by ``run`` and ``serve`` (DESIGN §4.2)."""

from __future__ import annotations

import argparse

__all__ = ["add_environment_arguments"]


def _retention(text: str) -> float:
    """``--retention``'s value: a duration (``7d``, ``12h``, ``30m``, ``45s``, seconds)."""
    from ..controlplane._store._common import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return seconds


def add_environment_arguments(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    """The environment's policies (DESIGN §4.2), as ``run`` and ``serve`` take them.

    They are kept in the control plane's database; a flag given writes its value
    when the process starts (a later write wins), a flag not given leaves the
    stored value alone. ``run`` writes them only to a plane it owns.
    """
    where = (
        "every environment this server serves (and ones created later through it)"
        if serve
        else "the worker's environment (embedded or direct PostgreSQL plane only)"
    )
    prefix = "" if serve else "default_"
    group = parser.add_argument_group(
        "environment policies",
        f"Stored with the environment and applied to {where}; per-item submit values win.",
    )
    group.add_argument(
        "--max-queue-depth",
        type=int,
        metavar="N",
        help="the most queued items the environment holds; a submit beyond it is refused "
        "(HTTP 429 with Retry-After; submit exits 1)",
    )
    group.add_argument(
        "--retention",
        type=_retention,
        metavar="DURATION",
        help="purge stopped items, messages and settled delegations this long after they "
        "ended (7d, 12h, 30m, 45s or seconds; default: keep forever)",
    )
    group.add_argument(
        "--max-attempts",
        dest=f"{prefix}max_attempts",
        type=int,
        metavar="N",
        help="the default retry policy's attempts, for items submitted without one (1-100)",
    )
    group.add_argument(
        "--backoff",
        dest=f"{prefix}backoff",
        type=float,
        metavar="S",
        help="the default retry policy's first backoff in seconds (then doubling)",
    )
    group.add_argument(
        "--backoff-max",
        dest=f"{prefix}backoff_max",
        type=float,
        metavar="S",
        help="the default retry policy's longest backoff in seconds",
    )
