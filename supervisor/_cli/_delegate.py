"""``python -m supervisor delegate TASK``: delegate from inside a session.

The command-line form of ``supervisor.controlplane._session_client``: it reads
the session's credential from the ``SUPERVISOR_SESSION_*`` variables a worker
gives its agents, never the environment key.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

import trio

from .._base._exceptions import ConfigError
from ..controlplane._codec import dumps, encode_delegation
from ..controlplane._exceptions import ControlPlaneError
from ..controlplane._models import Delegation
from ..controlplane._session_client import SessionCredentials, open_session_client
from ._common import PROG

__all__ = ["add_delegate_arguments", "cli_delegate"]

_COMMAND: Final = f"{PROG} delegate"


def add_delegate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``delegate`` sub-command's arguments (everything else comes from the session)."""
    parser.add_argument("task", help="the task for another agent; '-' reads it from stdin")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the delegation as JSON instead of its id",
    )


def cli_delegate(args: argparse.Namespace) -> int:
    """``python -m supervisor delegate TASK``: delegate from inside a session.

    Prints the new delegation's id (or the delegation as JSON with ``--json``).
    The result comes back to this session: into its inbox file
    (``$SUPERVISOR_WORKSPACE/.supervisor-inbox.jsonl``) while it runs, otherwise
    as a follow-up message.

    Returns:
        0 on success; 1 when the control plane refused or failed (the session
        ended, the credential is not valid, it cannot be reached); 2 for a usage
        or configuration problem (an empty task, no session credentials).
    """
    task = sys.stdin.read() if args.task == "-" else args.task
    if not task.strip():
        print(f"{_COMMAND}: error: the task is empty", file=sys.stderr)
        return 2
    try:
        credentials = SessionCredentials.from_environ()
    except ConfigError as exc:
        print(f"{_COMMAND}: error: {exc}", file=sys.stderr)
        return 2

    async def go() -> Delegation:
        async with open_session_client(credentials) as client:
            return await client.delegate(task)

    try:
        delegation = trio.run(go)
    except ConfigError as exc:
        print(f"{_COMMAND}: error: {exc}", file=sys.stderr)
        return 2
    except ControlPlaneError as exc:
        print(f"{_COMMAND}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(dumps(encode_delegation(delegation)).decode())
    else:
        print(delegation.id)
    return 0
