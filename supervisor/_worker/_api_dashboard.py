"""A worker's own dashboard page, at ``/`` of its local API (DESIGN §5.1).

It draws what ``GET /status`` and ``GET /health`` say: the worker's health and
wedge reason, its sessions with their leases, its outcome counters and its live
supervision tree, refreshed every two seconds by the control plane dashboard's
script. Like the rest of the local API it only reads and needs no key (the API
binds to loopback and holds no secret); cancelling is done on the control
plane's dashboard, where the key is checked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..controlplane._dashboard import DASHBOARD_PREFIX, page_response, static_endpoint
from ..controlplane._dashboard_html import (
    Markup,
    badge,
    duration_text,
    h,
    render,
    table,
    tree_view,
)

__all__ = ["local_dashboard_routes"]

_FRAGMENT: Final = f"{DASHBOARD_PREFIX}/local"
_NAV: Final = (("local", "/", "This worker"),)

StatusSource = Callable[[], Mapping[str, Any]]
HealthSource = Callable[[], Awaitable[Mapping[str, Any]]]


def _get(document: Mapping[str, Any], *path: str) -> Any:
    value: Any = document
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _session_rows(sessions: object) -> list[list[object]]:
    rows: list[list[object]] = []
    for entry in sessions if isinstance(sessions, list) else []:
        if not isinstance(entry, Mapping):
            continue
        outcome = entry.get("outcome") if isinstance(entry.get("outcome"), Mapping) else None
        lease = entry.get("lease") if isinstance(entry.get("lease"), Mapping) else None
        seconds = entry.get("seconds")
        rows.append(
            [
                h("code", None, str(entry.get("work_id", ""))),
                badge("running") if entry.get("running") else badge("stopped"),
                duration_text(seconds if isinstance(seconds, int | float) else None),
                badge(str(outcome.get("status"))) if outcome else "",
                str(outcome.get("reason") or "") if outcome else "",
                (
                    f"{lease.get('seconds_left')} s left, {lease.get('beats')} beats"
                    if entry.get("running") and lease and lease.get("seconds_left") is not None
                    else ""
                ),
                str(lease.get("stop_requested") or "") if lease else "",
            ]
        )
    return rows


def local_fragment(status: Mapping[str, Any], health: Mapping[str, Any]) -> Markup:
    """The live region of the worker's page, from its status and health documents."""
    wedge_reason = _get(status, "wedge", "reason")
    facts = [
        ("Worker", h("code", None, str(status.get("worker_id", "")))),
        ("Health", badge(str(health.get("status", "unknown")))),
        (
            "Wedge reason",
            h("span", {"class": "reason"}, str(wedge_reason)) if wedge_reason else "none",
        ),
        (
            "Sessions",
            f"{_get(status, 'stats', 'active')} active of {_get(status, 'stats', 'capacity')}",
        ),
        ("Queued on the control plane", "" if health.get("queued") is None else health["queued"]),
        ("Control plane", str(status.get("control_plane", ""))),
        ("Environment", str(status.get("environment_id", ""))),
        ("Agent", str(status.get("agent", ""))),
        ("Version", str(status.get("version", ""))),
    ]
    problem = health.get("control_plane_error")
    if problem:
        facts.append(("Control plane error", h("span", {"class": "error"}, str(problem))))
    outcomes = _get(status, "stats", "outcomes")
    outcome_rows = [
        [badge(str(name)), count]
        for name, count in (outcomes.items() if isinstance(outcomes, Mapping) else [])
    ]
    tree = status.get("tree")
    return render(
        h(
            "dl",
            {"class": "facts"},
            [h("div", None, h("dt", None, name), h("dd", None, value)) for name, value in facts],
        ),
        table(
            "Sessions (running first, then the latest ended)",
            ["Item", "Running", "Time", "Outcome", "Reason", "Lease", "Stop requested"],
            _session_rows(status.get("sessions")),
            empty="No session yet.",
        ),
        table(
            "Outcomes since start",
            ["Outcome", "Sessions"],
            outcome_rows,
            empty="None yet.",
            class_="narrow",
        ),
        h("h2", None, "Supervision tree"),
        tree_view(tree if isinstance(tree, Mapping) else None),
    )


def local_dashboard_routes(status: StatusSource, health: HealthSource) -> list[Route]:
    """``/`` (the page), its fragment and the two static files, for a worker's local API."""

    async def page(request: Request) -> Response:
        return page_response(
            page="local", title="This worker", live_src=_FRAGMENT, auth="none", nav=_NAV
        )

    async def fragment(request: Request) -> Response:
        body = local_fragment(status(), await health())
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    return [
        Route("/", page, methods=["GET"]),
        Route(_FRAGMENT, fragment, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/static/{{name}}", static_endpoint, methods=["GET"]),
    ]
