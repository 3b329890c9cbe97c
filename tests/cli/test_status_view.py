"""The terminal drawing of ``status``: a pure function of the status document."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from supervisor._cli._status_view import duration_text, render_status

NOW = 1_800_000_000.0


def child(
    child_id: str, *, state: str = "running", restarts: int = 0, nested: Any = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": child_id,
        "state": state,
        "restart": "permanent",
        "significant": False,
        "restart_count": restarts,
        "last_exit_kind": extra.get("kind"),
        "last_exit_reason": extra.get("reason"),
        "started_at": NOW - 100,
        "uptime": extra.get("uptime", 100.0),
        "supervisor": nested,
    }


def supervisor(name: str, *children: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "strategy": "one_for_one",
        "running": True,
        "restarts_in_window": 0,
        "intensity": 3,
        "period": 5.0,
        "children": list(children),
    }


def document() -> dict[str, Any]:
    session = child(
        "session:work_1",
        nested=supervisor("session:work_1", child("lease"), child("runner")),
        uptime=12.0,
    )
    tree = supervisor(
        "worker",
        child(
            "services",
            nested=supervisor(
                "services",
                child("api", restarts=2, reason="RuntimeError: boom", kind="abnormal"),
            ),
        ),
        child(
            "work",
            nested=supervisor(
                "work",
                child("sessions", nested=supervisor("sessions", session)),
                child("poller"),
            ),
        ),
    )
    return {
        "worker": {
            "worker_id": "w-1",
            "pid": 4242,
            "api_url": "http://127.0.0.1:5000",
            "stats": {"active": 1, "capacity": 4, "restarts": 2, "draining": False},
            "wedge": {"wedged": True, "reason": "control request timeout", "marks": 1},
            "tree": tree,
            "sessions": [
                {
                    "work_id": "work_1",
                    "running": True,
                    "lease": {
                        "beats": 5,
                        "ttl": 60.0,
                        "seconds_left": 41.0,
                        "failures": 0,
                        "stop_requested": None,
                        "lost": None,
                    },
                }
            ],
        },
        "workers": [
            {
                "worker_id": "w-1",
                "status": "degraded",
                "active_tasks": 1,
                "runtime_state": "wedged",
                "sample_error": "control request timeout",
                "last_heartbeat_at": NOW - 5,
            }
        ],
        "queue": {"depth": 3, "pending": 1, "oldest_queued_at": NOW - 90, "workers_polling": 1},
        "items": [
            {
                "id": "work_0",
                "state": "stopped",
                "attempts": 1,
                "created_at": NOW - 300,
                "prompt": "an earlier task",
                "outcome": {"status": "failed", "exit_code": 3, "duration": 1.5},
            },
            {
                "id": "work_1",
                "state": "active",
                "attempts": 2,
                "created_at": NOW - 20,
                "prompt": "a task",
                "outcome": None,
            },
        ],
    }


def drawn(doc: dict[str, Any]) -> str:
    out = io.StringIO()
    render_status(doc, Console(file=out, width=140, color_system=None), now=NOW)
    return out.getvalue()


def test_the_tree_shows_every_node_with_state_uptime_restarts_and_lease() -> None:
    text = drawn(document())
    assert "worker w-1  pid 4242  1/4 sessions" in text
    assert "WEDGED: control request timeout" in text
    for node in ("services", "api", "work", "sessions", "session:work_1", "lease", "runner"):
        assert node in text
    assert "api  running  up 1m40s  2 restarts (last exit: RuntimeError: boom)" in text
    assert "lease: 5 beats, ttl 60s, 41s to deadline" in text
    # The tree is drawn as a tree: children are indented under their parents.
    lines = text.splitlines()
    depth = {
        name: next(line.index(name) for line in lines if f"── {name}  " in line)
        for name in ("services", "sessions", "session:work_1", "runner")
    }
    assert depth["services"] < depth["sessions"] < depth["session:work_1"] < depth["runner"]


def test_workers_queue_and_items_are_listed() -> None:
    text = drawn(document())
    assert "degraded" in text and "wedged: control request timeout" in text
    assert "5.0s ago" in text
    assert "Queue: 3 queued, 1 in progress, oldest waiting 1m30s, 1 worker(s) polling" in text
    assert "failed (exit 3)" in text
    assert "active x2" in text  # a second attempt is pointed out
    assert text.index("work_0") < text.index("an earlier task")


def test_without_a_worker_the_note_says_why_and_how_to_start_one() -> None:
    doc: dict[str, Any] = {
        "worker": None,
        "worker_note": "No worker is running in /x (no api.json)",
        "items": [],
    }
    text = drawn(doc)
    assert "No worker is running in /x" in text
    assert "No worker has registered" in text
    assert "No work items yet." in text


def test_a_lease_not_yet_confirmed_is_said_so() -> None:
    doc = document()
    doc["worker"]["sessions"][0]["lease"].update(beats=0, ttl=None, seconds_left=None)
    assert "lease: waiting for its first heartbeat" in drawn(doc)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-3, "0.0s"),
        (4.26, "4.3s"),
        (42.9, "42s"),
        (125, "2m05s"),
        (3 * 3600 + 120, "3h02m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_durations_are_short_and_exact_enough(seconds: float | None, text: str) -> None:
    assert duration_text(seconds) == text
