"""An agent's session client: its credential works for its own live session only.

Both ways an agent reaches its control plane: the embedded store file (the
client checks the credential itself) and the reference server on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor import ConfigError, SessionCredentials, open_session_client
from supervisor._cli._settings import read_environment
from supervisor.controlplane import (
    NO_HEARTBEAT,
    EmbeddedControlPlane,
    HttpControlPlane,
    Outcome,
    OutcomeStatus,
    SQLiteStore,
    Unauthorized,
    WorkItem,
    open_control_plane_server,
)
from supervisor.controlplane._session_client import (
    SESSION_CONTROL_PLANE_ENV,
    SESSION_ENVIRONMENT_ENV,
    SESSION_ID_ENV,
    SESSION_TOKEN_ENV,
    session_location,
)

KEY = "session-client-test-key-0123456789"
WORKER = "worker-1"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def plane(store: SQLiteStore) -> AsyncIterator[EmbeddedControlPlane]:
    """On the wall clock, unlike the shared one: agents in other processes use the store too."""
    async with EmbeddedControlPlane(store) as embedded:
        yield embedded


async def claim(plane: EmbeddedControlPlane, prompt: str = "source") -> tuple[WorkItem, str]:
    item = await plane.submit(prompt)
    polled = await plane.poll(worker_id=WORKER)
    assert polled is not None and polled.id == item.id and polled.secret is not None
    await plane.ack(item.id, worker_id=WORKER)
    await plane.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    return polled, polled.secret


def credentials(location: str, item: WorkItem, token: str) -> SessionCredentials:
    return SessionCredentials(session_id=item.data.id, token=token, control_plane=location)


def test_credentials_round_trip_through_the_environment_and_hide_the_token() -> None:
    creds = SessionCredentials("sess-1", "s3cret-token", "/state/cp.sqlite3", "env-a")
    env = creds.to_environ()
    assert env == {
        SESSION_ID_ENV: "sess-1",
        SESSION_TOKEN_ENV: "s3cret-token",
        SESSION_CONTROL_PLANE_ENV: "/state/cp.sqlite3",
        SESSION_ENVIRONMENT_ENV: "env-a",
    }
    assert SessionCredentials.from_environ(env) == creds
    assert "s3cret-token" not in repr(creds)


@pytest.mark.parametrize("missing", [SESSION_ID_ENV, SESSION_TOKEN_ENV, SESSION_CONTROL_PLANE_ENV])
def test_a_missing_variable_is_named(missing: str) -> None:
    env = SessionCredentials("sess-1", "tok", "/x").to_environ()
    del env[missing]
    with pytest.raises(ConfigError) as error:
        SessionCredentials.from_environ(env)
    assert error.value.key == missing


async def test_the_embedded_store_accepts_the_live_credential_of_the_session(
    plane: EmbeddedControlPlane, store: SQLiteStore
) -> None:
    item, secret = await claim(plane)
    location = session_location(plane)
    assert location == os.path.abspath(store.path)
    async with open_session_client(credentials(location, item, secret)) as client:
        delegation = await client.delegate("sub task")
        await client.post_message("a note")
        assert [m.body for m in await client.list_messages()] == ["a note"]
    assert delegation.source_id == item.data.id
    assert [d.id for d in await plane.list_delegations(WORKER)] == [delegation.id]


async def test_the_embedded_store_refuses_a_wrong_foreign_or_dead_credential(
    plane: EmbeddedControlPlane, store: SQLiteStore
) -> None:
    location = os.path.abspath(store.path)
    item, secret = await claim(plane, "first")
    other, _ = await claim(plane, "second")
    refused = [
        credentials(location, item, "made-up"),
        credentials(location, other, secret),  # a live token, for another session
    ]
    for creds in refused:
        async with open_session_client(creds) as client:
            with pytest.raises(Unauthorized):
                await client.delegate("no")
    await plane.stop(item.id, outcome=Outcome(OutcomeStatus.COMPLETED))
    async with open_session_client(credentials(location, item, secret)) as client:
        with pytest.raises(Unauthorized):
            await client.delegate("too late")
    assert list(await plane.list_delegations(WORKER)) == []


async def test_a_missing_store_file_is_a_configuration_error(tmp_path: Path) -> None:
    creds = SessionCredentials("sess-1", "tok", str(tmp_path / "nowhere.sqlite3"))
    with pytest.raises(ConfigError):
        async with open_session_client(creds):
            pass
    assert not (tmp_path / "nowhere.sqlite3").exists()


async def test_over_http_the_credential_is_the_bearer_token(
    plane: EmbeddedControlPlane, store: SQLiteStore
) -> None:
    item, secret = await claim(plane)
    async with (
        open_control_plane_server(store, key_provider=KEY) as url,
        HttpControlPlane.open(url, key=KEY) as worker,
    ):
        await worker.stats()  # the worker has spoken to this server
        assert session_location(worker) == url
        async with open_session_client(credentials(url, item, secret)) as client:
            delegation = await client.delegate("remote sub task")
        async with open_session_client(credentials(url, item, "made-up")) as client:
            with pytest.raises(Unauthorized):
                await client.delegate("no")
    assert delegation.source_id == item.data.id


def delegate_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "delegate", *args],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_the_delegate_command_prints_the_delegation_id(
    plane: EmbeddedControlPlane, store: SQLiteStore
) -> None:
    item, secret = await claim(plane)
    env = credentials(os.path.abspath(store.path), item, secret).to_environ()
    done = delegate_command(env, "summarise the logs")
    assert done.returncode == 0, done.stderr
    (delegation,) = await plane.list_delegations(WORKER)
    assert done.stdout.strip() == delegation.id
    assert delegation.task == "summarise the logs"


@pytest.mark.slow
async def test_the_delegate_command_exit_codes_and_no_token_in_its_errors(
    plane: EmbeddedControlPlane, store: SQLiteStore
) -> None:
    item, secret = await claim(plane)
    env = credentials(os.path.abspath(store.path), item, secret).to_environ()
    outside = delegate_command({}, "task")
    assert outside.returncode == 2
    assert SESSION_ID_ENV in outside.stderr
    empty = delegate_command(env, "  ")
    assert empty.returncode == 2
    wrong = delegate_command({**env, SESSION_TOKEN_ENV: "wrong-token-value"}, "task")
    assert wrong.returncode == 1
    assert "wrong-token-value" not in wrong.stderr + wrong.stdout
    await plane.stop(item.id, outcome=Outcome(OutcomeStatus.COMPLETED))
    ended = delegate_command(env, "task")
    assert ended.returncode == 1
    assert secret not in ended.stderr + ended.stdout
    assert list(await plane.list_delegations(WORKER)) == []


def test_the_session_variables_are_not_worker_settings() -> None:
    """An agent may run `python -m supervisor ...` itself: its session variables are no error."""
    env = SessionCredentials("sess-1", "tok", "/state/cp.sqlite3", "env-a").to_environ()
    assert read_environment({**env, "SUPERVISOR_WORKSPACE": "/w", "SUPERVISOR_WORK_ID": "x"}) == {}
