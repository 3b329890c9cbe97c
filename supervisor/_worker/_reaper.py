"""Lease-bounded agents (DESIGN §3.8): the worker's side of its reaper process.

Everything else in the worker stops an agent from inside its event loop,
which a worker killed with SIGKILL or frozen with SIGSTOP cannot do. So each
worker starts one small reaper process (`supervisor._worker._reaper_main`, a
standard-library script: one extra interpreter per *worker*, never per
session) and tells it, for every agent run:

* before the agent is spawned: a fresh tag (``SUPERVISOR_AGENT_TAG`` in the
  agent's environment), the lease deadline and the grace;
* once it is spawned: its pid (the leader of its own session and group);
* after every successful heartbeat: the new deadline (``t_send + 0.8 x ttl``),
  converted from the Trio clock to ``CLOCK_MONOTONIC``, which every process
  of the machine reads alike;
* once the worker stopped the group itself: that the run is over (the reaper
  then kills whatever of it escaped the group).

The reaper kills a run whose deadline passes (SIGTERM, the grace, SIGKILL),
whatever the worker is doing, and every run at once when its stdin (the
lifeline) closes, which the kernel does when the worker dies however it dies.

The grace it uses is capped per beat at ``0.15 x ttl`` (three quarters of the
``0.2 x ttl`` between the deadline and the server's expiry), for the ttl the
server granted: the kill completes before the item can be re-granted even
when the server clamped the ttl below the configured one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import trio

from ._lease import DEADLINE_FRACTION, Lease
from ._reaper_main import TAG_VARIABLE

__all__ = ["Reaper", "ReaperTicket", "TAG_VARIABLE"]

logger = logging.getLogger("supervisor.reaper")

_SCRIPT: Final = Path(__file__).with_name("_reaper_main.py")
#: The share of the gap between the deadline and the server's expiry the grace may use.
_GRACE_SHARE: Final = 0.75


def kill_grace(grace: float, ttl: float | None) -> float:
    """The grace the reaper may give an agent past its deadline for a lease of ``ttl``."""
    if ttl is None or not ttl > 0:
        return grace
    return max(0.0, min(grace, _GRACE_SHARE * (1.0 - DEADLINE_FRACTION) * ttl))


def monotonic_deadline(lease: Lease) -> float:
    """The lease deadline (Trio clock) as ``time.monotonic()`` time."""
    return time.monotonic() + (lease.deadline - trio.current_time())


class ReaperTicket:
    """One agent run as the reaper knows it; see :meth:`Reaper.guard`."""

    def __init__(self, reaper: Reaper, tag: str) -> None:
        self._reaper = reaper
        self.tag = tag

    @property
    def env(self) -> dict[str, str]:
        """The variables the agent's environment must carry."""
        return {TAG_VARIABLE: self.tag}

    def spawned(self, pid: int) -> None:
        """Tell the reaper the agent's pid (its process group and session)."""
        self._reaper._send({"op": "pid", "tag": self.tag, "pid": pid})


class Reaper:
    """The worker's handle on its reaper process.

    Args:
        grace: the configured ``agent_grace``.
        python: the interpreter that runs the reaper script.
    """

    def __init__(self, *, grace: float, python: str = sys.executable) -> None:
        self.grace = grace
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None
        self._broken = False

    @property
    def pid(self) -> int | None:
        """The reaper process's pid while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the reaper process (blocking: a fork and an exec, once per worker)."""
        if self._process is not None:
            return
        # Isolated (-I) and without site (-S): it needs nothing but the standard
        # library, so it starts in milliseconds. Its own session: a signal sent to
        # the worker's process group (a Ctrl-C, a `kill -STOP -PGID`) never
        # reaches it. No environment at all: nothing of the worker's secrets.
        self._process = subprocess.Popen(
            [self._python, "-I", "-S", os.fspath(_SCRIPT), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env={},
            start_new_session=True,
        )
        assert self._process.stdin is not None
        self._fd = self._process.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._broken = False
        logger.debug("reaper started as pid %d", self._process.pid)

    def close(self, timeout: float = 5.0) -> None:
        """Close the lifeline and wait for the reaper to exit (blocking, bounded)."""
        process, self._process, self._fd = self._process, None, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _send(self, message: Mapping[str, object]) -> None:
        fd = self._fd
        if fd is None:
            return
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            written = os.write(fd, data)
        except (BlockingIOError, BrokenPipeError, OSError) as exc:
            written = -1
            error: object = exc
        else:
            error = f"short write ({written} of {len(data)} bytes)"
        if written != len(data) and not self._broken:
            # The agents' own deadlines are still enforced by the worker's event
            # loop; only the protection against a frozen or killed worker is gone.
            self._broken = True
            logger.error("the reaper process does not take commands (%s)", error)

    @contextmanager
    def guard(self, lease: Lease) -> Iterator[ReaperTicket]:
        """Track one agent run under ``lease`` for as long as the block runs.

        Exit the block only after the agent's process group is gone: the
        reaper then kills whatever of the run is left (what escaped the group).
        """
        ticket = ReaperTicket(self, secrets.token_hex(8))

        def push(kind: str) -> None:
            self._send(
                {
                    "op": kind,
                    "tag": ticket.tag,
                    "deadline": monotonic_deadline(lease),
                    "grace": kill_grace(self.grace, lease.ttl),
                }
            )

        push("track")
        forget: Callable[[], None] = lease.on_renew(lambda: push("renew"))
        try:
            yield ticket
        finally:
            forget()
            self._send({"op": "untrack", "tag": ticket.tag})
