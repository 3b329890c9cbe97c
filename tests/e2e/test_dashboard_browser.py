"""The dashboard in a real headless Chromium, against real ``serve`` and ``run`` processes.

Driven by Playwright's sync API with the system's Chromium (Debian's ``chromium``
package; ``.ci/run`` installs it). These are plain (non-Trio) tests: Playwright's
sync API runs its own event loop, and the servers are subprocesses anyway.

Each test saves screenshots under ``$SUPERVISOR_SCREENSHOTS`` (default
``tests-artifacts/screenshots/`` in the repository) for a person to look at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "tests" / "agents"
KEY = "dashboard-test-key-0123456789abcdef"
SCREENSHOTS = Path(
    os.environ.get("SUPERVISOR_SCREENSHOTS") or REPO / "tests-artifacts" / "screenshots"
)
CHROMIUM = os.environ.get("SUPERVISOR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
#: Longest wait for anything the page should show (it polls every 2 s).
WAIT_MS = 20_000


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[browser]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


_MISSING = _browser_missing()
if _MISSING is not None:
    # One line for the whole module where no browser can be installed; never under CI.
    if os.environ.get("CI") == "true":
        pytest.fail(f"the dashboard's browser tests cannot run under CI: {_MISSING}", pytrace=False)
    pytest.skip(f"no headless browser here: {_MISSING}", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["SUPERVISOR_ENVIRONMENT_KEY"] = KEY
    env.update(extra)
    return env


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process, always terminated and reaped, its stderr kept in ``log``."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _first_line(process: subprocess.Popen[str], log: Path, timeout: float = 30) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()  # serve prints its URL first thing once listening
    if not line or time.monotonic() > deadline:
        pytest.fail(f"the server did not start: {log.read_text()}")
    return line.strip()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m supervisor serve --port 0`` with the test key; yields its URL and process."""
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "supervisor", "serve", "--port", "0"]
    argv += ["--state-dir", str(tmp_path / "serve")]
    with _process(argv, _env(), log) as process:
        url = _first_line(process, log)
        assert url.startswith("http://127.0.0.1:")
        yield url, process


@pytest.fixture
def api(server: tuple[str, subprocess.Popen[str]]) -> Iterator[httpx.Client]:
    """The API as the CLI uses it: the same key, the default environment."""
    url, _ = server
    with httpx.Client(
        base_url=f"{url}/v1/environments/default",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ) as client:
        yield client


def _submit(api: httpx.Client, prompt: str, **metadata: str) -> str:
    response = api.post(
        "/work", json={"data": {"type": "session", "prompt": prompt}, "metadata": metadata}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    dialogs: list[str] = []

    def answer(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    opened.on("dialog", answer)
    opened.dialogs = dialogs
    # Script errors and refused inline content (the CSP) show up on the console.
    errors: list[str] = []
    opened.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.console_errors = errors
    try:
        yield opened
    finally:
        context.close()


def _assert_no_script_errors(page: Any) -> None:
    """Nothing but failed loads (a refused key, a stopped server) on the console."""
    assert [e for e in page.console_errors if "Failed to load resource" not in e] == []


def _sign_in(page: Any, url: str, key: str = KEY, path: str = "/") -> None:
    page.goto(url + path)
    page.get_by_label("Environment key").fill(key)
    page.get_by_role("button", name="Sign in").click()


# --- the tests ------------------------------------------------------------------------------


def test_without_the_key_there_is_only_a_sign_in_prompt_and_a_wrong_key_is_refused(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client
) -> None:
    url, _ = server
    _submit(api, "secret plans for the quarter")
    page.goto(url + "/")
    sign_in = page.get_by_role("heading", name="Sign in")
    sign_in.wait_for()
    assert page.locator("#main").is_hidden()
    assert "secret plans" not in page.content()
    _shot(page, "01-sign-in")

    _sign_in(page, url, key="not-the-key")
    error = page.locator("#sign-in-error")
    error.wait_for()
    assert "refused" in error.inner_text()
    assert page.locator("#main").is_hidden()
    assert "secret plans" not in page.content()
    assert page.locator("#key").input_value() == ""  # a refused key is not kept in the form
    assert "not-the-key" not in page.url
    assert page.evaluate("sessionStorage.length") == 0
    _shot(page, "02-wrong-key")

    # The fragments themselves refuse a request without the key: no data, a JSON 401.
    raw = httpx.get(f"{url}/dashboard/data/default/items", timeout=10)
    assert raw.status_code == 401
    assert "secret plans" not in raw.text
    _assert_no_script_errors(page)


def test_signed_in_a_submitted_item_appears_without_reloading_and_its_prompt_is_text(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client
) -> None:
    url, _ = server
    # Signing in by keyboard alone: the key field has the focus, Enter submits.
    page.goto(url + "/dashboard/items")
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("document.activeElement.id") == "key"
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Items").wait_for()
    page.get_by_text("No items match.").wait_for()
    assert KEY not in page.url
    page.evaluate("window.__loaded_once = true")  # survives only if the page never reloads

    work_id = _submit(api, XSS, owner="<b>ops</b>")
    row = page.locator("tr", has=page.get_by_role("link", name=work_id))
    row.wait_for()
    assert page.evaluate("window.__loaded_once") is True
    assert XSS in row.inner_text()  # shown as text, not run
    assert page.evaluate("window.__pwned") is None
    assert page.dialogs == []
    _shot(page, "03-items")

    # A refresh that changes the table keeps the keyboard focus where it was.
    page.get_by_role("button", name=f"Cancel {work_id}").focus()
    other = _submit(api, "another one")
    page.get_by_role("link", name=other).wait_for()
    assert page.evaluate("document.activeElement.id") == f"cancel-{work_id}"

    page.get_by_role("link", name=work_id).click()
    page.get_by_role("heading", name=f"Item {work_id}").wait_for()
    page.locator("pre.prompt-full").wait_for()
    assert page.locator("pre.prompt-full").inner_text() == XSS
    assert "<b>ops</b>" in page.locator("table", has_text="Metadata").inner_text()
    assert page.evaluate("window.__pwned") is None
    _shot(page, "04-item-queued")
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(url + "/dashboard/items")
    page.get_by_role("link", name=work_id).wait_for()
    _shot(page, "04b-items-phone")
    page.set_viewport_size({"width": 1280, "height": 800})

    # Filter by text and state: the item is found by a word of its prompt, not by another.
    page.goto(url + "/dashboard/items?q=pwned&state=queued")
    page.get_by_role("link", name=work_id).wait_for()
    page.goto(url + "/dashboard/items?q=nothing-like-it")
    page.get_by_text("No items match.").wait_for()

    # Signing out forgets the key and takes the data off the page.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert KEY not in page.evaluate("Object.values(sessionStorage)")
    assert page.locator("#live").inner_html() == ""
    page.goto(url + "/dashboard/items")
    page.get_by_role("heading", name="Sign in").wait_for()
    assert "another one" not in page.content()
    _assert_no_script_errors(page)


def test_the_cancel_button_stops_a_running_item_and_the_page_shows_it(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client, tmp_path: Path
) -> None:
    url, _ = server
    agent = f"{sys.executable} {AGENTS / 'slow_ok.py'} {{prompt}}"
    argv = [sys.executable, "-m", "supervisor", "run", "--control-plane", url]
    argv += ["--state-dir", str(tmp_path / "worker"), "--agent", agent, "--api-port", "0"]
    argv += ["--max-concurrency", "2", "--drain-timeout", "1", "--lease-ttl", "6"]
    env = _env(SUPERVISOR_PRESENCE_INTERVAL="1")
    with _process(argv, env, tmp_path / "worker.log"):
        work_id = _submit(api, "120")  # slow_ok.py sleeps this many seconds
        _wait_for(lambda: api.get(f"/work/{work_id}").json()["state"] == "active", "active")

        _sign_in(page, url, path=f"/dashboard/items/{work_id}")
        state = page.locator("dl.facts .badge").first
        page.locator("dl.facts .badge", has_text="active").wait_for()
        _shot(page, "05-item-active")

        # The worker's page while it runs the session: the session in its supervision tree.
        worker_id = api.get(f"/work/{work_id}").json()["worker_id"]
        page.get_by_role("link", name=worker_id).click()
        page.get_by_role("heading", name=f"Worker {worker_id}").wait_for()
        page.locator("ul.tree", has_text=work_id).wait_for()
        assert page.locator("dl.facts .badge", has_text="online").count() == 1
        session_link = page.get_by_role("table", name="Sessions on this worker").get_by_role(
            "link", name=work_id
        )
        session_link.wait_for()
        _shot(page, "06-worker-busy")

        session_link.click()
        page.locator("dl.facts .badge", has_text="active").wait_for()
        page.get_by_role("button", name=f"Cancel {work_id}").click()
        page.locator("#notice", has_text="Stop requested").wait_for()
        page.locator("dl.facts .badge", has_text="stopped").wait_for()
        assert state.inner_text() == "stopped"
        page.locator(".badge", has_text="cancelled").first.wait_for()
        assert page.dialogs and work_id in page.dialogs[0]
        item = api.get(f"/work/{work_id}").json()
        assert item["state"] == "stopped"
        assert item["outcome"]["status"] == "cancelled"
        _shot(page, "07-item-cancelled")

        page.goto(url + "/")
        page.get_by_role("img", name="Session outcomes over the last hour: 1 cancelled.").wait_for()
        _shot(page, "08-overview")
        page.goto(url + "/dashboard/queue")
        page.get_by_role("table", name="Items by state").wait_for()
        _shot(page, "09-queue")

        # The worker's own page, on its local API: no key, its sessions and its tree.
        api_file = tmp_path / "worker" / "api.json"
        _wait_for(api_file.exists, "the worker's api.json")
        local = json.loads(api_file.read_text())["url"]
        page.goto(local + "/")
        page.get_by_role("heading", name="This worker").wait_for()
        page.locator("ul.tree").wait_for()
        page.get_by_role(
            "table", name="Sessions (running first, then the latest ended)"
        ).get_by_text(work_id).wait_for()
        _shot(page, "10-worker-local")
        _assert_no_script_errors(page)


def test_a_wedged_worker_shows_degraded_and_its_reason(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client
) -> None:
    url, _ = server
    reason = "no output for 300 s; last line 'Waiting for <input>'"
    response = api.post(
        "/workers/w-wedged/heartbeat",
        json={
            "status": "busy",
            "runtime_state": "wedged",
            "sample_error": reason,
            "active_tasks": 1,
            "runtime_metadata": {"capacity": 4, "labels": ["gpu", "repo:foo"]},
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "degraded"
    api.post(
        "/workers/w-fine/heartbeat", json={"status": "idle", "runtime_metadata": {"capacity": 2}}
    )

    _sign_in(page, url, path="/dashboard/workers")
    row = page.locator("tr", has=page.get_by_role("link", name="w-wedged"))
    row.wait_for()
    assert "degraded" in row.locator(".badge").first.inner_text()
    assert f"wedged: {reason}" in row.inner_text()
    assert "gpu" in row.inner_text() and "1/4" in row.inner_text()
    healthy = page.locator("tr", has=page.get_by_role("link", name="w-fine"))
    assert "online" in healthy.inner_text()
    _shot(page, "11-workers-wedged")

    page.set_viewport_size({"width": 390, "height": 844})
    row.wait_for()
    _shot(page, "12-workers-phone")

    for prompt in ("first in line", "second", "third"):
        _submit(api, prompt)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_role("link", name="Queue").click()
    page.get_by_role("img", name="Queue depth over the last hour: now 3, peak 3.").wait_for()
    page.get_by_role("table", name="Oldest queued items").get_by_text("first in line").wait_for()
    _shot(page, "09b-queue-waiting")
    _assert_no_script_errors(page)


def test_the_page_says_when_the_connection_is_lost(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client
) -> None:
    url, process = server
    _submit(api, "still here")
    _sign_in(page, url, path="/dashboard/items")
    page.get_by_text("still here").wait_for()
    page.locator("#connection", has_text="live").wait_for()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)
    lost = page.locator("#connection", has_text="Connection lost")
    lost.wait_for()
    assert page.get_by_text("still here").is_visible()  # the last data stays, marked stale
    _shot(page, "13-connection-lost")


def test_the_retry_button_brings_a_dead_letter_item_back(
    page: Any, server: tuple[str, subprocess.Popen[str]], api: httpx.Client
) -> None:
    url, _ = server
    response = api.post(
        "/work",
        json={"data": {"type": "session", "prompt": "fails once"}, "retry": {"max_attempts": 1}},
    )
    assert response.status_code == 201, response.text
    work_id = str(response.json()["id"])
    # One attempt, failed, as a worker would report it: the item lands in dead letter.
    assert api.get("/work/poll", params={"worker_id": "w-dead"}).json()["id"] == work_id
    assert api.post(f"/work/{work_id}/ack", json={"worker_id": "w-dead"}).status_code == 200
    beat = api.post(
        f"/work/{work_id}/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"}
    ).json()
    stopped = api.post(
        f"/work/{work_id}/stop",
        json={
            "force": True,
            "expected_last_heartbeat": beat["last_heartbeat"],
            "outcome": {"status": "failed", "exit_code": 1, "reason": "exit 1"},
        },
    ).json()
    assert stopped["state"] == "stopped" and stopped["dead"] is True

    _sign_in(page, url, path=f"/dashboard/items/{work_id}")
    page.locator("dl.facts .badge", has_text="stopped").wait_for()
    assert page.get_by_role("button", name=f"Cancel {work_id}").count() == 0
    page.get_by_role("button", name=f"Retry {work_id}").click()
    page.locator("#notice", has_text="Queued again").wait_for()
    page.locator("dl.facts .badge", has_text="queued").wait_for()
    assert any(work_id in text and "Retry" in text for text in page.dialogs)
    item = api.get(f"/work/{work_id}").json()
    assert item["state"] == "queued" and not item["dead"]
    _shot(page, "14-item-retried")
    _assert_no_script_errors(page)
