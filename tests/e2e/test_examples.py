"""The examples in ``examples/`` run as written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_threaded_script_prints_three_completed_sessions(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "threaded_script.py"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(": completed: done: 'summarise chapter" in line for line in lines)


@pytest.mark.slow
def test_trio_service_embeds_a_worker_and_drains_on_sigint(tmp_path: Path) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "trio_service.py"),
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        _drive_service(proc)


def _drive_service(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = line.split("listening on ", 1)[1].strip()
        with httpx.Client(base_url=url, timeout=60) as client:
            bad = client.post("/jobs", json={"nope": 1})
            assert bad.status_code == 400
            created = client.post("/jobs", json={"prompt": "embedded hello"})
            assert created.status_code == 201
            result = client.get(f"/jobs/{created.json()['id']}").json()
        assert result["status"] == "completed"
        assert "embedded hello" in result["result"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
