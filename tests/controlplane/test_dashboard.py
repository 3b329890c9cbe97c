"""The dashboard's server side: no data without the key, escaping, paging, charts.

The real server on 127.0.0.1 (port 0) over a real SQLite file; the browser side is
in ``tests/e2e/test_dashboard_browser.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.controlplane import (
    NO_HEARTBEAT,
    EmbeddedControlPlane,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    RetryPolicy,
    SessionData,
    WorkItem,
    WorkState,
)
from supervisor.controlplane._dashboard import (
    PAGE_SIZE,
    count_items,
    items_window,
    newest_items,
)
from supervisor.controlplane._dashboard_html import (
    Markup,
    depth_series,
    h,
    outcome_buckets,
    tree_view,
)
from supervisor.controlplane._server import open_control_plane_server
from supervisor.controlplane._store import SQLiteStore

KEY = "dashboard-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
API = "/v1/environments/default"
DATA = "/dashboard/data/default"
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'
FRAGMENTS = ["overview", "workers", "queue", "items", "items/{work_id}", "workers/w1"]
PAGES = [
    "/",
    "/dashboard/workers",
    "/dashboard/queue",
    "/dashboard/items",
    "/dashboard/items/{work_id}",
    "/dashboard/workers/w1",
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "controlplane.sqlite3")
    yield opened
    opened.close()


@pytest.fixture
async def client(store: SQLiteStore) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        open_control_plane_server(store, key_provider=KEY) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as raw,
    ):
        yield raw


async def _seed(client: httpx.AsyncClient) -> str:
    """An item whose prompt and metadata are markup, and a worker that reported."""
    response = await client.post(
        f"{API}/work",
        json={"data": {"prompt": XSS}, "metadata": {"<k>": "<v onclick=x>"}},
        headers=AUTH,
    )
    assert response.status_code == 201
    beat = await client.post(
        f"{API}/workers/w1/heartbeat",
        json={"runtime_state": "wedged", "sample_error": "<b>stuck</b>"},
        headers=AUTH,
    )
    assert beat.status_code == 200
    return str(response.json()["id"])


@pytest.mark.parametrize("fragment", FRAGMENTS)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic abc"])
async def test_fragments_give_no_data_without_the_key(
    client: httpx.AsyncClient, fragment: str, auth: str | None
) -> None:
    """Every data route answers 401 in the API's JSON error form, and names nothing stored."""
    work_id = await _seed(client)
    headers = {"Authorization": auth} if auth else {}
    response = await client.get(f"{DATA}/{fragment.format(work_id=work_id)}", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert work_id not in response.text and "stuck" not in response.text


@pytest.mark.parametrize("path", PAGES)
async def test_pages_are_shells_without_data_and_forbid_inline_script(
    client: httpx.AsyncClient, path: str
) -> None:
    work_id = await _seed(client)
    response = await client.get(path.format(work_id=work_id))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "alert(" not in response.text and "stuck" not in response.text
    assert 'id="sign-in-form"' in response.text and 'method="post"' in response.text


async def test_a_path_segment_is_escaped_in_the_page_title(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard/items/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert response.status_code == 200
    assert "<img" not in response.text
    assert "Item &lt;img src=x onerror=alert(1)&gt;" in response.text


@pytest.mark.parametrize("fragment", FRAGMENTS)
async def test_fragments_escape_untrusted_text(client: httpx.AsyncClient, fragment: str) -> None:
    """Prompts, metadata and wedge reasons are rendered as text, never as markup."""
    work_id = await _seed(client)
    response = await client.get(f"{DATA}/{fragment.format(work_id=work_id)}", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.text
    assert "<script>" not in body and "<img" not in body and "<b>" not in body
    assert "onclick=x>" not in body
    if fragment in ("items", "items/{work_id}", "overview"):
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body
    if fragment in ("workers", "overview", "workers/w1"):
        assert "wedged: &lt;b&gt;stuck&lt;/b&gt;" in body


async def test_the_item_page_fragment_shows_metadata_outcome_and_messages(
    client: httpx.AsyncClient,
) -> None:
    work_id = await _seed(client)
    item = (await client.get(f"{API}/work/{work_id}", headers=AUTH)).json()
    session = item["data"]["id"]
    posted = await client.post(
        f"{API}/sessions/{session}/messages", json={"body": "please <hurry>"}, headers=AUTH
    )
    assert posted.status_code == 201
    stopped = await client.post(f"{API}/work/{work_id}/request-stop", headers=AUTH)
    assert stopped.json()["state"] == "stopped"
    body = (await client.get(f"{DATA}/items/{work_id}", headers=AUTH)).text
    assert "please &lt;hurry&gt;" in body
    assert "&lt;k&gt;" in body and "&lt;v onclick=x&gt;" in body
    assert 'class="badge badge-cancelled"' in body
    assert "stop requested before it was claimed" in body
    assert "data-cancel" not in body  # a stopped item has nothing to cancel


async def test_unknown_items_and_bad_filters_are_clear_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"{DATA}/items/work_nope", headers=AUTH)
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found")
    bad = await client.get(f"{DATA}/items", params={"state": "lost"}, headers=AUTH)
    assert bad.status_code == 400 and "state must be one of" in bad.json()["error"]["message"]
    unknown = await client.get(f"{DATA}/items", params={"sort": "x"}, headers=AUTH)
    assert unknown.status_code == 400 and "sort" in unknown.json()["error"]["message"]


async def test_static_files_are_served_and_nothing_else(client: httpx.AsyncClient) -> None:
    script = await client.get("/dashboard/static/dashboard.js")
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    style = await client.get("/dashboard/static/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert (await client.get("/dashboard/static/..%2F_server.py")).status_code == 404
    other = await client.get("/dashboard/static/other.js")
    assert (other.status_code, other.json()["error"]["type"]) == (404, "not_found")


async def test_the_items_fragment_pages_newest_first_and_filters_by_text(
    client: httpx.AsyncClient,
) -> None:
    ids = []
    for index in range(PAGE_SIZE + 7):
        prompt = f"task {index}" + (" needle" if index % 10 == 3 else "")
        response = await client.post(f"{API}/work", json={"data": {"prompt": prompt}}, headers=AUTH)
        ids.append(response.json()["id"])
    first = (await client.get(f"{DATA}/items", headers=AUTH)).text
    assert f"{PAGE_SIZE + 7} items (all states)" in first and "page 1 of 2" in first
    assert ids[-1] in first and ids[7] in first and ids[6] not in first
    assert first.index(ids[-1]) < first.index(ids[-2])  # newest first
    second = (await client.get(f"{DATA}/items", params={"page": 2}, headers=AUTH)).text
    assert all(work_id in second for work_id in ids[:7]) and ids[7] not in second
    found = (await client.get(f"{DATA}/items", params={"q": "NEEDLE"}, headers=AUTH)).text
    assert "6 items (all states, matching “NEEDLE”)" in found
    assert ids[53] in found and ids[4] not in found
    none = (await client.get(f"{DATA}/items", params={"state": "active"}, headers=AUTH)).text
    assert "0 items (active)" in none and "No items match." in none


async def test_counting_and_windows_agree_with_a_full_listing(store: SQLiteStore) -> None:
    """The galloping count and the position windows match ``list_work`` read in full."""
    plane = EmbeddedControlPlane(store, threaded=False)
    for size in (0, 1, 2, 3, 5, 8, 17):
        while len(await plane.list_work(limit=1000)) < size:
            await plane.submit(f"p{size}")
        everything = list(await plane.list_work(limit=1000))
        assert await count_items(plane, None) == size
        assert await count_items(plane, WorkState.STOPPED) == 0
        for start, stop in [(0, size), (1, 4), (size - 3, size), (2, 2)]:
            window = await items_window(plane, None, start, stop)
            assert [i.id for i in window] == [i.id for i in everything[max(start, 0) : stop]]
        newest = await newest_items(plane, None, 4)
        assert [i.id for i in newest] == [i.id for i in reversed(everything)][:4]


# --- pure parts -----------------------------------------------------------------------------


def _item(
    state: WorkState,
    created: float,
    claimed: float | None = None,
    stopped: float | None = None,
    outcome: OutcomeStatus | None = None,
) -> WorkItem:
    return WorkItem(
        id=f"work_{created}",
        environment_id="default",
        state=state,
        data=SessionData(id=f"s{created}", prompt="p"),
        created_at=created,
        acknowledged_at=claimed,
        started_at=claimed,
        stopped_at=stopped,
        outcome=Outcome(outcome) if outcome is not None else None,
    )


def test_queue_depth_counts_items_from_creation_until_claimed() -> None:
    now = 10_000.0
    items = [
        _item(WorkState.QUEUED, now - 30 * 60),  # waiting for the last half hour
        _item(WorkState.ACTIVE, now - 50 * 60, claimed=now - 40 * 60),  # waited 10 minutes
        _item(WorkState.STOPPED, now - 7200, claimed=now - 7100, stopped=now - 7000),  # long ago
    ]
    series = depth_series(items, now)
    assert len(series) == 61
    assert series[0] == 0  # an hour ago
    assert series[10] == 1 and series[19] == 1 and series[20] == 0  # the claimed one
    assert series[30] == 1 and series[-1] == 1  # the one still waiting


def test_outcomes_fall_in_their_five_minute_bucket() -> None:
    now = 10_000.0
    items = [
        _item(WorkState.STOPPED, now - 100, now - 90, now - 10, OutcomeStatus.COMPLETED),
        _item(WorkState.STOPPED, now - 200, now - 190, now - 20, OutcomeStatus.FAILED),
        _item(WorkState.STOPPED, now - 3599, now - 3599, now - 3590, OutcomeStatus.CANCELLED),
        _item(WorkState.STOPPED, now - 9000, now - 9000, now - 8000, OutcomeStatus.FAILED),
    ]
    buckets = outcome_buckets(items, now)
    assert buckets[-1] == {"completed": 1, "failed": 1}
    assert buckets[0] == {"cancelled": 1}
    assert sum(sum(b.values()) for b in buckets) == 3


def test_the_element_builder_escapes_text_and_attributes_but_not_markup() -> None:
    built = h("a", {"href": '"><script>', "data_x": "<y>"}, "<b>", Markup("<i>ok</i>"))
    assert built == '<a href="&quot;&gt;&lt;script&gt;" data-x="&lt;y&gt;">&lt;b&gt;<i>ok</i></a>'


def test_the_tree_view_reads_a_malformed_snapshot_without_failing() -> None:
    assert "No supervision tree" in tree_view(None)
    drawn = tree_view(
        {"name": "<w>", "children": [{"id": "x", "state": "running"}, "junk", {"supervisor": 3}]}
    )
    assert "&lt;w&gt;" in drawn and "<code>x</code>" in drawn


async def test_a_presence_report_with_a_tree_is_drawn_on_the_worker_fragment(
    client: httpx.AsyncClient,
) -> None:
    tree = {
        "name": "worker",
        "strategy": "one_for_one",
        "running": True,
        "restarts_in_window": 0,
        "intensity": 3,
        "children": [{"id": "poller", "state": "running", "uptime": 3.5, "restart_count": 2}],
    }
    report = PresenceReport(worker_id="w1", runtime_metadata={"tree": tree, "capacity": 3})
    beat = await client.post(
        f"{API}/workers/w1/heartbeat",
        json={"runtime_metadata": dict(report.runtime_metadata)},
        headers=AUTH,
    )
    assert beat.status_code == 200
    body = (await client.get(f"{DATA}/workers/w1", headers=AUTH)).text
    assert "<strong>worker</strong>" in body and "<code>poller</code>" in body
    assert "2 restarts" in body and "up 3.5 s" in body


async def test_an_items_delegations_show_on_both_ends(client: httpx.AsyncClient) -> None:
    """The delegating item and the delegate item both list the delegation, escaped."""
    submitted = await client.post(f"{API}/work", json={"data": {"prompt": "lead"}}, headers=AUTH)
    source = submitted.json()
    polled = await client.get(f"{API}/work/poll", params={"worker_id": "w1"}, headers=AUTH)
    assert polled.json()["id"] == source["id"]
    acked = await client.post(
        f"{API}/work/{source['id']}/ack", json={"worker_id": "w1"}, headers=AUTH
    )
    assert acked.status_code == 200
    made = await client.post(
        f"{API}/sessions/{source['data']['id']}/delegate",
        json={"task": "check <the> tests"},
        headers=AUTH,
    )
    assert made.status_code == 201, made.text
    delegation = made.json()
    # The source's page finds it through the item's own worker, registered or not.
    body = (await client.get(f"{DATA}/items/{source['id']}", headers=AUTH)).text
    assert f"<code>{delegation['id']}</code>" in body
    # The delegate's page, through the registered workers (a real worker reports).
    beat = await client.post(f"{API}/workers/w1/heartbeat", json={}, headers=AUTH)
    assert beat.status_code == 200
    for work_id in (source["id"], delegation["work_id"]):
        body = (await client.get(f"{DATA}/items/{work_id}", headers=AUTH)).text
        assert f"<code>{delegation['id']}</code>" in body
        assert "check &lt;the&gt; tests" in body
    worker = (await client.get(f"{DATA}/workers/w1", headers=AUTH)).text
    assert f"<code>{delegation['id']}</code>" in worker


async def test_a_dead_letter_item_offers_retry_and_retrying_brings_it_back(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    """Dead letter shows a Retry button (no Cancel); after the retry the item can be cancelled."""
    now = time.time()
    item = store.submit("default", "fails", now=now, retry=RetryPolicy(max_attempts=1))
    assert store.poll("default", worker_id="w1", now=now) is not None
    store.ack("default", item.id, worker_id="w1", now=now)
    beat = store.heartbeat("default", item.id, expected_last_heartbeat=NO_HEARTBEAT, now=now)
    failed = Outcome(status=OutcomeStatus.FAILED, exit_code=1, reason="exit 1")
    dead = store.stop(
        "default",
        item.id,
        now=now,
        force=True,
        expected_last_heartbeat=beat.last_heartbeat,
        outcome=failed,
    )
    assert dead.dead
    for fragment in (f"items/{item.id}", "items"):
        body = (await client.get(f"{DATA}/{fragment}", headers=AUTH)).text
        assert f'data-retry="{item.id}"' in body and "data-cancel" not in body
    retried = await client.post(f"{API}/work/{item.id}/retry", headers=AUTH)
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    body = (await client.get(f"{DATA}/items/{item.id}", headers=AUTH)).text
    assert f'data-cancel="{item.id}"' in body and "data-retry" not in body
    script = (await client.get("/dashboard/static/dashboard.js")).text
    assert "button[data-retry]" in script and '"/retry"' in script


async def test_the_item_page_lists_every_attempt_with_its_outcome(
    client: httpx.AsyncClient, store: SQLiteStore
) -> None:
    """A retried item's page shows each ended attempt: outcome, exit code, reason, worker."""
    now = time.time()
    item = store.submit("default", "flaky", now=now, retry=RetryPolicy(max_attempts=3))
    assert store.poll("default", worker_id="w1", now=now) is not None
    store.ack("default", item.id, worker_id="w1", now=now)
    beat = store.heartbeat("default", item.id, expected_last_heartbeat=NO_HEARTBEAT, now=now)
    requeued = store.stop(
        "default",
        item.id,
        now=now,
        force=True,
        expected_last_heartbeat=beat.last_heartbeat,
        outcome=Outcome(status=OutcomeStatus.FAILED, exit_code=7, reason="<exit> 7"),
    )
    assert requeued.state == "queued" and len(requeued.history) == 1
    body = (await client.get(f"{DATA}/items/{item.id}", headers=AUTH)).text
    attempts = body[body.index("Attempts</caption>") :]
    assert 'class="badge badge-failed"' in attempts and ">7<" in attempts
    assert "&lt;exit&gt; 7" in attempts and ">w1<" in attempts
    fresh = store.submit("default", "new", now=now)
    body = (await client.get(f"{DATA}/items/{fresh.id}", headers=AUTH)).text
    assert "No attempt has ended yet." in body
