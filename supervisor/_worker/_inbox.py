"""A running session's inbox: where the results of its delegations arrive.

Two faces of one thing, so that both kinds of agent can use it:

* a file in the session's workspace, ``.supervisor-inbox.jsonl``: one JSON
  object per line, appended as results arrive (a subprocess agent reads or
  tails ``$SUPERVISOR_WORKSPACE/.supervisor-inbox.jsonl``);
* an `Inbox` object an in-process agent gets as ``ctx.inbox``, whose
  `Inbox.receive` waits for the next result without polling.

Each entry carries the delegate's output as ``response_preview``: data from
another agent, untrusted. Read it as data; never paste it into a prompt as if
it were an instruction.

The delegation watcher delivers into an inbox only while its session's agent
runs; the runner closes the inbox when the agent ends, and later results go to
the session as a follow-up message instead. A result delivered just before the
agent ends counts as delivered: an agent that needs every result waits for
them (``await ctx.inbox.receive()``, or watching the file) before it finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from ..controlplane._models import DelegationStatus

__all__ = ["INBOX_FILENAME", "Inbox", "InboxClosed", "InboxEntry"]

#: The inbox file's name inside a session's workspace.
INBOX_FILENAME: Final = ".supervisor-inbox.jsonl"


class InboxClosed(Exception):
    """The session's agent has ended; nothing more arrives in this inbox."""


@attrs.frozen
class InboxEntry:
    """One delegation result, as its source session receives it.

    Attributes:
        delegation_id: the delegation (``python -m supervisor delegate`` printed it).
        work_id: the delegate's work item.
        status: ``completed`` or ``failed``.
        response_preview: the delegate's output, truncated; untrusted data.
        journal: the delegation journal that holds this result durably.
        completed_at: when the control plane recorded the result (POSIX seconds).
    """

    delegation_id: str
    work_id: str
    status: DelegationStatus = attrs.field(converter=DelegationStatus)
    response_preview: str | None = attrs.field(default=None, repr=False)
    journal: str = ""
    completed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "delegation_id": self.delegation_id,
            "work_id": self.work_id,
            "status": self.status.value,
            "response_preview": self.response_preview,
            "journal": self.journal,
            "completed_at": self.completed_at,
        }


class Inbox:
    """The inbox of one running session (see the module notes).

    Args:
        path: the inbox file; created on the first delivery.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[InboxEntry] = []
        self._read = 0
        self._closed = False
        self._changed = trio.Event()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Inbox {str(self.path)!r} {len(self._entries)} entries {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[InboxEntry]:
        """Every entry delivered so far, oldest first (read or not)."""
        return list(self._entries)

    def deliver(self, entry: InboxEntry) -> None:
        """Append ``entry`` to the file and wake the agent; synchronous, so it is atomic in Trio.

        Raises:
            InboxClosed: the agent has ended.
            OSError: the file cannot be written (the caller falls back to a message).
        """
        if self._closed:
            raise InboxClosed(f"the inbox {str(self.path)!r} is closed")
        if not self._entries:
            _keep_out_of_git(self.path)
        line = json.dumps(entry.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line)
            file.flush()
        self._entries.append(entry)
        self._wake()

    async def receive(self) -> InboxEntry:
        """The next entry this object has not returned yet, waiting for one if needed.

        Raises:
            InboxClosed: the inbox was closed with nothing left to read.
        """
        await trio.lowlevel.checkpoint()
        while self._read >= len(self._entries):
            if self._closed:
                raise InboxClosed(f"the inbox {str(self.path)!r} is closed")
            await self._changed.wait()
        entry = self._entries[self._read]
        self._read += 1
        return entry

    def close(self) -> None:
        """No more deliveries (the agent ended); wakes a waiting `receive`. Idempotent."""
        if not self._closed:
            self._closed = True
            self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()


def _keep_out_of_git(path: Path) -> None:
    """In a ``git`` workspace, list the inbox in ``.git/info/exclude``.

    An agent that commits "everything" must not commit its inbox (other
    agents' output) into the repository.
    """
    info = path.parent / ".git" / "info"
    if not info.parent.is_dir():
        return
    exclude = info / "exclude"
    pattern = f"/{path.name}"
    try:
        existing = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
        if pattern in existing.splitlines():
            return
        info.mkdir(exist_ok=True)
        with exclude.open("a", encoding="utf-8") as file:
            if existing and not existing.endswith("\n"):
                file.write("\n")
            file.write(pattern + "\n")
    except OSError:
        pass  # best effort: the inbox itself must still be written
