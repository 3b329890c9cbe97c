"""Delegation end to end: a real worker, real agent processes, a real control plane.

An agent (``tests/agents/delegator.py``) delegates two tasks with
``python -m supervisor delegate``; the same worker claims and runs both
delegates; the watcher brings both results back into the source session's
inbox while it still runs. Once with the embedded store, once over the
reference server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import (
    AgentContext,
    SessionCredentials,
    Worker,
    WorkerConfig,
    open_session_client,
    open_worker,
)
from supervisor._worker._journal import journal_path
from supervisor.controlplane import (
    DelegationStatus,
    EmbeddedControlPlane,
    OutcomeStatus,
    SQLiteStore,
    open_control_plane_server,
)
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.controlplane._session_client import SESSION_CONTROL_PLANE_ENV, SESSION_TOKEN_ENV

REPO = Path(__file__).resolve().parents[2]
AGENTS = Path(__file__).resolve().parents[1] / "agents"
KEY = "e2e-delegation-key-0123456789abcdef"
WORKER_ID = "worker-e2e"

pytestmark = pytest.mark.slow


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    return {
        "worker_id": WORKER_ID,
        "max_concurrency": 3,  # the source and both delegates at once
        # The agents run `python -m supervisor`: let them find this checkout.
        "agent_env": ("PYTHONPATH",),
        "poll_block_ms": 100,
        "delegation_poll_interval": 0.1,
        "agent_grace": 0.5,
    }


def script(agent: str) -> str:
    """The command of the agent ``tests/agents/<agent>``."""
    return f"{sys.executable} {AGENTS / agent} {{prompt}}"


def base_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@asynccontextmanager
async def worker_for(
    mode: str, config: Callable[..., WorkerConfig], tmp_path: Path, agent: str
) -> AsyncIterator[Worker]:
    """A running worker on the embedded store in its state dir, or on a server over one."""
    if mode == "embedded":
        async with open_worker(config(agent=script(agent)), base_env=base_env()) as worker:
            yield worker
        return
    store = SQLiteStore(tmp_path / "server.sqlite3")
    try:
        async with (
            open_control_plane_server(store, key_provider=KEY) as url,
            open_worker(
                config(agent=script(agent), control_plane=url, environment_key=KEY),
                base_env=base_env(),
            ) as worker,
        ):
            yield worker
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["embedded", "http"])
async def test_an_agent_delegates_two_tasks_and_receives_both_results(
    config: Callable[..., WorkerConfig], tmp_path: Path, mode: str
) -> None:
    async with worker_for(mode, config, tmp_path, "delegator.py") as worker:
        source_id = await worker.submit("delegate:count the files;list the tests")
        with trio.fail_after(60):
            outcome = await worker.wait(source_id)
        assert outcome.status is OutcomeStatus.COMPLETED, outcome
        assert outcome.result is not None
        report = json.loads(outcome.result)
        delegations = await worker.control_plane.list_delegations(WORKER_ID)
        items = {d.id: await worker.control_plane.get(d.work_id) for d in delegations}
        source = await worker.control_plane.get(source_id)
        messages = await worker.control_plane.list_messages(source.data.id)
    # Both delegations exist, both delegate agents completed, and the source got both.
    assert sorted(report["delegated"]) == sorted(d.id for d in delegations)
    assert len(delegations) == 2
    for delegation in delegations:
        assert delegation.status is DelegationStatus.COMPLETED
        assert delegation.collected_at is not None
        item = items[delegation.id]
        assert item.outcome is not None and item.outcome.status is OutcomeStatus.COMPLETED
        entry = report["received"][delegation.id]
        assert entry["status"] == "completed"
        assert entry["response_preview"] == f"sub-result for {delegation.task}"
    # Delivered into the running session's inbox, so no follow-up message was needed.
    assert messages == []
    journal = journal_path((tmp_path / "state").absolute(), WORKER_ID)
    kinds = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
    assert kinds.count("session") == 3  # the source and both delegates ran here
    assert kinds.count("result") == 2
    delivered = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {d["via"] for d in delivered if d["kind"] == "delivered"} == {"inbox"}


async def test_an_agent_gets_its_session_credential_and_never_the_environment_key(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    """Over HTTP: the agent's environment names the server and the session, not the key."""
    async with worker_for("http", config, tmp_path, "report.py") as worker:
        first = await worker.submit("one")
        second = await worker.submit("two")
        with trio.fail_after(30):
            reports = [json.loads(str((await worker.wait(i)).result)) for i in (first, second)]
        url = worker.config.control_plane
    envs = [report["env"] for report in reports]
    for env in envs:
        assert env[SESSION_CONTROL_PLANE_ENV] == url
        assert "SUPERVISOR_ENVIRONMENT_KEY" not in env
        assert KEY not in json.dumps(env)
        creds = SessionCredentials.from_environ(env)
        assert creds.session_id == env["SUPERVISOR_SESSION_ID"]
    assert envs[0][SESSION_TOKEN_ENV] != envs[1][SESSION_TOKEN_ENV]


async def test_on_the_embedded_store_an_agent_is_pointed_at_the_store_file(
    config: Callable[..., WorkerConfig], tmp_path: Path
) -> None:
    async with worker_for("embedded", config, tmp_path, "report.py") as worker:
        item_id = await worker.submit("where am I")
        with trio.fail_after(30):
            report = json.loads(str((await worker.wait(item_id)).result))
        assert isinstance(worker.control_plane, EmbeddedControlPlane)
        session_id = (await worker.control_plane.get(item_id)).data.id
        token = report["env"][SESSION_TOKEN_ENV]
        # The credential died with the session's claim.
        assert not await worker.control_plane.verify_session_secret(session_id, token)
    store_file = (tmp_path / "state" / STORE_FILENAME).absolute()
    assert report["env"][SESSION_CONTROL_PLANE_ENV] == str(store_file)


async def in_process_agent(ctx: AgentContext) -> object:
    """``wait:A;B`` delegates and waits on ``ctx.inbox``; ``leave:A;B`` delegates and ends;
    anything else is a delegate that answers after a moment."""
    mode, _, tasks = ctx.prompt.partition(":")
    if mode not in ("wait", "leave"):
        await trio.sleep(0.2)
        return f"sub-result for {ctx.prompt}"
    async with open_session_client(SessionCredentials.from_environ(ctx.env)) as client:
        ids = [(await client.delegate(task)).id for task in tasks.split(";")]
    if mode == "leave":
        return json.dumps({"delegated": ids})
    assert ctx.inbox is not None
    entries = [await ctx.inbox.receive() for _ in ids]
    return json.dumps(
        {"delegated": ids, "received": {e.delegation_id: e.response_preview for e in entries}}
    )


async def test_an_in_process_agent_waits_on_its_inbox_for_both_results(
    config: Callable[..., WorkerConfig],
) -> None:
    cfg = config(delegation_poll_interval=0.05)
    async with open_worker(cfg, agent=in_process_agent) as worker:
        source_id = await worker.submit("wait:first;second")
        with trio.fail_after(30):
            outcome = await worker.wait(source_id)
    assert outcome.status is OutcomeStatus.COMPLETED, outcome
    report = json.loads(str(outcome.result))
    assert sorted(report["received"].values()) == ["sub-result for first", "sub-result for second"]
    assert sorted(report["received"]) == sorted(report["delegated"])


async def test_a_session_that_ended_gets_its_results_as_follow_ups_without_their_output(
    config: Callable[..., WorkerConfig],
) -> None:
    cfg = config(delegation_poll_interval=0.05, delegation_cooldown=0.3)
    async with open_worker(cfg, agent=in_process_agent) as worker:
        source_id = await worker.submit("leave:first;second")
        with trio.fail_after(30):
            outcome = await worker.wait(source_id)
            ids = json.loads(str(outcome.result))["delegated"]
            session_id = (await worker.control_plane.get(source_id)).data.id
            while True:
                found = await worker.control_plane.list_messages(session_id)
                bodies = " ".join(m.body for m in found if m.kind == "message")
                if all(i in bodies for i in ids):
                    break
                await trio.sleep(0.05)
    messages = [m for m in found if m.kind == "message"]
    notes = [m for m in found if m.kind == "notification"]
    assert 1 <= len(messages) <= 2
    assert len(notes) == 2
    for message in found:
        assert "sub-result" not in message.body
        assert "completed" in message.body
    assert str(journal_path(cfg.state_dir.absolute(), WORKER_ID)) in messages[0].body
