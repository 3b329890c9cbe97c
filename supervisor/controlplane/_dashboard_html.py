"""HTML for the dashboard: an escaping element builder, tables, the tree, two SVG charts.

Everything the dashboard draws goes through :func:`h`, which escapes every
string it is given (text and attribute values alike) unless it is already
:class:`Markup` built here. Item prompts, outcomes, metadata, worker ids and
messages are untrusted text; there is no other way into the page, so there
is no place to forget the escaping. The pages also forbid inline scripts
(``Content-Security-Policy``), a second line of defence.

Pure functions of their inputs and ``now`` (POSIX seconds): the control
plane's dashboard and a worker's local page share them, and tests can call
them without a server.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

from ._models import OutcomeStatus, WorkerRecord, WorkerStatus, WorkItem, WorkState

__all__ = [
    "Markup",
    "age",
    "duration_text",
    "h",
    "outcomes_chart",
    "queue_depth_chart",
    "render",
    "tree_view",
]

#: Window the charts cover, and their buckets.
CHART_WINDOW: Final = 3600.0
DEPTH_POINTS: Final = 61  # one a minute, both ends included
OUTCOME_BUCKETS: Final = 12  # five minutes each

#: Colours of the outcome chart (also used by the CSS badges, kept in step by hand).
OUTCOME_COLOURS: Final[Mapping[str, str]] = {
    OutcomeStatus.COMPLETED.value: "#2e7d32",
    OutcomeStatus.FAILED.value: "#c62828",
    OutcomeStatus.TIMEOUT.value: "#ef6c00",
    OutcomeStatus.CANCELLED.value: "#616161",
    OutcomeStatus.WEDGED.value: "#6a1b9a",
    OutcomeStatus.LEASE_LOST.value: "#1565c0",
}


class Markup(str):
    """A string that is already HTML: :func:`h` inserts it as it is."""

    __slots__ = ()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, Markup):
        return value
    if isinstance(value, str | int | float):
        return html.escape(str(value), quote=True)
    if isinstance(value, Iterable):
        return "".join(_text(part) for part in value)
    raise TypeError(f"cannot render {type(value).__name__} as HTML")


_VOID: Final = frozenset({"br", "hr", "input", "meta", "link", "img", "col"})


def h(tag: str, attributes: Mapping[str, object] | None = None, *children: object) -> Markup:
    """One element; strings among ``children`` and every attribute value are escaped.

    Attribute values of ``None`` or ``False`` leave the attribute out; ``True``
    writes it bare (``hidden``). ``class_`` and names with underscores map to
    ``class`` and dashes, so ``h("td", {"data_label": "x"})`` is ``data-label``.
    """
    parts = [tag]
    for name, value in (attributes or {}).items():
        if value is None or value is False:
            continue
        attribute = name.rstrip("_").replace("_", "-")
        if value is True:
            parts.append(attribute)
        else:
            parts.append(f'{attribute}="{html.escape(str(value), quote=True)}"')
    opening = "<" + " ".join(parts) + ">"
    if tag in _VOID:
        return Markup(opening)
    return Markup(opening + _text(children) + f"</{tag}>")


def render(*children: object) -> Markup:
    """Children side by side, escaped like :func:`h`'s."""
    return Markup(_text(children))


# --- numbers and times ---------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """``850 ms``, ``12.4 s``, ``3 min 05 s``, ``2 h 07 min``; empty when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def age(when: float | None, now: float, *, suffix: str = " ago") -> Markup:
    """A ``<time>`` reading ``12.0 s ago``, the exact UTC time as its tooltip."""
    if when is None:
        return Markup("")
    iso = _iso(when)
    elapsed = now - when
    text = "just now" if suffix and elapsed < 1 else duration_text(elapsed) + suffix
    return h("time", {"datetime": iso, "title": iso}, text)


def item_duration(item: WorkItem, now: float) -> float | None:
    """Execution time: the outcome's own figure, else started → stopped (or now)."""
    if item.outcome is not None and item.outcome.duration is not None:
        return item.outcome.duration
    if item.started_at is None:
        return None
    end = item.stopped_at if item.stopped_at is not None else now
    return max(0.0, end - item.started_at)


# --- small parts -----------------------------------------------------------------------


def badge(text: str, kind: str | None = None) -> Markup:
    """A coloured label; the colour comes from the CSS class, the meaning from the text."""
    return h("span", {"class": f"badge badge-{kind or text}"}, text)


def state_badge(item: WorkItem) -> Markup:
    return badge(item.state.value)


def outcome_badge(item: WorkItem) -> Markup:
    if item.outcome is None:
        return Markup("")
    return badge(item.outcome.status.value)


def item_href(work_id: str) -> str:
    return "/dashboard/items/" + quote(work_id, safe="")


def worker_href(worker_id: str) -> str:
    return "/dashboard/workers/" + quote(worker_id, safe="")


def cancel_button(item: WorkItem) -> Markup:
    """The item's action: cancel while it can still be stopped (``stopping`` already
    asked), retry once it is in dead letter; nothing otherwise."""
    if item.state is WorkState.STOPPED and item.dead:
        return h(
            "button",
            {
                "type": "button",
                "class": "retry",
                "id": f"retry-{item.id}",
                "data_retry": item.id,
                "aria_label": f"Retry {item.id}",
            },
            "Retry",
        )
    if item.state not in (WorkState.QUEUED, WorkState.STARTING, WorkState.ACTIVE):
        return Markup("")
    return h(
        "button",
        {
            "type": "button",
            "class": "cancel",
            "id": f"cancel-{item.id}",
            "data_cancel": item.id,
            "aria_label": f"Cancel {item.id}",
        },
        "Cancel",
    )


def empty_row(columns: int, text: str) -> Markup:
    return h("tr", None, h("td", {"colspan": columns, "class": "empty"}, text))


def table(
    caption: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    empty: str,
    class_: str = "",
) -> Markup:
    """A semantic table; each cell carries its header as ``data-label`` for the phone layout."""
    head = h("thead", None, h("tr", None, [h("th", {"scope": "col"}, name) for name in headers]))
    if rows:
        body_rows = [
            h(
                "tr",
                None,
                [
                    h("td", {"data_label": name}, cell)
                    for name, cell in zip(headers, row, strict=True)
                ],
            )
            for row in rows
        ]
    else:
        body_rows = [empty_row(len(headers), empty)]
    return h(
        "table",
        {"class": f"data {class_}".strip()},
        h("caption", None, caption),
        head,
        h("tbody", None, body_rows),
    )


def items_table(
    caption: str, items: Sequence[WorkItem], now: float, *, empty: str, actions: bool = True
) -> Markup:
    headers = ["Item", "State", "Attempts", "Outcome", "Duration", "Worker", "Created", "Prompt"]
    if actions:
        headers.append("Actions")
    rows = []
    for item in items:
        row: list[object] = [
            h("a", {"href": item_href(item.id)}, item.id),
            state_badge(item),
            item.attempts,
            outcome_badge(item),
            duration_text(item_duration(item, now)),
            h("a", {"href": worker_href(item.worker_id)}, item.worker_id) if item.worker_id else "",
            age(item.created_at, now),
            h("span", {"class": "prompt"}, _clip(item.data.prompt, 80)),
        ]
        if actions:
            row.append(cancel_button(item))
        rows.append(row)
    return table(caption, headers, rows, empty=empty, class_="items")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def worker_labels(record: WorkerRecord) -> list[str]:
    """Routing labels from the presence metadata, when the worker reports any."""
    raw = record.runtime_metadata.get("labels")
    if isinstance(raw, list | tuple):
        return [str(label) for label in raw]
    if isinstance(raw, Mapping):
        return [f"{k}={v}" for k, v in raw.items()]
    return []


def worker_capacity(record: WorkerRecord) -> int | None:
    capacity = record.runtime_metadata.get("capacity")
    return capacity if isinstance(capacity, int) and not isinstance(capacity, bool) else None


def wedge_reason(record: WorkerRecord) -> str:
    """Why a worker is degraded: its wedge reason, else a high error rate and a sample."""
    if record.runtime_state:
        return f"{record.runtime_state}: {record.sample_error or 'no reason given'}"
    if record.status is WorkerStatus.DEGRADED:
        return f"error rate {record.error_rate:.0%}: {record.sample_error or 'no sample'}"
    return ""


def capacity_cell(active: int, capacity: int | None) -> Markup:
    if capacity is None:
        return render(str(active), " active")
    return render(
        h(
            "meter",
            {"min": 0, "max": max(capacity, 1), "value": min(active, capacity), "title": "busy"},
            f"{active}/{capacity}",
        ),
        " ",
        f"{active}/{capacity}",
    )


# --- the supervision tree ----------------------------------------------------------------


def tree_view(tree: Mapping[str, Any] | None) -> Markup:
    """A supervisor snapshot (``SupervisorSnapshot.as_dict()``) as nested lists.

    Read defensively: the document comes from a worker's presence report, so any
    field may be missing or of the wrong type; what cannot be read is left out.
    """
    if not isinstance(tree, Mapping):
        return h("p", {"class": "empty"}, "No supervision tree reported.")
    return h("ul", {"class": "tree", "aria_label": "supervision tree"}, _node(tree))


def _node(supervisor: Mapping[str, Any]) -> Markup:
    name = str(supervisor.get("name", "?"))
    strategy = str(supervisor.get("strategy", ""))
    running = bool(supervisor.get("running"))
    restarts = supervisor.get("restarts_in_window")
    intensity = supervisor.get("intensity")
    children = supervisor.get("children")
    child_items = []
    for child in children if isinstance(children, list) else []:
        if isinstance(child, Mapping):
            child_items.append(_child(child))
    summary = render(
        h("strong", None, name),
        " ",
        h("span", {"class": "muted"}, strategy),
        " ",
        badge("running" if running else "stopped"),
        " ",
        h("span", {"class": "muted"}, f"restarts {restarts}/{intensity}")
        if restarts is not None
        else "",
    )
    return h(
        "li",
        None,
        summary,
        h("ul", None, child_items) if child_items else "",
    )


def _child(child: Mapping[str, Any]) -> Markup:
    nested = child.get("supervisor")
    if isinstance(nested, Mapping):
        return _node({**nested, "name": child.get("id", nested.get("name", "?"))})
    state = str(child.get("state", "?"))
    parts: list[object] = [h("code", None, str(child.get("id", "?"))), " ", badge(state)]
    restarts = child.get("restart_count")
    if isinstance(restarts, int) and restarts:
        parts += [" ", h("span", {"class": "muted"}, f"{restarts} restarts")]
    uptime = child.get("uptime")
    if isinstance(uptime, int | float) and not isinstance(uptime, bool):
        parts += [" ", h("span", {"class": "muted"}, "up " + duration_text(float(uptime)))]
    reason = child.get("last_exit_reason")
    if reason:
        parts += [" ", h("span", {"class": "reason"}, f"last exit: {reason}")]
    return h("li", None, parts)


# --- charts -------------------------------------------------------------------------------

_W: Final = 600
_H: Final = 140
_PAD_LEFT: Final = 36
_PAD_BOTTOM: Final = 22
_PAD_TOP: Final = 8


def _claimed_at(item: WorkItem) -> float | None:
    for when in (item.acknowledged_at, item.started_at, item.stopped_at):
        if when is not None:
            return when
    return None


def depth_series(items: Iterable[WorkItem], now: float) -> list[int]:
    """Queued items at each minute of the last hour, oldest first, ``now`` last.

    An item counts as queued from its creation until it was first claimed (or
    stopped). An item put back by an expired lease is not redrawn as queued:
    the item keeps no history of that, only its latest times.
    """
    start = now - CHART_WINDOW
    step = CHART_WINDOW / (DEPTH_POINTS - 1)
    spans = []
    for item in items:
        if item.created_at is None:
            continue
        end = _claimed_at(item)
        if item.state is WorkState.QUEUED:
            end = None  # waiting again (a lease expired), whatever its old times say
        spans.append((item.created_at, math.inf if end is None else end))
    series = []
    for index in range(DEPTH_POINTS):
        at = start + index * step
        series.append(sum(1 for created, end in spans if created <= at < end))
    return series


def _axis(max_value: int, label: str) -> list[Markup]:
    bottom = _H - _PAD_BOTTOM
    common = {"fill": "currentColor", "font_size": 11}
    return [
        h(
            "line",
            {"x1": _PAD_LEFT, "y1": bottom, "x2": _W, "y2": bottom, "stroke": "currentColor"},
        ),
        h(
            "line",
            {
                "x1": _PAD_LEFT,
                "y1": _PAD_TOP,
                "x2": _PAD_LEFT,
                "y2": bottom,
                "stroke": "currentColor",
            },
        ),
        h(
            "text",
            {**common, "x": _PAD_LEFT - 4, "y": _PAD_TOP + 10, "text_anchor": "end"},
            max_value,
        ),
        h("text", {**common, "x": _PAD_LEFT - 4, "y": bottom, "text_anchor": "end"}, 0),
        h("text", {**common, "x": _PAD_LEFT, "y": _H - 6}, "-60 min"),
        h("text", {**common, "x": _W, "y": _H - 6, "text_anchor": "end"}, "now"),
        h(
            "text",
            {**common, "x": (_PAD_LEFT + _W) / 2, "y": _H - 6, "text_anchor": "middle"},
            label,
        ),
    ]


def _svg(description: str, parts: Sequence[Markup]) -> Markup:
    return h(
        "svg",
        {
            "class": "chart",
            "viewBox": f"0 0 {_W} {_H}",
            "role": "img",
            "aria_label": description,
            "preserveAspectRatio": "none",
        },
        h("title", None, description),
        parts,
    )


def queue_depth_chart(items: Iterable[WorkItem], now: float) -> Markup:
    """The queue depth over the last hour, as an inline SVG area (no script, no library)."""
    series = depth_series(items, now)
    peak = max(series)
    top = max(peak, 1)
    bottom = _H - _PAD_BOTTOM
    width = _W - _PAD_LEFT
    step = width / (len(series) - 1)
    points = [
        (_PAD_LEFT + index * step, bottom - (value / top) * (bottom - _PAD_TOP))
        for index, value in enumerate(series)
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    area = f"{_PAD_LEFT},{bottom} {line} {_W},{bottom}"
    description = f"Queue depth over the last hour: now {series[-1]}, peak {peak}."
    return _svg(
        description,
        [
            h("polygon", {"points": area, "fill": "#90caf9", "fill_opacity": "0.5"}),
            h("polyline", {"points": line, "fill": "none", "stroke": "#1565c0", "stroke_width": 2}),
            *_axis(top, "queued items"),
        ],
    )


def outcome_buckets(items: Iterable[WorkItem], now: float) -> list[dict[str, int]]:
    """Outcomes of sessions that stopped in each five minutes of the last hour, oldest first."""
    start = now - CHART_WINDOW
    size = CHART_WINDOW / OUTCOME_BUCKETS
    buckets: list[dict[str, int]] = [{} for _ in range(OUTCOME_BUCKETS)]
    for item in items:
        if item.stopped_at is None or item.outcome is None:
            continue
        if not start <= item.stopped_at <= now:
            continue
        index = min(int((item.stopped_at - start) // size), OUTCOME_BUCKETS - 1)
        status = item.outcome.status.value
        buckets[index][status] = buckets[index].get(status, 0) + 1
    return buckets


def outcomes_chart(items: Iterable[WorkItem], now: float) -> Markup:
    """Session outcomes over the last hour as stacked bars, with a legend of totals."""
    buckets = outcome_buckets(items, now)
    totals: dict[str, int] = {}
    for bucket in buckets:
        for status, count in bucket.items():
            totals[status] = totals.get(status, 0) + count
    top = max([sum(bucket.values()) for bucket in buckets] + [1])
    bottom = _H - _PAD_BOTTOM
    slot = (_W - _PAD_LEFT) / OUTCOME_BUCKETS
    bars: list[Markup] = []
    for index, bucket in enumerate(buckets):
        y = float(bottom)
        for status in OUTCOME_COLOURS:
            count = bucket.get(status, 0)
            if not count:
                continue
            height = count / top * (bottom - _PAD_TOP)
            y -= height
            bars.append(
                h(
                    "rect",
                    {
                        "x": f"{_PAD_LEFT + index * slot + 3:.1f}",
                        "y": f"{y:.1f}",
                        "width": f"{slot - 6:.1f}",
                        "height": f"{height:.1f}",
                        "fill": OUTCOME_COLOURS[status],
                    },
                    h("title", None, f"{count} {status}"),
                )
            )
    summary = ", ".join(f"{count} {status}" for status, count in totals.items()) or "none"
    description = f"Session outcomes over the last hour: {summary}."
    legend = h(
        "ul",
        {"class": "legend"},
        [
            h(
                "li",
                None,
                h("span", {"class": f"swatch badge-{status}", "aria_hidden": "true"}),
                f"{status} {totals.get(status, 0)}",
            )
            for status in OUTCOME_COLOURS
        ],
    )
    return render(_svg(description, [*bars, *_axis(top, "sessions ended per 5 min")]), legend)
