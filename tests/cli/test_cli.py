"""``python -m supervisor`` as an operator meets it: real processes, real signals, real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from supervisor._worker._process import process_group_members

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "tests" / "agents"
KEY = "cli-key-0123456789abcdef-never-logged"


def agent(name: str, *args: str) -> str:
    return " ".join([sys.executable, str(AGENTS / f"{name}.py"), *args])


def cli_env(**extra: str) -> dict[str, str]:
    """The parent's environment without SUPERVISOR_* settings, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one command to completion; stdout and stderr as text."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [sys.executable, "-m", "supervisor", *args],
            cwd=cwd,
            env=env or cli_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def submit(cwd: Path, prompt: str, *flags: str, env: dict[str, str] | None = None) -> str:
    done = await cli("submit", prompt, *flags, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    item_id = done.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_]+", item_id), done.stdout
    return item_id


async def status_json(cwd: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    done = await cli("status", "--json", *flags, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def wait_status(
    cwd: Path,
    until: Callable[[Any], bool],
    *flags: str,
    env: dict[str, str] | None = None,
    timeout: float = 40,
) -> Any:
    with trio.fail_after(timeout):
        while True:
            document = await status_json(cwd, *flags, env=env)
            if until(document):
                return document
            await trio.sleep(0.3)


def items_by_id(document: Any) -> dict[str, Any]:
    return {item["id"]: item for item in document["items"]}


def outcome_of(document: Any, item_id: str) -> str | None:
    item = items_by_id(document).get(item_id)
    return item["outcome"]["status"] if item and item["outcome"] else None


@attrs.define
class RunningProcess:
    process: trio.Process
    stderr_path: Path
    first_output: str

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def exit_code(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


async def read_until(process: trio.Process, marker: str, timeout: float = 30) -> str:
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(timeout):
        while marker.encode() not in buffer:
            chunk = await process.stdout.receive_some()
            if not chunk:
                break
            buffer += chunk
    return buffer.decode(errors="replace")


@asynccontextmanager
async def running(
    cwd: Path, *args: str, marker: str, env: dict[str, str] | None = None
) -> AsyncIterator[RunningProcess]:
    """Start a long-running command, wait for ``marker`` on its stdout; always reap it."""
    stderr_path = cwd / f"stderr-{len(list(cwd.glob('stderr-*')))}.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "supervisor", *args],
            cwd=cwd,
            env=env or cli_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        output = await read_until(process, marker)
        if marker not in output:
            await process.wait()
            pytest.fail(f"no {marker!r} on stdout: {output}\n{stderr_path.read_text()}")
        yield RunningProcess(process, stderr_path, output)
    finally:
        with trio.CancelScope(shield=True):
            # Twice SIGTERM (drain, then cancel) so its agents are stopped, then SIGKILL.
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if process.returncode is not None:
                    break
                process.send_signal(sig)
                with trio.move_on_after(10):
                    await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def running_worker(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return running(cwd, *args, marker="Stop with Ctrl-C", env=env)


STUBBORN_AGENT = """\
import os, subprocess, sys, time
# A grandchild in the agent's process group ignores SIGTERM, then reports the group:
# only a SIGKILL of the whole group ends it.
GRANDCHILD = (
    "import os, signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "path = sys.argv[1]\\n"
    "open(path + '.tmp', 'w').write(str(os.getpgrp()))\\n"
    "os.replace(path + '.tmp', path)\\n"
    "time.sleep(3600)\\n"
)
subprocess.Popen([sys.executable, "-c", GRANDCHILD, sys.argv[1]])
time.sleep(3600)
"""


def stubborn_agent(tmp_path: Path) -> str:
    """An agent command whose process group is written to ``tmp_path/groups/<work id>``."""
    script = tmp_path / "stubborn_agent.py"
    script.write_text(STUBBORN_AGENT)
    (tmp_path / "groups").mkdir(exist_ok=True)
    return f"{sys.executable} {script} {tmp_path / 'groups'}/{{work_id}}"


async def group_of(tmp_path: Path, item_id: str, timeout: float = 20) -> int:
    """The process group of the item's agent, once its stubborn grandchild is in place."""
    path = tmp_path / "groups" / item_id
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.05)
    return int(path.read_text())


async def wait_group_gone(pgid: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while True:
            members = process_group_members(pgid)
            if not [pid for pid, state in members or [] if state != "Z"]:
                return
            await trio.sleep(0.05)


# --- the zero-configuration path -------------------------------------------------------


async def test_zero_config_worker_runs_submitted_work_and_status_shows_it(tmp_path: Path) -> None:
    """No arguments at all: ./.supervisor, the demo agent, the API; work from other processes."""
    async with running_worker(tmp_path) as worker:
        banner = worker.first_output
        assert f"embedded control plane in {tmp_path / '.supervisor'}" in banner
        assert "the built-in demo agent" in banner
        assert re.search(r"local API:\s+http://127\.0\.0\.1:\d+", banner)
        assert 'python -m supervisor submit "describe this repository"' in banner
        ids: list[str] = []

        async def one(n: int) -> None:
            ids.append(await submit(tmp_path, f"task number {n}"))

        async with trio.open_nursery() as nursery:  # four processes submitting at once
            for n in range(4):
                nursery.start_soon(one, n)
        document = await wait_status(
            tmp_path, lambda d: all(outcome_of(d, i) == "completed" for i in ids)
        )
        assert document["worker"] is not None
        tree = document["worker"]["tree"]
        assert [c["id"] for c in tree["children"]] == ["services", "work"]
        for item_id in ids:
            item = items_by_id(document)[item_id]
            assert item["state"] == "stopped"
            assert "task number" in item["outcome"]["result"]
        drawn = await cli("status", cwd=tmp_path)
        assert drawn.returncode == 0
        for word in ("worker", "services", "api", "work", "sessions", "poller", *ids):
            assert word in drawn.stdout
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.exit_code(20) == 0
    assert not (tmp_path / ".supervisor" / "api.json").exists()
    assert "stopped; sessions by outcome: 4 completed" in worker.stderr


async def test_status_without_a_worker_says_so_and_prints_json_for_scripts(
    tmp_path: Path,
) -> None:
    first = await cli("status", cwd=tmp_path)
    assert first.returncode == 0
    assert "no worker runs here" in " ".join(first.stdout.split())
    assert not (tmp_path / ".supervisor").exists()  # looking creates nothing
    item_id = await submit(tmp_path, "waits for a worker")
    document = await status_json(tmp_path)
    assert document["worker"] is None
    assert document["queue"]["depth"] == 1
    (item,) = document["items"]
    assert (item["id"], item["state"], item["outcome"]) == (item_id, "queued", None)
    cancelled = await cli("cancel", item_id, cwd=tmp_path)
    assert cancelled.returncode == 0
    assert "stopped" in cancelled.stdout
    document = await status_json(tmp_path)
    assert outcome_of(document, item_id) == "cancelled"


async def test_one_shot_commands_reject_bad_usage_with_exit_2(tmp_path: Path) -> None:
    await submit(tmp_path, "exists")
    unknown = await cli("cancel", "work_nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "work_nope" in unknown.stderr
    metadata = await cli("submit", "x", "--metadata", "novalue", cwd=tmp_path)
    assert metadata.returncode == 2 and "KEY=VALUE" in metadata.stderr
    empty = await cli("submit", "  ", cwd=tmp_path)
    assert empty.returncode == 2 and "empty" in empty.stderr
    limit = await cli("status", "--limit", "0", cwd=tmp_path)
    assert limit.returncode == 2 and "--limit" in limit.stderr


# --- stopping work ---------------------------------------------------------------------


async def test_cancel_stops_a_hanging_agent_and_its_whole_process_group(tmp_path: Path) -> None:
    flags = ("--agent", stubborn_agent(tmp_path), "--lease-ttl", "3", "--agent-grace", "0.5")
    async with running_worker(tmp_path, *flags) as worker:
        item_id = await submit(tmp_path, "never ends")
        pgid = await group_of(tmp_path, item_id)
        done = await cli("cancel", item_id, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "stopping" in done.stdout
        await wait_status(tmp_path, lambda d: outcome_of(d, item_id) == "cancelled")
        await wait_group_gone(pgid)  # the grandchild ignored SIGTERM: SIGKILL took it
        again = await cli("cancel", item_id, cwd=tmp_path)
        assert again.returncode == 0 and "already stopped" in again.stdout
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.exit_code(20) == 0


async def test_sigterm_lets_a_running_session_finish_then_exits_0(tmp_path: Path) -> None:
    flags = ("--agent", agent("slow_ok", "2"), "--drain-timeout", "30")
    async with running_worker(tmp_path, *flags) as worker:
        item_id = await submit(tmp_path, "finish me")
        await wait_status(tmp_path, lambda d: items_by_id(d)[item_id]["state"] == "active")
        worker.process.send_signal(signal.SIGTERM)
        late_id = await submit(tmp_path, "not claimed while draining")
        assert await worker.exit_code(30) == 0
    assert "SIGTERM: draining" in worker.stderr
    document = await status_json(tmp_path)
    assert outcome_of(document, item_id) == "completed"
    assert items_by_id(document)[late_id]["state"] == "queued"


async def test_drain_timeout_cancels_the_rest_and_records_their_outcomes(tmp_path: Path) -> None:
    flags = ("--agent", stubborn_agent(tmp_path), "--drain-timeout", "0.5", "--agent-grace", "0.5")
    async with running_worker(tmp_path, *flags, "--max-concurrency", "2") as worker:
        ids = [await submit(tmp_path, f"hang {n}") for n in range(2)]
        groups = [await group_of(tmp_path, i) for i in ids]
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.exit_code(20) == 0
    document = await status_json(tmp_path)
    assert [outcome_of(document, i) for i in ids] == ["cancelled", "cancelled"]
    for pgid in groups:
        await wait_group_gone(pgid)


async def test_a_second_sigint_cancels_at_once(tmp_path: Path) -> None:
    flags = ("--agent", stubborn_agent(tmp_path), "--drain-timeout", "120", "--agent-grace", "0.5")
    async with running_worker(tmp_path, *flags) as worker:
        item_id = await submit(tmp_path, "hang")
        pgid = await group_of(tmp_path, item_id)
        worker.process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            while "draining" not in worker.stderr:
                await trio.sleep(0.05)
        started = trio.current_time()
        worker.process.send_signal(signal.SIGINT)
        assert await worker.exit_code(15) == 0
        assert trio.current_time() - started < 10  # nowhere near the 120 s drain
    assert "cancelling running sessions now" in worker.stderr
    assert outcome_of(await status_json(tmp_path), item_id) == "cancelled"
    await wait_group_gone(pgid)


# --- configuration errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "environ", "needle"),
    [
        (["--max-concurrency", "0"], {}, "max_concurrency"),
        ([], {"SUPERVISOR_LEASE_TTL": "soon"}, "SUPERVISOR_LEASE_TTL"),
        ([], {"SUPERVISOR_MAX_CONCURENCY": "3"}, "SUPERVISOR_MAX_CONCURENCY"),
        (["--config", "settings.toml"], {}, "max_concurency"),
        ([], {"SUPERVISOR_CONFIG": "absent.toml"}, "absent.toml"),
        (["--workspace", "git"], {}, "base_repo"),
        (["--no-such-flag"], {}, "--no-such-flag"),
        (["status", "--limit", "x"], {}, "--limit"),
        (["submit", "x"], {"SUPERVISOR_API_PORT": "http"}, "SUPERVISOR_API_PORT"),
    ],
)
async def test_bad_configuration_exits_2_naming_the_key(
    tmp_path: Path, args: list[str], environ: dict[str, str], needle: str
) -> None:
    (tmp_path / "settings.toml").write_text("max_concurency = 3\n")
    done = await cli(*args, cwd=tmp_path, env=cli_env(**environ))
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".supervisor").exists()  # nothing was started or created


async def test_a_port_already_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = await cli("--api-port", str(port), cwd=tmp_path)
    assert done.returncode == 2
    assert f"api_port: port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".supervisor").exists()


# --- the local API of a real worker ----------------------------------------------------


async def test_health_and_metrics_of_a_running_worker(tmp_path: Path) -> None:
    async with running_worker(tmp_path, "--agent", agent("ok", "{prompt}")) as worker:
        item_id = await submit(tmp_path, "measure me")
        await wait_status(tmp_path, lambda d: outcome_of(d, item_id) == "completed")
        api = json.loads((tmp_path / ".supervisor" / "api.json").read_text())
        assert api["pid"] == worker.process.pid
        async with httpx.AsyncClient(base_url=api["url"], timeout=10) as client:
            health = await client.get("/health")
            metrics = await client.get("/metrics")
    assert health.status_code == 200
    body = health.json()
    assert {k: body[k] for k in ("status", "busy", "active", "queued", "capacity", "wedged")} == {
        "status": "ok",
        "busy": False,
        "active": 0,
        "queued": 0,
        "capacity": 4,
        "wedged": False,
    }
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    completed = [
        s.value
        for s in families["supervisor_sessions"].samples
        if s.labels == {"outcome": "completed"}
    ]
    assert completed == [1.0]
    for name in (
        "supervisor_sessions_active",
        "supervisor_restarts",
        "supervisor_lease_losses",
        "supervisor_heartbeat_latency_seconds",
        "supervisor_wedged",
    ):
        assert name in families, name


# --- a shared control plane ------------------------------------------------------------


async def test_serve_and_a_remote_worker_complete_work_and_never_log_the_key(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    env = cli_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(key_file))
    server_dir, worker_dir = tmp_path / "cp", tmp_path / "w"
    server_dir.mkdir()
    worker_dir.mkdir()
    async with running(
        server_dir, "serve", "--port", "0", "--state-dir", str(server_dir), marker="\n", env=env
    ) as server:
        url = server.first_output.strip()
        assert url.startswith("http://127.0.0.1:")
        flags = ("--control-plane", url)
        async with running_worker(
            worker_dir, *flags, "--agent", agent("ok", "{prompt}"), "--log-format", "json", env=env
        ) as worker:
            ids = [await submit(tmp_path, f"remote {n}", *flags, env=env) for n in range(3)]
            document = await wait_status(
                worker_dir,
                lambda d: all(outcome_of(d, i) == "completed" for i in ids),
                *flags,
                env=env,
            )
            assert document["worker"]["control_plane"] == url
            worker.process.send_signal(signal.SIGTERM)
            assert await worker.exit_code(20) == 0
        server.process.send_signal(signal.SIGTERM)
        assert await server.exit_code(20) == 0
    for line in worker.stderr.splitlines():
        assert json.loads(line)["level"] in ("debug", "info", "warning", "error")
    assert KEY not in worker.stderr + server.stderr + worker.first_output


async def test_a_refused_key_makes_the_supervisor_give_up_with_exit_1(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(KEY)
    bad.write_text("not-the-key-0123456789")
    server_env = cli_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(good))
    async with running(
        tmp_path, "serve", "--port", "0", "--state-dir", str(tmp_path / "cp"),
        marker="\n", env=server_env,
    ) as server:  # fmt: skip
        url = server.first_output.strip()
        done = await cli(
            "--control-plane", url, "--state-dir", str(tmp_path / "w"),
            cwd=tmp_path, env=cli_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(bad)), timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "gave up" in done.stderr
    assert "not-the-key" not in done.stderr


async def test_help_and_version(tmp_path: Path) -> None:
    top = await cli("--help", cwd=tmp_path)
    assert top.returncode == 0
    for command in ("run", "submit", "status", "cancel", "serve", "demo"):
        assert command in top.stdout
    prose = " ".join(top.stdout.split())
    assert "exit codes: 0 clean stop, 1 the supervisor gave up, 2 bad usage" in prose
    run_help = await cli("run", "--help", cwd=tmp_path)
    assert "--drain-timeout" in run_help.stdout and "SIGTERM" in run_help.stdout
    version = await cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("python -m supervisor ")


async def test_status_recognises_the_api_file_of_a_killed_worker(tmp_path: Path) -> None:
    """SIGKILL leaves api.json behind; status must not pretend the worker still runs."""
    gone = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    await gone.wait()
    state = tmp_path / ".supervisor"
    state.mkdir()
    (state / "api.json").write_text(
        json.dumps(
            {"url": "http://127.0.0.1:9", "pid": gone.pid, "worker_id": "w", "started_at": 0}
        )
    )
    document = await status_json(tmp_path)
    assert document["worker"] is None
    assert f"names process {gone.pid}, which has exited" in document["worker_note"]


async def test_status_json_still_works_after_poisoned_requests(tmp_path: Path) -> None:
    """Lone surrogates refused at the door (400); `status --json` lists the items as before.

    Also for a store an older version poisoned: the answer carries U+FFFD
    rather than failing every listing from then on.
    """
    from supervisor.controlplane._embedded import STORE_FILENAME

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    env = cli_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(key_file))
    server_dir = tmp_path / "cp"
    server_dir.mkdir()
    async with running(
        server_dir, "serve", "--port", "0", "--state-dir", str(server_dir), marker="\n", env=env
    ) as server:
        url = server.first_output.strip()
        flags = ("--control-plane", url)
        good = await submit(tmp_path, "fine", *flags, env=env)
        async with httpx.AsyncClient(
            base_url=f"{url}/v1/environments/default",
            headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
        ) as client:
            for path, body in (
                ("/work", b'{"data": {"prompt": "p"}, "metadata": {"k": "\\udfff"}}'),
                ("/workers/w1/heartbeat", b'{"runtime_metadata": {"v": "\\ud800"}}'),
            ):
                response = await client.post(path, content=body)
                assert response.status_code == 400, response.text
        document = await status_json(tmp_path, *flags, env=env)
        assert list(items_by_id(document)) == [good]
        with sqlite3.connect(server_dir / STORE_FILENAME) as conn:
            conn.execute("UPDATE work_items SET metadata = ?", ('{"k": "\\udfff"}',))
        document = await status_json(tmp_path, *flags, env=env)
        assert items_by_id(document)[good]["metadata"] == {"k": "\ufffd"}


# --- work policies: submit's retry flags, status --dead, retry ---------------------------


async def dead_letter(cwd: Path) -> list[dict[str, object]]:
    done = await cli("status", "--dead", "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    dead: list[dict[str, object]] = json.loads(done.stdout)["dead"]
    return dead


@pytest.mark.slow
async def test_a_failing_item_lands_in_dead_letter_and_the_retry_command_brings_it_back(
    tmp_path: Path,
) -> None:
    async with running_worker(tmp_path, "--agent", agent("crash")):
        item_id = await submit(tmp_path, "always fails", "--max-attempts", "2", "--backoff", "0.1")
        fine = await submit(tmp_path, "fails once, no retry")
        await wait_status(
            tmp_path,
            lambda d: all(
                items_by_id(d).get(i, {}).get("state") == "stopped" for i in (item_id, fine)
            ),
        )
        dead = await dead_letter(tmp_path)
        assert [entry["id"] for entry in dead] == [item_id]
        (entry,) = dead
        assert entry["dead"] is True and entry["attempts"] == 2
        assert [h["status"] for h in entry["history"]] == ["failed", "failed"]  # type: ignore[attr-defined]
        drawn = await cli("status", "--dead", cwd=tmp_path)
        assert drawn.returncode == 0
        assert item_id in drawn.stdout and "exit 3" in drawn.stdout
        assert "retry ID" in drawn.stdout
        back = await cli("retry", item_id, cwd=tmp_path)
        assert back.returncode == 0, back.stderr
        assert f"{item_id}: queued again with fresh attempts" in back.stdout
        document = await wait_status(
            tmp_path,
            lambda d: (
                len(items_by_id(d)[item_id]["history"]) == 4
                and items_by_id(d)[item_id]["state"] == "stopped"
            ),
        )
        assert items_by_id(document)[item_id]["dead"] is True
        # A live item cannot be retried: a clear error, exit 2.
        live = await cli("retry", "work_nope", cwd=tmp_path)
        assert live.returncode != 0 and "work_nope" in live.stderr


async def test_a_bad_retry_flag_is_refused_with_exit_2_and_queues_nothing(tmp_path: Path) -> None:
    done = await cli("submit", "x", "--max-attempts", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "max_attempts" in done.stderr
    done = await cli("submit", "x", "--no-retry-exit-code", "999", cwd=tmp_path)
    assert done.returncode == 2
    assert "non_retryable_exit_codes" in done.stderr
    empty = await cli("status", "--dead", cwd=tmp_path)
    assert empty.returncode == 0 and "dead letter: empty" in empty.stdout


async def test_submit_takes_a_priority_and_a_delay_or_a_time_and_refuses_bad_ones(
    tmp_path: Path,
) -> None:
    before = time.time()
    urgent = await submit(tmp_path, "urgent", "--priority", "7", "--delay", "600")
    timed = await submit(tmp_path, "at a time", "--not-before", "2030-01-01T09:00:00Z")
    items = items_by_id(await status_json(tmp_path))
    assert items[urgent]["priority"] == 7
    assert before + 600 <= items[urgent]["not_before"] <= time.time() + 600
    assert items[timed]["not_before"] == 1893488400.0
    for flags, word in (
        (("--priority", "5000"), "priority"),
        (("--delay", "-1"), "delay"),
        (("--not-before", "tomorrow"), "--not-before"),
        (("--delay", "5", "--not-before", "2030-01-01T09:00:00Z"), "not allowed with"),
    ):
        done = await cli("submit", "x", *flags, cwd=tmp_path)
        assert done.returncode == 2, flags
        assert word in done.stderr, (flags, done.stderr)
    assert len((await status_json(tmp_path))["items"]) == 2


async def test_a_duplicate_key_returns_the_same_id_from_the_cli(tmp_path: Path) -> None:
    first = await cli("submit", "deploy 42", "--key", "deploy-42", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    item_id = first.stdout.strip()
    again = await cli("submit", "deploy 42 again", "--key", "deploy-42", cwd=tmp_path)
    assert again.returncode == 0
    assert again.stdout.strip() == item_id
    assert "already used" in again.stderr and "nothing queued" in again.stderr
    other = await submit(tmp_path, "deploy 43", "--key", "deploy-43")
    assert other != item_id
    assert len((await status_json(tmp_path))["items"]) == 2
    bad = await cli("submit", "x", "--key", "", cwd=tmp_path)
    assert bad.returncode == 2 and "key" in bad.stderr


# --- routing labels and timeouts ------------------------------------------------------------


async def test_submit_takes_labels_and_a_timeout_and_refuses_bad_ones_with_exit_2(
    tmp_path: Path,
) -> None:
    routed = await submit(
        tmp_path, "train", "--label", "repo:foo", "--label", "gpu", "--label", "gpu"
    )
    bounded = await submit(tmp_path, "quick", "--timeout", "30")
    items = items_by_id(await status_json(tmp_path))
    assert (items[routed]["labels"], items[routed]["timeout"]) == (["gpu", "repo:foo"], None)
    assert (items[bounded]["labels"], items[bounded]["timeout"]) == ([], 30.0)
    for flags, word in (
        (("--label", "has space"), "bad label 'has space' in --label"),
        (("--label", ""), "bad label '' in --label"),
        (tuple(f for n in range(33) for f in ("--label", f"l{n}")), "at most 32 labels"),
        (("--timeout", "0"), "--timeout must be"),
        (("--timeout", "nan"), "--timeout must be"),
        (("--timeout", "604801"), "--timeout must be"),
        (("--timeout", "soon"), "invalid float value"),
    ):
        done = await cli("submit", "x", *flags, cwd=tmp_path)
        assert done.returncode == 2, flags
        assert word in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert len((await status_json(tmp_path))["items"]) == 2


async def test_a_labelled_worker_claims_only_what_its_labels_cover_and_status_shows_them(
    tmp_path: Path,
) -> None:
    plain = await submit(tmp_path, "plain")
    routed = await submit(tmp_path, "on the gpu", "--label", "gpu")
    elsewhere = await submit(tmp_path, "on the cpu", "--label", "cpu")
    ok = agent("ok", "{prompt}")
    async with running_worker(
        tmp_path, "run", "--agent", ok, "--label", "gpu", "--label", "repo:foo"
    ):
        document = await wait_status(
            tmp_path,
            lambda d: outcome_of(d, plain) == "completed" and outcome_of(d, routed) == "completed",
        )
        items = items_by_id(document)
        assert items[elsewhere]["state"] == "queued"
        (worker,) = document["workers"]
        assert worker["labels"] == ["gpu", "repo:foo"]
        drawn = await cli("status", cwd=tmp_path, env=cli_env(COLUMNS="200"))
        assert drawn.returncode == 0
        assert "labels" in drawn.stdout and "gpu repo:foo" in drawn.stdout
    bad = await cli("run", "--label", "no spaces", cwd=tmp_path)
    assert bad.returncode == 2
    assert "labels" in bad.stderr and "bad label 'no spaces'" in bad.stderr
