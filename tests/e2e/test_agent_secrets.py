"""An agent cannot find the environment key: not in ``/proc/$PPID/environ``, not in the key file.

A real ``python -m supervisor run`` worker with the key in its environment, on the
reference HTTP server; its agent is a shell that prints its parent's initial
environment and the key file. As root (this suite's machine), the agent can read
any file, so the first test runs it as root and shows only that the worker's
environment no longer holds the key; the second creates an unprivileged user and
runs the agent as ``agent_user``: then neither the worker's ``/proc`` files nor the
key file (mode 600) can be read at all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor.controlplane import WorkState
from supervisor.controlplane._http import HttpControlPlane

pytestmark = pytest.mark.slow

KEY = "e2e-secret-" + secrets.token_hex(12)
#: Prints the worker's initial environment (one variable a line), then the key file ($0).
SNOOP = (
    'sh -c \'exec 2>&1; tr "\\000" "\\n" < /proc/$PPID/environ; '
    'echo ---; cat "$0"; echo ---\' {prompt}'
)


def env(**extra: str) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    values.update(extra)
    return values


async def run_snoop(root: Path, *extra_flags: str) -> str:
    """Serve one snooping item; returns what the agent printed (its session's result)."""
    key_file = root / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    serve = [
        sys.executable, "-m", "supervisor.testing.chaos", "serve",
        "--state-dir", str(root / "server"),
    ]  # fmt: skip
    server = await trio.lowlevel.open_process(
        serve, stdout=subprocess.PIPE, env=env(SUPERVISOR_ENVIRONMENT_KEY=KEY)
    )
    worker: trio.Process | None = None
    try:
        assert server.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await server.stdout.receive_some(1)
                assert chunk, "the server exited"
                line += chunk
        url = line.decode().strip()
        argv = [
            sys.executable, "-m", "supervisor", "run", "--control-plane", url,
            "--state-dir", str(root / "state"), "--agent", SNOOP, *extra_flags,
        ]  # fmt: skip
        with (root / "worker.log").open("wb") as out:
            worker = await trio.lowlevel.open_process(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env(SUPERVISOR_ENVIRONMENT_KEY=KEY, SUPERVISOR_API_ENABLED="false"),
            )
        async with HttpControlPlane.open(url, key=KEY) as plane:
            item = await plane.submit(str(key_file))
            with trio.fail_after(60):
                while (item := await plane.get(item.id)).state is not WorkState.STOPPED:
                    await trio.sleep(0.1)
        assert item.outcome is not None
        return item.outcome.result or ""
    finally:
        with trio.CancelScope(shield=True):
            for process in (worker, server):
                if process is not None and process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()


async def test_the_workers_environment_no_longer_holds_the_key(tmp_path: Path) -> None:
    """Even an agent allowed to read it (root) finds the variable's value wiped."""
    printed = await run_snoop(tmp_path)
    environ, _, rest = printed.partition("---")
    assert "SUPERVISOR_ENVIRONMENT_KEY=\n" in environ  # it read the block: the value is gone
    assert KEY not in environ
    assert "PATH=" in environ
    if os.geteuid() == 0:
        assert KEY in rest  # root reads any file: what agent_user is for (see the README)


@pytest.fixture
def agent_user() -> Iterator[str]:
    """A fresh unprivileged user, removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("running agents as another user needs root and useradd")
    name = "svagent" + secrets.token_hex(3)
    subprocess.run(["useradd", "-M", "-r", "-s", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


async def test_an_agent_running_as_agent_user_reads_neither_the_environ_nor_the_key_file(
    agent_user: str,
) -> None:
    # The agent must reach its workspace: every parent directory is traversable.
    root = Path(tempfile.mkdtemp(prefix="supervisor-secrets-"))
    root.chmod(0o711)
    try:
        printed = await run_snoop(root, "--agent-user", agent_user)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert KEY not in printed
    environ, _, rest = printed.partition("---")
    assert "SUPERVISOR_ENVIRONMENT_KEY" not in environ
    assert "Permission denied" in environ  # /proc/$PPID/environ
    assert "Permission denied" in rest  # the key file
