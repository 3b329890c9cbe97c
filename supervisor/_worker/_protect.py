"""Keep the worker's secrets out of its agents' reach (Linux).

An agent is a child of the worker, so it can look at its parent:
``/proc/$PPID/environ`` shows the environment the worker was *started* with
(a block of memory the kernel points at, not ``os.environ``), and a process of
the same user may read it, along with the worker's memory. The environment
key would be there in plain text.

`hide_secrets` closes that, as far as a process can do it to itself:

* it removes the variables from ``os.environ`` (and so from libc's
  ``environ``), after the configuration was read from them;
* it overwrites their values in the initial environment block in place, so
  ``/proc/PID/environ`` shows the name with an empty value, even to root;
* it makes the process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): its
  ``/proc/PID/*`` files then belong to root, so a process of the same user
  that is not root can read neither its environment nor its memory nor its
  open files. Children do not inherit that (an ``execve`` resets it). It also
  turns off core dumps of the worker and ``ptrace`` by the same user.

What it cannot do: hide anything from root, and the key file on disk. Agents
running as root can read every file and every process. Run them as another
user (``agent_user``) and keep the key file readable by the worker's user
only (``chmod 600``); the worker warns when the file is readable by others.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["KEY_VARIABLES", "hide_secrets", "set_dumpable", "warn_if_readable"]

logger = logging.getLogger("supervisor.worker")

#: The variables that carry the environment key.
KEY_VARIABLES = ("SUPERVISOR_ENVIRONMENT_KEY",)
_PR_SET_DUMPABLE = 4


def set_dumpable(dumpable: bool) -> bool:
    """``prctl(PR_SET_DUMPABLE)`` on this process; whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _wipe_initial_environ(names: Iterable[str]) -> int:
    """Overwrite the values of ``names`` in this process's initial environment block.

    The block lies between ``env_start`` and ``env_end`` of ``/proc/self/stat``
    (fields 50 and 51) and is exactly what ``/proc/self/environ`` shows, so an
    offset found there is an offset into that memory. Returns how many values
    were wiped.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start = int(fields[47])
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return 0
    wiped = 0
    offset = 0
    for entry in block.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and value and name.decode("utf-8", "replace") in names:
            ctypes.memset(start + offset + len(name) + 1, 0, len(value))
            wiped += 1
        offset += len(entry) + 1
    return wiped


def hide_secrets(names: Iterable[str] = KEY_VARIABLES) -> None:
    """Remove ``names`` from the environment, wipe them from ``/proc``, become non-dumpable.

    Call it once the configuration has been read, before any agent starts.
    """
    names = tuple(names)
    present = [name for name in names if os.environ.pop(name, None) is not None]
    if present and sys.platform.startswith("linux"):
        _wipe_initial_environ(present)
    if not set_dumpable(False) and sys.platform.startswith("linux"):
        logger.warning("could not make the worker non-dumpable; same-user agents can read it")


def warn_if_readable(path: Path | None) -> None:
    """Warn when the key file is readable by anyone but its owner."""
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning(
            "the environment key file %s is readable by its group or others "
            "(mode %o): agents may read it; chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
