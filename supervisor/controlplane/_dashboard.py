"""The operators' dashboard of the reference server (DESIGN §5.1): pages at ``/``.

Two kinds of routes, both mounted next to the API by ``create_app``:

- **Pages** (``/``, ``/dashboard/workers``, ``/dashboard/queue``,
  ``/dashboard/items``, ``/dashboard/items/{id}``, ``/dashboard/workers/{id}``)
  and their static script and style sheet. Public, and holding no data: each is
  a shell with a sign-in form, a navigation bar and empty live regions.
- **Fragments** (``/dashboard/data/{environment_id}/...``): the live regions'
  contents, HTML rendered here from ``ControlPlane`` calls. They sit behind the
  same bearer check as the API (the environment key), so without the key there
  is no data, only the sign-in prompt.

The page's script asks for the key, keeps it in ``sessionStorage`` (this tab
only), sends it as ``Authorization: Bearer`` and never puts it in a URL; it
polls the fragments every two seconds and says so when the server stops
answering. Cancelling an item calls the API's own ``request-stop``, the call
``python -m supervisor cancel`` makes, with the same key.

Nothing here writes: the fragments only read through the ``ControlPlane``
protocol, so they work over any store that implements it.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Final
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._dashboard_html import (
    Markup,
    age,
    badge,
    cancel_button,
    capacity_cell,
    duration_text,
    h,
    item_duration,
    item_href,
    items_table,
    outcome_badge,
    outcomes_chart,
    queue_depth_chart,
    render,
    state_badge,
    table,
    tree_view,
    wedge_reason,
    worker_capacity,
    worker_href,
    worker_labels,
)
from ._exceptions import BadRequest, NotFound
from ._models import Delegation, WorkerRecord, WorkItem, WorkState
from ._protocol import ControlPlane

__all__ = [
    "DASHBOARD_PREFIX",
    "dashboard_routes",
    "page_response",
    "static_endpoint",
    "static_response",
]

#: Where the dashboard's pages, static files and fragments live (besides ``/``).
DASHBOARD_PREFIX: Final = "/dashboard"
#: Items per page of the items table.
PAGE_SIZE: Final = 50
#: A text search reads at most this many items, newest first.
SEARCH_LIMIT: Final = 5000
#: The charts read at most this many stopped items, newest first.
CHART_LIMIT: Final = 2000
#: Largest page the protocol hands out in one call.
_BATCH: Final = 1000
#: The store refuses pages beyond this index; counting never asks past it.
_MAX_PAGE: Final = 1_000_000

_LIVE: Final = (WorkState.QUEUED, WorkState.STARTING, WorkState.ACTIVE, WorkState.STOPPING)

_Handler = Callable[[Request, ControlPlane], Awaitable[Response]]
Endpoint = Callable[[_Handler], Callable[[Request], Awaitable[Response]]]
"""Wraps a fragment handler with the server's authentication and error policy."""

_SECURITY_HEADERS: Final = {
    # The pages run only their own script: an injected <script> or on* attribute does nothing.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- reading through the protocol --------------------------------------------------------


#: The last count of each plane and state, where each count starts its search.
_count_hints: weakref.WeakKeyDictionary[ControlPlane, dict[WorkState | None, int]] = (
    weakref.WeakKeyDictionary()
)


async def count_items(plane: ControlPlane, state: WorkState | None) -> int:
    """How many items ``list_work`` would list, found with one-item pages.

    The protocol has no count. A galloping search over page indexes finds the
    last item in O(log n) calls without reading the others, and it starts
    from the previous count of the same plane and state: items are only ever
    added (or purged by retention), so while the dashboard polls, a count
    usually costs two calls. Items submitted meanwhile may or may not be counted.
    """

    async def exists(index: int) -> bool:
        return bool(await plane.list_work(state=state, limit=1, page=index))

    try:
        hints = _count_hints.setdefault(plane, {})
    except TypeError:  # a plane that cannot be weakly referenced just gets no hint
        hints = {}
    hint = hints.get(state, 0)
    if hint and await exists(hint - 1):
        low, step = hint - 1, 1
    elif await exists(0):
        low, step = 0, 1
    else:
        hints[state] = 0
        return 0
    # exists(low); gallop up until an index past the end, then bisect.
    high = low + step
    while high <= _MAX_PAGE and await exists(high):
        low, step = high, step * 2
        high = low + step
    high = min(high, _MAX_PAGE + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if await exists(middle):
            low = middle
        else:
            high = middle
    hints[state] = low + 1
    return low + 1


async def items_window(
    plane: ControlPlane, state: WorkState | None, start: int, stop: int
) -> list[WorkItem]:
    """Items at positions ``[start, stop)`` of ``list_work``'s oldest-first order."""
    start = max(0, start)
    if stop <= start:
        return []
    size = min(stop - start, _BATCH)
    first = start // size
    found: list[WorkItem] = []
    page = first
    while len(found) < (stop - first * size) and page <= _MAX_PAGE:
        batch = await plane.list_work(state=state, limit=size, page=page)
        found.extend(batch)
        if len(batch) < size:
            break
        page += 1
    offset = start - first * size
    return found[offset : offset + (stop - start)]


async def newest_items(
    plane: ControlPlane,
    state: WorkState | None,
    limit: int,
    *,
    created_after: float | None = None,
) -> list[WorkItem]:
    """Up to ``limit`` items, newest first, read a page at a time from the end.

    With ``created_after``, reading also stops at the first page that reaches
    back past that time (list order is creation order).
    """
    total = await count_items(plane, state)
    size = max(1, min(limit, _BATCH))
    newest: list[WorkItem] = []
    for page in range((total - 1) // size, -1, -1):
        batch = await plane.list_work(state=state, limit=size, page=page)
        newest.extend(reversed(batch))
        if len(newest) >= limit:
            break
        oldest = batch[0].created_at if batch else None
        if created_after is not None and oldest is not None and oldest < created_after:
            break
    return newest[:limit]


async def live_items(plane: ControlPlane) -> list[WorkItem]:
    """Every item not stopped yet (queued first, oldest first in each state)."""
    found: list[WorkItem] = []
    for state in _LIVE:
        page = 0
        while True:
            batch = await plane.list_work(state=state, limit=_BATCH, page=page)
            found.extend(batch)
            if len(batch) < _BATCH:
                break
            page += 1
    return found


async def chart_items(plane: ControlPlane, now: float) -> list[WorkItem]:
    """What the charts need: the live items and the recently stopped ones.

    Stopped items are read newest first (by creation) and no further back than
    a day before the window, nor more than ``CHART_LIMIT`` of them: an item
    created earlier than that and stopped within the hour is not drawn.
    """
    items = await live_items(plane)
    horizon = now - 3600 - 86400
    stopped = await newest_items(plane, WorkState.STOPPED, CHART_LIMIT, created_after=horizon)
    items.extend(i for i in stopped if i.created_at is None or i.created_at >= horizon)
    return items


def _matches(item: WorkItem, needle: str) -> bool:
    fields = [item.id, item.data.id, item.data.prompt, item.worker_id or "", item.state.value]
    fields += [f"{k}={v}" for k, v in item.metadata.items()]
    if item.outcome is not None:
        fields += [item.outcome.status.value, item.outcome.reason or "", item.outcome.result or ""]
    return any(needle in value.casefold() for value in fields)


async def all_delegations(plane: ControlPlane, worker_ids: Iterable[str]) -> list[Delegation]:
    """Every delegation the protocol can list for these workers (it lists them by worker)."""
    found: dict[str, Delegation] = {}
    for worker_id in dict.fromkeys(worker_ids):
        for delegation in await plane.list_delegations(worker_id):
            found[delegation.id] = delegation
    return list(found.values())


async def _worker_items(plane: ControlPlane, worker_id: str) -> list[WorkItem]:
    return [item for item in await live_items(plane) if item.worker_id == worker_id]


# --- fragments ---------------------------------------------------------------------------------


def _fragment(body: Markup) -> Response:
    return Response(body, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)


def _card(label: str, value: object, detail: object = "") -> Markup:
    return h(
        "div",
        {"class": "card"},
        h("dt", None, label),
        h("dd", None, h("span", {"class": "figure"}, value), " ", detail),
    )


async def _queue_cards(plane: ControlPlane, now: float) -> Markup:
    stats = await plane.stats()
    oldest = (
        age(stats.oldest_queued_at, now, suffix="")
        if stats.oldest_queued_at is not None
        else "none waiting"
    )
    return h(
        "dl",
        {"class": "cards"},
        _card("Queue depth", stats.depth, "queued"),
        _card("Oldest queued", oldest),
        _card("In flight", stats.pending, "starting, active or stopping"),
        _card("Workers polling", stats.workers_polling),
    )


def _charts(items: Sequence[WorkItem], now: float) -> Markup:
    return h(
        "div",
        {"class": "charts"},
        h(
            "figure",
            None,
            h("figcaption", None, "Queue depth, last hour"),
            queue_depth_chart(items, now),
        ),
        h(
            "figure",
            None,
            h("figcaption", None, "Session outcomes, last hour"),
            outcomes_chart(items, now),
        ),
    )


def _workers_table(workers: Sequence[WorkerRecord], live: Sequence[WorkItem], now: float) -> Markup:
    sessions: dict[str, list[WorkItem]] = {}
    for item in live:
        if item.worker_id is not None and item.state is not WorkState.QUEUED:
            sessions.setdefault(item.worker_id, []).append(item)
    rows = []
    for worker in workers:
        own = sessions.get(worker.worker_id, [])
        version = worker.runtime_metadata.get("version")
        rows.append(
            [
                h("a", {"href": worker_href(worker.worker_id)}, worker.worker_id),
                badge(worker.status.value),
                h("span", {"class": "reason"}, wedge_reason(worker)),
                capacity_cell(worker.active_tasks, worker_capacity(worker)),
                render([render(h("code", None, label), " ") for label in worker_labels(worker)]),
                render(
                    [render(h("a", {"href": item_href(i.id)}, i.id), " ") for i in own[:5]],
                    f"+{len(own) - 5} more" if len(own) > 5 else "",
                ),
                age(worker.last_heartbeat_at, now) or "never",
                str(version) if version is not None else "",
            ]
        )
    return table(
        "Workers",
        [
            "Worker",
            "Status",
            "Wedge / reason",
            "Capacity",
            "Labels",
            "Active sessions",
            "Last seen",
            "Version",
        ],
        rows,
        empty="No worker has registered in this environment yet.",
        class_="workers",
    )


async def overview_fragment(request: Request, plane: ControlPlane) -> Response:
    now = time.time()
    workers = await plane.list_workers()
    items = await chart_items(plane, now)
    live = [i for i in items if i.state is not WorkState.STOPPED]
    latest = await newest_items(plane, None, 10)
    return _fragment(
        render(
            await _queue_cards(plane, now),
            _charts(items, now),
            _workers_table(workers, live, now),
            items_table("Latest items", latest, now, empty="No items yet: submit one."),
        )
    )


async def workers_fragment(request: Request, plane: ControlPlane) -> Response:
    now = time.time()
    workers = await plane.list_workers()
    return _fragment(_workers_table(workers, await live_items(plane), now))


async def queue_fragment(request: Request, plane: ControlPlane) -> Response:
    now = time.time()
    items = await chart_items(plane, now)
    counts = [(state, await count_items(plane, state)) for state in WorkState]
    by_state = table(
        "Items by state",
        ["State", "Items"],
        [[badge(state.value), count] for state, count in counts],
        empty="",
        class_="narrow",
    )
    oldest = await plane.list_work(state=WorkState.QUEUED, limit=20)
    return _fragment(
        render(
            await _queue_cards(plane, now),
            _charts(items, now),
            by_state,
            items_table("Oldest queued items", oldest, now, empty="Nothing is waiting."),
        )
    )


def _page_link(query: dict[str, str], page: int, text: str, *, rel: str) -> Markup:
    href = "?" + urlencode({**query, "page": str(page)})
    return h("a", {"href": href, "rel": rel, "class": "page-link"}, text)


async def items_fragment(request: Request, plane: ControlPlane) -> Response:
    """The items table: newest first, filtered by state and by text, ``PAGE_SIZE`` a page."""
    allowed = {"state", "q", "page"}
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    raw_state = request.query_params.get("state") or ""
    try:
        state = WorkState(raw_state) if raw_state else None
    except ValueError:
        allowed_states = ", ".join(s.value for s in WorkState)
        raise BadRequest(f"state must be one of {allowed_states}") from None
    text = (request.query_params.get("q") or "").strip()
    try:
        page = int(request.query_params.get("page") or "1")
    except ValueError:
        raise BadRequest("page must be a number") from None
    page = max(page, 1)
    now = time.time()
    note = ""
    if text:
        candidates = await newest_items(plane, state, SEARCH_LIMIT)
        needle = text.casefold()
        matching = [item for item in candidates if _matches(item, needle)]
        if len(candidates) == SEARCH_LIMIT:
            note = f"Searched the newest {SEARCH_LIMIT} items only."
        total = len(matching)
        shown = matching[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    else:
        total = await count_items(plane, state)
        stop = total - (page - 1) * PAGE_SIZE
        shown = list(reversed(await items_window(plane, state, stop - PAGE_SIZE, stop)))
    pages = max(1, math.ceil(total / PAGE_SIZE))
    query = {k: v for k, v in (("state", raw_state), ("q", text)) if v}
    links = []
    if page > 1:
        links.append(_page_link(query, page - 1, "← Newer", rel="prev"))
    if page < pages:
        links.append(_page_link(query, page + 1, "Older →", rel="next"))
    described = "all states" if state is None else state.value
    summary = f"{total} item{'s' if total != 1 else ''} ({described}"
    summary += f", matching “{text}”)" if text else ")"
    return _fragment(
        render(
            h("p", {"class": "summary"}, summary, f" · page {min(page, pages)} of {pages}"),
            h("p", {"class": "note"}, note) if note else "",
            items_table("Items, newest first", shown, now, empty="No items match."),
            h("nav", {"class": "pager", "aria_label": "Pages"}, links) if links else "",
        )
    )


def _dl(pairs: Sequence[tuple[str, object]]) -> Markup:
    return h(
        "dl",
        {"class": "facts"},
        [h("div", None, h("dt", None, name), h("dd", None, value)) for name, value in pairs],
    )


def _delegations_table(caption: str, delegations: Sequence[Delegation], now: float) -> Markup:
    rows = [
        [
            h("code", None, d.id),
            h("code", None, d.source_id),
            h("a", {"href": item_href(d.work_id)}, d.work_id),
            badge(d.status.value),
            h("span", {"class": "prompt"}, d.task),
            h("pre", {"class": "clip"}, d.response_preview or ""),
            age(d.created_at, now),
        ]
        for d in delegations
    ]
    return table(
        caption,
        ["Delegation", "From session", "Delegate item", "Status", "Task", "Result", "Created"],
        rows,
        empty="None.",
    )


def _retry_time(when: float | None, now: float) -> object:
    """When a retried attempt's item became claimable again (or will)."""
    if when is None:
        return ""
    return age(when, now) if when <= now else "in " + duration_text(when - now)


async def item_fragment(request: Request, plane: ControlPlane) -> Response:
    """One item: its data, metadata, times, outcome, attempts, delegations and messages."""
    item = await plane.get(request.path_params["work_id"])
    now = time.time()
    outcome = item.outcome
    facts: list[tuple[str, object]] = [
        ("State", render(state_badge(item), " ", cancel_button(item))),
        ("Session", h("code", None, item.data.id)),
        ("Attempts", item.attempts),
        (
            "Worker",
            h("a", {"href": worker_href(item.worker_id)}, item.worker_id)
            if item.worker_id
            else "none yet",
        ),
        ("Duration", duration_text(item_duration(item, now)) or "not started"),
    ]
    history = [
        (name, when)
        for name, when in (
            ("created", item.created_at),
            ("acknowledged", item.acknowledged_at),
            ("started", item.started_at),
            ("last heartbeat", item.latest_heartbeat_at),
            ("stop requested", item.stop_requested_at),
            ("stopped", item.stopped_at),
        )
        if when is not None
    ]
    timeline = table(
        "History",
        ["Event", "When"],
        [[name, age(when, now)] for name, when in history],
        empty="",
        class_="narrow",
    )
    if outcome is not None:
        outcome_part = render(
            h("h2", None, "Outcome"),
            _dl(
                [
                    ("Status", outcome_badge(item)),
                    ("Exit code", "" if outcome.exit_code is None else outcome.exit_code),
                    ("Reason", outcome.reason or ""),
                    ("Duration", duration_text(outcome.duration)),
                ]
            ),
            h("h3", None, "Result"),
            h("pre", {"class": "text"}, outcome.result or "(none)"),
        )
    else:
        outcome_part = render(h("h2", None, "Outcome"), h("p", None, "Not finished yet."))
    # Every recorded attempt, oldest first: a retried or dead-letter item shows why.
    attempts = table(
        "Attempts",
        ["Attempt", "Outcome", "Exit code", "Reason", "Worker", "Ended", "Retry at"],
        [
            [
                a.attempt,
                badge(a.outcome.status.value),
                "" if a.outcome.exit_code is None else a.outcome.exit_code,
                a.outcome.reason or "",
                a.worker_id or "",
                age(a.ended_at, now),
                _retry_time(a.retry_at, now),
            ]
            for a in item.history
        ],
        empty="No attempt has ended yet.",
    )
    metadata = table(
        "Metadata",
        ["Key", "Value"],
        [[h("code", None, k), v] for k, v in sorted(item.metadata.items())],
        empty="No metadata.",
        class_="narrow",
    )
    # Delegations are listed by the worker their source session had: this item's own
    # worker (which may never have registered) and every registered one.
    worker_ids = [item.worker_id] if item.worker_id else []
    worker_ids += [worker.worker_id for worker in await plane.list_workers()]
    delegations = [
        d
        for d in await all_delegations(plane, worker_ids)
        if d.source_id == item.data.id or d.work_id == item.id
    ]
    messages = await plane.list_messages(item.data.id)
    message_table = table(
        "Messages",
        ["Kind", "Message", "Sent"],
        [
            [badge(m.kind), h("pre", {"class": "clip"}, m.body), age(m.created_at, now)]
            for m in messages
        ],
        empty="No messages.",
    )
    return _fragment(
        render(
            _dl(facts),
            timeline,
            outcome_part,
            attempts,
            h("h2", None, "Prompt"),
            h("pre", {"class": "text prompt-full"}, item.data.prompt),
            metadata,
            _delegations_table("Delegations", delegations, now),
            message_table,
        )
    )


async def worker_fragment(request: Request, plane: ControlPlane) -> Response:
    """One worker: its record, live sessions, delegations and supervision tree."""
    worker = await plane.get_worker(request.path_params["worker_id"])
    now = time.time()
    meta = worker.runtime_metadata
    capabilities = meta.get("capabilities")
    facts: list[tuple[str, object]] = [
        ("Status", badge(worker.status.value)),
        ("Wedge / reason", h("span", {"class": "reason"}, wedge_reason(worker)) or "none"),
        ("Capacity", capacity_cell(worker.active_tasks, worker_capacity(worker))),
        ("Error rate", f"{worker.error_rate:.0%}"),
        (
            "Current task",
            h("a", {"href": item_href(worker.current_task)}, worker.current_task)
            if worker.current_task
            else "none",
        ),
        ("Labels", ", ".join(worker_labels(worker)) or "none"),
        ("Last seen", age(worker.last_heartbeat_at, now) or "never"),
        ("Registered", age(worker.registered_at, now)),
        ("Uptime", duration_text(worker.uptime_seconds)),
        ("Version", str(meta.get("version", ""))),
        (
            "Capabilities",
            h("code", None, _compact(capabilities)) if capabilities is not None else "",
        ),
    ]
    own = await _worker_items(plane, worker.worker_id)
    delegations = await plane.list_delegations(worker.worker_id)
    tree = meta.get("tree")
    return _fragment(
        render(
            _dl(facts),
            items_table("Sessions on this worker", own, now, empty="No live session."),
            h("h2", None, "Supervision tree"),
            h("p", {"class": "note"}, "As of the worker's last presence report."),
            tree_view(tree if isinstance(tree, dict) else None),
            _delegations_table("Delegations made by its sessions", delegations, now),
        )
    )


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


# --- pages -------------------------------------------------------------------------------------

_NAV: Final = (
    ("overview", "/", "Overview"),
    ("workers", f"{DASHBOARD_PREFIX}/workers", "Workers"),
    ("queue", f"{DASHBOARD_PREFIX}/queue", "Queue"),
    ("items", f"{DASHBOARD_PREFIX}/items", "Items"),
)


def _sign_in_form() -> Markup:
    return h(
        "section",
        {"id": "sign-in", "class": "sign-in", "aria_labelledby": "sign-in-title"},
        h("h1", {"id": "sign-in-title"}, "Sign in"),
        h(
            "p",
            None,
            "This dashboard shows the work queue and workers of this control plane. "
            "Enter the environment key the command line uses (",
            h("code", None, "SUPERVISOR_ENVIRONMENT_KEY"),
            "). It stays in this browser tab only and is never put in a link.",
        ),
        h(
            "form",
            {"id": "sign-in-form", "method": "post", "autocomplete": "off"},
            h("label", {"for": "key"}, "Environment key"),
            h(
                "input",
                {
                    "id": "key",
                    "name": "key",
                    "type": "password",
                    "required": True,
                    "autocomplete": "off",
                    "spellcheck": "false",
                },
            ),
            h("label", {"for": "environment"}, "Environment"),
            h(
                "input",
                {"id": "environment", "name": "environment", "value": "default", "required": True},
            ),
            h("button", {"type": "submit"}, "Sign in"),
            h("p", {"id": "sign-in-error", "class": "error", "role": "alert"}),
        ),
    )


def page_response(
    *,
    page: str,
    title: str,
    live_src: str,
    controls: Markup | None = None,
    auth: str = "key",
    nav: Sequence[tuple[str, str, str]] = _NAV,
) -> Response:
    """A page shell: navigation, sign-in form, one live region filled by the script.

    It holds no data: ``live_src`` names the fragment the script fetches (with
    the key) and puts in the live region.
    """
    links = [
        h("a", {"href": href, "aria_current": "page" if name == page else None}, text)
        for name, href, text in nav
    ]
    body = h(
        "body",
        {"data_page": page, "data_auth": auth},
        h("a", {"class": "skip", "href": "#main"}, "Skip to content"),
        h(
            "header",
            {"class": "top"},
            h("a", {"class": "brand", "href": nav[0][1]}, "supervisor"),
            h("nav", {"aria_label": "Dashboard"}, links),
            h(
                "div",
                {"class": "session"},
                h("span", {"id": "connection", "class": "connection", "role": "status"}),
                h("span", {"id": "who", "class": "muted"}),
                h("button", {"id": "sign-out", "type": "button", "hidden": True}, "Sign out"),
            ),
        ),
        _sign_in_form() if auth == "key" else "",
        h(
            "main",
            {"id": "main", "hidden": auth == "key", "tabindex": "-1"},
            h("h1", None, title),
            controls,
            h("p", {"id": "notice", "class": "notice", "role": "status"}),
            h(
                "div",
                {"id": "live", "class": "live", "data_src": live_src, "aria_busy": "true"},
                h("p", {"class": "muted"}, "Loading…"),
            ),
        ),
        h("noscript", None, h("p", {"class": "error"}, "This dashboard needs JavaScript.")),
    )
    document = render(
        Markup("<!doctype html>\n"),
        h(
            "html",
            {"lang": "en"},
            h(
                "head",
                None,
                h("meta", {"charset": "utf-8"}),
                h("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
                h("title", None, f"{title} · supervisor"),
                h(
                    "link",
                    {"rel": "stylesheet", "href": f"{DASHBOARD_PREFIX}/static/dashboard.css"},
                ),
                h("script", {"src": f"{DASHBOARD_PREFIX}/static/dashboard.js", "defer": True}),
            ),
            body,
        ),
    )
    return Response(document, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)


def _items_controls(request: Request) -> Markup:
    state = request.query_params.get("state") or ""
    text = request.query_params.get("q") or ""
    options = [h("option", {"value": ""}, "all states")] + [
        h("option", {"value": s.value, "selected": s.value == state}, s.value) for s in WorkState
    ]
    return h(
        "form",
        {"class": "filters", "method": "get", "role": "search"},
        h("label", {"for": "state"}, "State"),
        h("select", {"id": "state", "name": "state"}, options),
        h("label", {"for": "q"}, "Text"),
        h(
            "input",
            {
                "id": "q",
                "name": "q",
                "type": "search",
                "value": text,
                "placeholder": "id, prompt, outcome…",
            },
        ),
        h("button", {"type": "submit"}, "Filter"),
    )


async def _overview_page(request: Request) -> Response:
    return page_response(page="overview", title="Overview", live_src="overview")


async def _workers_page(request: Request) -> Response:
    return page_response(page="workers", title="Workers", live_src="workers")


async def _queue_page(request: Request) -> Response:
    return page_response(page="queue", title="Queue", live_src="queue")


async def _items_page(request: Request) -> Response:
    return page_response(
        page="items", title="Items", live_src="items", controls=_items_controls(request)
    )


async def _item_page(request: Request) -> Response:
    work_id = request.path_params["work_id"]
    return page_response(
        page="items", title=f"Item {work_id}", live_src="items/" + quote(work_id, safe="")
    )


async def _worker_page(request: Request) -> Response:
    worker_id = request.path_params["worker_id"]
    return page_response(
        page="workers",
        title=f"Worker {worker_id}",
        live_src="workers/" + quote(worker_id, safe=""),
    )


_STATIC_TYPES: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def static_response(name: str) -> Response:
    """One of the dashboard's two static files, read from the installed package."""
    media_type = _STATIC_TYPES.get(name)
    if media_type is None:
        raise NotFound(f"no dashboard file {name!r}")
    data = resources.files(__package__).joinpath("dashboard", name).read_bytes()
    return Response(
        data,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


async def static_endpoint(request: Request) -> Response:
    """``GET /dashboard/static/{name}``: the script or the style sheet."""
    try:
        return static_response(request.path_params["name"])
    except NotFound as exc:
        body = {"error": {"type": exc.error_type, "message": exc.message}}
        return Response(json.dumps(body), status_code=404, media_type="application/json")


def dashboard_routes(endpoint: Endpoint) -> list[Route]:
    """The dashboard's routes; ``endpoint`` adds the API's key check to the fragments."""
    data = f"{DASHBOARD_PREFIX}/data/{{environment_id}}"
    return [
        Route("/", _overview_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/workers", _workers_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/workers/{{worker_id}}", _worker_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/queue", _queue_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/items", _items_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/items/{{work_id}}", _item_page, methods=["GET"]),
        Route(f"{DASHBOARD_PREFIX}/static/{{name}}", static_endpoint, methods=["GET"]),
        Route(f"{data}/overview", endpoint(overview_fragment), methods=["GET"]),
        Route(f"{data}/workers", endpoint(workers_fragment), methods=["GET"]),
        Route(f"{data}/workers/{{worker_id}}", endpoint(worker_fragment), methods=["GET"]),
        Route(f"{data}/queue", endpoint(queue_fragment), methods=["GET"]),
        Route(f"{data}/items", endpoint(items_fragment), methods=["GET"]),
        Route(f"{data}/items/{{work_id}}", endpoint(item_fragment), methods=["GET"]),
    ]
