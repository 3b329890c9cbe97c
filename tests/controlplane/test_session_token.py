"""A session's own credential on the reference server (127.0.0.1, real SQLite file).

It works on its own session's delegate and message routes, while the claim
that minted it is live, and nowhere else; it never shows up in a log line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from supervisor.controlplane import (
    NO_HEARTBEAT,
    HttpControlPlane,
    Outcome,
    OutcomeStatus,
    SQLiteStore,
    Unauthorized,
    WorkItem,
    open_control_plane_server,
)

KEY = "session-token-test-key-0123456789"
WORKER = "worker-1"


@pytest.fixture
async def url(store: SQLiteStore) -> AsyncIterator[str]:
    async with open_control_plane_server(store, key_provider=KEY) as base:
        yield base


@pytest.fixture
async def operator(url: str) -> AsyncIterator[HttpControlPlane]:
    async with HttpControlPlane.open(url, key=KEY) as plane:
        yield plane


async def claim(plane: HttpControlPlane, prompt: str = "source") -> tuple[WorkItem, str]:
    """Submit, poll, ack and beat an item as the worker; returns it with its session secret."""
    item = await plane.submit(prompt)
    polled = await plane.poll(worker_id=WORKER)
    assert polled is not None and polled.id == item.id
    assert polled.secret is not None
    await plane.ack(item.id, worker_id=WORKER)
    await plane.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    return polled, polled.secret


async def test_a_session_token_delegates_and_exchanges_messages_for_its_own_session(
    url: str, operator: HttpControlPlane
) -> None:
    item, secret = await claim(operator)
    async with HttpControlPlane.open(url, key=secret) as agent:
        delegation = await agent.delegate(item.data.id, "write the tests")
        message = await agent.post_message(item.data.id, "progress: half done")
        messages = await agent.list_messages(item.data.id)
    assert delegation.source_id == item.data.id
    assert (await operator.get(delegation.work_id)).metadata["delegation_id"] == delegation.id
    assert [m.id for m in messages] == [message.id]


async def test_a_session_token_is_refused_for_another_session(
    url: str, operator: HttpControlPlane
) -> None:
    _, secret = await claim(operator, "first")
    other, _ = await claim(operator, "second")
    async with HttpControlPlane.open(url, key=secret) as agent:
        with pytest.raises(Unauthorized):
            await agent.delegate(other.data.id, "not yours")
        with pytest.raises(Unauthorized):
            await agent.post_message(other.data.id, "not yours")
        with pytest.raises(Unauthorized):
            await agent.list_messages(other.data.id)
    assert list(await operator.list_messages(other.data.id)) == []


async def test_a_session_token_is_refused_on_every_other_route(
    url: str, operator: HttpControlPlane
) -> None:
    item, secret = await claim(operator)
    calls: dict[str, Callable[[HttpControlPlane], Awaitable[object]]] = {
        "submit": lambda p: p.submit("more work"),
        "poll": lambda p: p.poll(worker_id="intruder"),
        "get": lambda p: p.get(item.id),
        "list_work": lambda p: p.list_work(),
        "stats": lambda p: p.stats(),
        "request_stop": lambda p: p.request_stop(item.id),
        "stop": lambda p: p.stop(item.id),
        "notify": lambda p: p.notify(item.data.id, "hi"),
        "list_delegations": lambda p: p.list_delegations(WORKER),
        "list_workers": lambda p: p.list_workers(),
    }
    refused = []
    async with HttpControlPlane.open(url, key=secret) as agent:
        for name, call in calls.items():
            with pytest.raises(Unauthorized):
                await call(agent)
            refused.append(name)
    assert refused == list(calls)
    assert (await operator.get(item.id)).state.value == "active"
    assert (await operator.stats()).depth == 0


async def test_a_session_token_dies_with_its_claim(url: str, operator: HttpControlPlane) -> None:
    item, secret = await claim(operator)
    await operator.stop(item.id, outcome=Outcome(OutcomeStatus.COMPLETED))
    async with HttpControlPlane.open(url, key=secret) as agent:
        with pytest.raises(Unauthorized):
            await agent.delegate(item.data.id, "too late")


async def test_a_made_up_token_is_refused(url: str, operator: HttpControlPlane) -> None:
    item, _ = await claim(operator)
    async with HttpControlPlane.open(url, key="not-a-session-secret") as agent:
        with pytest.raises(Unauthorized):
            await agent.delegate(item.data.id, "guess")
    assert list(await operator.list_delegations(WORKER)) == []


async def test_an_environment_the_server_has_not_served_yet_accepts_no_session_token(
    store: SQLiteStore,
) -> None:
    """Unauthenticated callers cannot make the server build a plane per invented environment."""
    async with (
        open_control_plane_server(store, key_provider=KEY) as first,
        HttpControlPlane.open(first, key=KEY) as plane,
    ):
        item, secret = await claim(plane)
    async with (
        open_control_plane_server(store, key_provider=KEY) as second,
        HttpControlPlane.open(second, key=secret) as agent,
    ):
        with pytest.raises(Unauthorized):
            await agent.delegate(item.data.id, "before the worker spoke")
        async with HttpControlPlane.open(second, key=KEY) as worker:
            await worker.stats()  # the worker's next call brings the environment in
        delegation = await agent.delegate(item.data.id, "after")
    assert delegation.source_id == item.data.id


async def test_the_session_token_never_appears_in_the_log(
    url: str, operator: HttpControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    item, secret = await claim(operator)
    async with HttpControlPlane.open(url, key=secret) as agent:
        await agent.delegate(item.data.id, "task")
        with pytest.raises(Unauthorized) as refused:
            await agent.get(item.id)
    assert secret not in caplog.text
    assert secret not in str(refused.value)
