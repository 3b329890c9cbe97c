"""``python -m supervisor serve`` as a real subprocess: config errors, signals, durability."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from supervisor.controlplane import (
    NO_HEARTBEAT,
    HttpControlPlane,
    Outcome,
    OutcomeStatus,
    WorkState,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY = "cli-test-key-0123456789abcdef"


def serve_env(**extra: str) -> dict[str, str]:
    """The parent's environment minus any SUPERVISOR_* setting, plus the repo on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def serve_argv(state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", "serve", "--state-dir", str(state_dir), *extra]


async def run_serve(
    state_dir: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``serve`` to completion (for the configuration errors, which exit at once)."""
    with trio.fail_after(60):
        return await trio.run_process(
            serve_argv(state_dir, "--port", "0", *extra),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@asynccontextmanager
async def running_server(
    state_dir: Path, env: dict[str, str], stderr_path: Path
) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start ``serve --port 0``, read the URL it prints, and always reap it afterwards."""
    with stderr_path.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            serve_argv(state_dir, "--port", "0"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(60):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    pytest.fail(f"serve exited early: {stderr_path.read_text()}")
                buffer += chunk
        url = buffer.split(b"\n", 1)[0].decode().strip()
        assert url.startswith("http://127.0.0.1:")
        yield process, url
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


@pytest.mark.parametrize(
    ("env_extra", "message"),
    [
        ({}, "no environment key configured"),
        ({"SUPERVISOR_ENVIRONMENT_KEY": ""}, "no environment key configured"),
        ({"SUPERVISOR_ENVIRONMENT_KEY_FILE": "/nonexistent/key"}, "cannot read the environment"),
        (
            {"SUPERVISOR_ENVIRONMENT_KEY": KEY, "SUPERVISOR_ENVIRONMENT_KEY_FILE": "/x"},
            "not both",
        ),
    ],
    ids=["absent", "empty", "unreadable-file", "both"],
)
async def test_key_configuration_errors_exit_2(
    tmp_path: Path, env_extra: dict[str, str], message: str
) -> None:
    """No key, an empty key, an unreadable key file or two keys: exit 2, one clear line on
    stderr, no traceback, nothing on stdout."""
    result = await run_serve(tmp_path / "state", serve_env(**env_extra))
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
    assert result.stdout == b""


async def test_empty_key_file_exits_2(tmp_path: Path) -> None:
    """A key file holding only whitespace counts as no key."""
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    result = await run_serve(
        tmp_path / "state", serve_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(key_file))
    )
    assert result.returncode == 2
    assert "no environment key configured" in result.stderr.decode()


async def test_port_in_use_exits_2(tmp_path: Path) -> None:
    """A port another socket listens on: exit 2 saying it cannot listen there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(60):
            result = await trio.run_process(
                serve_argv(tmp_path / "state", "--port", str(port)),
                env=serve_env(SUPERVISOR_ENVIRONMENT_KEY=KEY),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("port", ["-1", "65536"])
async def test_out_of_range_port_exits_2(tmp_path: Path, port: str) -> None:
    """A port outside 0-65535 is a configuration error naming --port."""
    with trio.fail_after(60):
        result = await trio.run_process(
            serve_argv(tmp_path / "state", "--port", port),
            env=serve_env(SUPERVISOR_ENVIRONMENT_KEY=KEY),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert "--port" in result.stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_the_server_with_exit_0(tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM or SIGINT stops serving promptly and exits 0; the key was never printed."""
    stderr_path = tmp_path / "stderr.log"
    async with running_server(
        tmp_path / "state", serve_env(SUPERVISOR_ENVIRONMENT_KEY=KEY), stderr_path
    ) as (process, url):
        async with HttpControlPlane.open(url, key=KEY) as cp:
            assert (await cp.submit("before the signal")).state is WorkState.QUEUED
        process.send_signal(signum)
        with trio.fail_after(20):
            assert await process.wait() == 0
    log = stderr_path.read_text()
    assert "listening on" in log
    assert KEY not in log


async def test_items_survive_sigkill_and_restart(tmp_path: Path) -> None:
    """Items submitted over HTTP are all there, in the same states, after the server process
    is SIGKILLed and restarted on the same state directory."""
    state_dir = tmp_path / "state"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    env = serve_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(key_file))
    stderr_path = tmp_path / "stderr.log"

    async with running_server(state_dir, env, stderr_path) as (process, url):
        async with HttpControlPlane.open(url, key=KEY) as cp:
            items = [await cp.submit(f"prompt {n}", metadata={"n": str(n)}) for n in range(8)]
            # Move a few along the lifecycle so more than one state must survive.
            for worker in ("w1", "w2", "w3"):
                claimed = await cp.poll(worker_id=worker)
                assert claimed is not None
                await cp.ack(claimed.id, worker_id=worker)
            beat = await cp.heartbeat(items[1].id, expected_last_heartbeat=NO_HEARTBEAT)
            await cp.stop(
                items[2].id,
                expected_last_heartbeat=None,
                outcome=Outcome(OutcomeStatus.FAILED, exit_code=3, reason="crashed"),
            )
            await cp.request_stop(items[7].id)
            before = list(await cp.list_work(limit=1000))
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(20):
            assert await process.wait() == -signal.SIGKILL

    async with running_server(state_dir, env, stderr_path) as (process, url):
        async with HttpControlPlane.open(url, key=KEY) as cp:
            after = list(await cp.list_work(limit=1000))
            # The lease is still live after the restart: its holder can keep heartbeating.
            renewed = await cp.heartbeat(items[1].id, expected_last_heartbeat=beat.last_heartbeat)
            assert renewed.state is WorkState.ACTIVE
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0

    assert after == before
    assert {item.id for item in after} == {item.id for item in items}
    states = {item.id: item.state for item in after}
    assert states[items[0].id] is WorkState.STARTING
    assert states[items[1].id] is WorkState.ACTIVE
    assert states[items[2].id] is WorkState.STOPPED
    assert states[items[7].id] is WorkState.STOPPED  # request-stop on a queued item stops it
    assert [states[item.id] for item in items[3:7]] == [WorkState.QUEUED] * 4
    assert KEY not in stderr_path.read_text()
