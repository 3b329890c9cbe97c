"""A real agent printing a surrogate result, a real worker, the reference server on 127.0.0.1.

``{"result": "\\ud800"}`` is valid JSON whose string no UTF-8 answer can
carry. The worker repairs it at the runner (U+FFFD), so the finished session
is recorded once, completed, instead of failing its stop and running again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from supervisor._worker._config import WorkerConfig
from supervisor._worker._worker import open_worker
from supervisor.controlplane import OutcomeStatus, WorkState
from supervisor.controlplane._server import open_control_plane_server
from supervisor.controlplane._store import SQLiteStore

AGENTS = Path(__file__).resolve().parents[1] / "agents"
KEY = "e2e-text-key-0123456789abcdef"

pytestmark = pytest.mark.slow


async def test_a_surrogate_result_from_a_real_agent_is_recorded_over_http(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "server.sqlite3")
    try:
        async with open_control_plane_server(store, key_provider=KEY) as url:
            config = WorkerConfig(
                state_dir=tmp_path / "state",
                worker_id="text-e2e",
                agent=f"{sys.executable} {AGENTS / 'surrogate.py'}",
                control_plane=url,
                environment_key=KEY,
                poll_block_ms=100,
                agent_grace=0.5,
                drain_timeout=5.0,
                api_enabled=False,
            )
            async with open_worker(config) as worker:
                work_id = await worker.submit("go")
                with trio.fail_after(30):
                    outcome = await worker.wait(work_id)
                item = await worker.control_plane.get(work_id)
                listed = await worker.control_plane.list_work()
    finally:
        store.close()
    assert outcome.status is OutcomeStatus.COMPLETED, outcome
    assert outcome.result == "done \ufffd and \ufffd"
    assert item.state is WorkState.STOPPED
    assert item.attempts == 0, "ran once"
    assert item.outcome is not None
    assert item.outcome.status is OutcomeStatus.COMPLETED
    assert item.outcome.result == "done \ufffd and \ufffd"
    assert [i.id for i in listed] == [work_id]
