"""``python -m supervisor status`` drawn for a terminal, with ``rich``.

Pure functions of the status document (the same data ``status --json``
prints), so what a person reads and what a script parses never disagree, and
the drawing is testable without a worker.
"""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

__all__ = ["render_status", "status_renderable"]

_STATE_STYLES = {
    "running": "green",
    "starting": "cyan",
    "backoff": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
}
_WORK_STYLES = {
    "queued": "cyan",
    "starting": "cyan",
    "active": "green",
    "stopping": "yellow",
    "stopped": "dim",
}
_OUTCOME_STYLES = {
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "wedged": "magenta",
    "lease_lost": "red",
    "cancelled": "yellow",
}
_WORKER_STYLES = {
    "online": "green",
    "provisioning": "cyan",
    "degraded": "yellow",
    "offline": "dim",
    "failed": "red",
    "removed": "dim",
}


def duration_text(seconds: float | None) -> str:
    """``4s``, ``2m05s``, ``3h02m``, ``2d04h``: short and still exact enough to compare."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _state(text: str, styles: dict[str, str]) -> Text:
    return Text(text, style=styles.get(text, ""))


def _child_label(child: dict[str, Any], sessions: dict[str, dict[str, Any]]) -> Text:
    label = Text()
    label.append(child["id"], style="bold")
    label.append("  ")
    label.append_text(_state(child["state"], _STATE_STYLES))
    if child.get("uptime") is not None:
        label.append(f"  up {duration_text(child['uptime'])}")
    restarts = child.get("restart_count") or 0
    if restarts:
        label.append(f"  {_plural(restarts, 'restart')}", style="yellow")
        if child.get("last_exit_reason"):
            label.append(f" (last exit: {child['last_exit_reason']})", style="yellow")
    session = sessions.get(child["id"].removeprefix("session:"))
    if session is not None and session.get("lease"):
        lease = session["lease"]
        left = lease.get("seconds_left")
        if not lease.get("beats") or lease.get("ttl") is None:
            label.append("  lease: waiting for its first heartbeat", style="dim")
        else:
            label.append(
                f"  lease: {_plural(lease['beats'], 'beat')}, ttl {lease['ttl']:g}s"
                + (f", {duration_text(left)} to deadline" if left is not None else ""),
                style="dim",
            )
        if lease.get("stop_requested"):
            label.append(f"  stopping: {lease['stop_requested']}", style="yellow")
    return label


def _add_children(
    node: Tree, supervisor: dict[str, Any], sessions: dict[str, dict[str, Any]]
) -> None:
    for child in supervisor["children"]:
        branch = node.add(_child_label(child, sessions))
        nested = child.get("supervisor")
        if nested is not None:
            _add_children(branch, nested, sessions)


def tree_renderable(worker: dict[str, Any]) -> RenderableType:
    """The live supervision tree of a running worker."""
    tree = worker.get("tree")
    stats = worker.get("stats", {})
    wedge = worker.get("wedge", {})
    title = Text()
    title.append(f"worker {worker['worker_id']}", style="bold")
    title.append(f"  pid {worker['pid']}  {stats.get('active', 0)}/{stats.get('capacity', 0)}")
    title.append(" sessions")
    if stats.get("draining"):
        title.append("  draining", style="yellow")
    if wedge.get("wedged"):
        title.append(f"  WEDGED: {wedge.get('reason')}", style="bold magenta")
    if stats.get("restarts"):
        title.append(f"  {_plural(stats['restarts'], 'restart')}", style="yellow")
    if worker.get("api_url"):
        title.append(f"  API {worker['api_url']}", style="dim")
    root = Tree(title)
    if tree is None:
        root.add(Text("(the tree is not running)", style="dim"))
        return root
    sessions = {s["work_id"]: s for s in worker.get("sessions", [])}
    _add_children(root, tree, sessions)
    return root


def _workers_table(workers: list[dict[str, Any]], now: float) -> Table:
    table = Table(
        title="Workers (as the control plane sees them)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("worker")
    table.add_column("status")
    table.add_column("active", justify="right")
    table.add_column("labels")
    table.add_column("last heartbeat")
    table.add_column("note")
    for w in workers:
        seen = w.get("last_heartbeat_at")
        note = w.get("runtime_state") or ""
        if w.get("sample_error"):
            note = f"{note}: {w['sample_error']}" if note else w["sample_error"]
        table.add_row(
            w["worker_id"],
            _state(w["status"], _WORKER_STYLES),
            str(w.get("active_tasks", 0)),
            " ".join(w.get("labels") or ()) or "-",
            f"{duration_text(now - seen)} ago" if seen else "never",
            note,
        )
    return table


def _items_table(items: list[dict[str, Any]], total_shown: int, now: float) -> Table:
    # Ids are long and people copy them into ``cancel``: they never wrap; the prompt
    # gets what is left of the line.
    table = Table(
        title=f"Work items (newest {total_shown}, oldest first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("prompt", overflow="ellipsis", no_wrap=True, ratio=1)
    for item in items:
        outcome = item.get("outcome")
        outcome_text = Text()
        if outcome is not None:
            outcome_text.append(outcome["status"], style=_OUTCOME_STYLES.get(outcome["status"], ""))
            if outcome.get("exit_code") not in (None, 0):
                outcome_text.append(f" (exit {outcome['exit_code']})")
        created = item.get("created_at")
        attempts = item.get("attempts", 0)
        state = _state(item["state"], _WORK_STYLES)
        if attempts > 1:
            state.append(f" x{attempts}", style="yellow")
        table.add_row(
            item["id"],
            state,
            outcome_text,
            duration_text(outcome.get("duration")) if outcome else "",
            duration_text(now - created) if created else "",
            item.get("prompt", ""),
        )
    return table


def status_renderable(document: dict[str, Any], *, now: float | None = None) -> RenderableType:
    """Everything ``status`` shows: the live tree, the workers, the queue, the items."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    worker = document.get("worker")
    if worker is not None:
        parts.append(tree_renderable(worker))
    else:
        parts.append(Text(document.get("worker_note") or "No worker is running here.", style="dim"))
    parts.append(Text(""))
    workers = document.get("workers", [])
    if workers:
        parts.append(_workers_table(workers, now))
    else:
        parts.append(Text("No worker has registered with this control plane yet.", style="dim"))
    queue = document.get("queue")
    if queue is not None:
        line = Text("Queue: ", style="bold")
        line.append(f"{queue['depth']} queued, {queue['pending']} in progress")
        if queue.get("oldest_queued_at"):
            line.append(f", oldest waiting {duration_text(now - queue['oldest_queued_at'])}")
        line.append(f", {queue.get('workers_polling', 0)} worker(s) polling")
        parts.append(line)
    items = document.get("items", [])
    if items:
        parts.append(_items_table(items, len(items), now))
    else:
        parts.append(Text("No work items yet.", style="dim"))
    if document.get("hint"):
        parts.append(Text(document["hint"], style="dim"))
    return Group(*parts)


def render_status(
    document: dict[str, Any], console: Console | None = None, *, now: float | None = None
) -> None:
    """Print the status document on ``console`` (default: stdout).

    Output that goes to a file or a pipe is drawn 120 columns wide rather
    than rich's 80, so that item ids and outcomes fit on one line for grep.
    """
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)
    console.print(status_renderable(document, now=now))
