"""``python -m supervisor demo`` runs its whole tour and leaves nothing behind."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose environment mentions ``text`` (agents carry their workspace)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


@pytest.mark.timeout(180)
async def test_the_tour_runs_every_step_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = str(REPO)
    env["TMPDIR"] = str(tmp_path)
    with trio.fail_after(150):
        done = await trio.run_process(
            [sys.executable, "-m", "supervisor", "demo", "--pause", "0"],
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    steps = [
        "A worker starts",
        "Three sessions",
        "An agent crashes",
        "A service crashes and is restarted by policy",
        "A wedged agent",
        "An operator cancels a session",
        "A delegation",
        "Health and metrics",
        "A graceful stop",
    ]
    positions = [out.index(step) for step in steps]
    assert positions == sorted(positions)
    assert out.count("notice:") >= 8
    assert len(re.findall(r"completed after", out)) >= 4
    assert "failed (exit code 3)" in out
    assert re.search(r"reporter\s+running\s+up [\d.]+s\s+1 restart\b", out)
    assert "cancelled" in out
    wedge = out[out.index("A wedged agent") : out.index("An operator cancels")]
    assert "wedged after" in wedge
    assert wedge.index("GET /health -> 503 degraded") < wedge.index("GET /health -> 200 ok")
    delegation = out[out.index("A delegation") : out.index("Health and metrics")]
    assert re.search(r"done, with help: delegation dlg_\w+\s+completed", delegation)
    assert "skipped:" not in out
    assert "GET /health -> 200" in out
    state = re.search(r"state directory: (\S+)", out)
    assert state is not None
    assert not Path(state.group(1)).exists()  # removed, as it was temporary
    assert processes_mentioning(state.group(1)) == []
