"""The README's two set-up commands, run from a fresh virtual environment.

Building a venv and installing into it takes a minute or more and needs the
package index, so this test runs only when ``SUPERVISOR_FRESH_VENV_TEST=1``
(CI sets it; see ``.ci/run``). It proves what a newcomer relies on: that
``pip install -e .`` alone brings every dependency ``python -m supervisor``
needs, and that ``pip install -e '.[test]'`` brings what the test suite imports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SUPERVISOR_FRESH_VENV_TEST") != "1",
        reason="builds a fresh venv from the package index; set SUPERVISOR_FRESH_VENV_TEST=1",
    ),
]


def clean_env() -> dict[str, str]:
    """No SUPERVISOR_* settings, and nothing that would make the venv see this one's packages."""
    drop = ("SUPERVISOR_", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def sh(*argv: str | Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


@pytest.mark.timeout(900)
def test_the_readme_set_up_commands_work_from_a_fresh_venv(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".supervisor", "*.egg-info"),
    )
    python = source / ".venv" / "bin" / "python"

    # Command 1: python3 -m venv .venv && .venv/bin/pip install -e . && python -m supervisor
    sh(sys.executable, "-m", "venv", ".venv", cwd=source, timeout=120)
    sh(python, "-m", "pip", "install", "-q", "-e", ".", cwd=source, timeout=600)
    work = tmp_path / "work"
    work.mkdir()
    with (
        (tmp_path / "worker-stderr.txt").open("w") as stderr,
        subprocess.Popen(
            [str(python), "-m", "supervisor"],
            cwd=work,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as worker,
    ):
        try:
            assert worker.stdout is not None
            banner = "".join(iter_lines_until(worker.stdout, "Stop with Ctrl-C"))
            assert "is running" in banner, banner
            submitted = sh(python, "-m", "supervisor", "submit", "hello", cwd=work, timeout=60)
            item_id = submitted.stdout.strip()
            for _ in range(300):
                status = sh(python, "-m", "supervisor", "status", "--json", cwd=work, timeout=60)
                items = {i["id"]: i for i in json.loads(status.stdout)["items"]}
                if items[item_id]["outcome"] is not None:
                    break
            assert items[item_id]["outcome"]["status"] == "completed"
            drawn = sh(python, "-m", "supervisor", "status", cwd=work, timeout=60)
            assert item_id in drawn.stdout
            worker.send_signal(signal.SIGINT)
            assert worker.wait(timeout=60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=30)

    # Command 2: python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && python -m pytest
    sh(python, "-m", "pip", "install", "-q", "-e", ".[test]", cwd=source, timeout=600)
    collected = sh(
        python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
        cwd=source, timeout=300,
    )  # fmt: skip
    assert "tests collected" in collected.stdout or " collected" in collected.stdout


def iter_lines_until(stream: object, marker: str, limit: int = 100) -> list[str]:
    lines = []
    for _ in range(limit):
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return lines
