"""ChaosProxy in front of the real reference server on 127.0.0.1: each fault as a client sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor import ControlPlaneUnavailable, TransientError
from supervisor.controlplane import HttpControlPlane, SQLiteStore, open_control_plane_server
from supervisor.controlplane._embedded import STORE_FILENAME
from supervisor.testing import ChaosProxy, ProxyFault, ProxyFaults
from supervisor.testing._proxy import _body, _Reader

KEY = "chaos-test-key-0123456789"
NONE = ProxyFaults(
    latency=(0.0, 0.0),
    error_rate=0,
    burst_rate=0,
    drop_rate=0,
    reset_rate=0,
    truncate_rate=0,
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, SQLiteStore]]:
    store = SQLiteStore(tmp_path / STORE_FILENAME)
    try:
        async with open_control_plane_server(store, key_provider=KEY) as url:
            yield url, store
    finally:
        store.close()


async def through(
    server: tuple[str, SQLiteStore], faults: ProxyFaults, nursery: trio.Nursery
) -> tuple[ChaosProxy, str]:
    url, _ = server
    proxy = ChaosProxy(int(url.rsplit(":", 1)[1]), faults, seed=1)
    return proxy, await nursery.start(proxy.run)


def submitted(server: tuple[str, SQLiteStore]) -> int:
    _, store = server
    return len(store.list_work("default", now=2e9))


async def test_without_faults_requests_pass_and_keep_their_connection(
    server: tuple[str, SQLiteStore],
) -> None:
    async with trio.open_nursery() as nursery:
        proxy, url = await through(server, NONE, nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            for n in range(5):
                await plane.submit(f"task {n}")
            assert len(await plane.list_work()) == 5
        nursery.cancel_scope.cancel()
    assert proxy.requests == 6
    assert proxy.connections == 1  # kept alive: the proxy framed six requests on one socket
    assert [r.status for r in proxy.records] == [201] * 5 + [200]
    assert proxy.injected == 0


async def test_error_is_a_made_up_503_the_server_never_sees(
    server: tuple[str, SQLiteStore],
) -> None:
    async with trio.open_nursery() as nursery:
        proxy, url = await through(server, ProxyFaults(latency=(0, 0), error_rate=1.0), nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            with pytest.raises(TransientError) as caught:
                await plane.submit("task")
        nursery.cancel_scope.cancel()
    assert caught.value.status_code == 503
    assert submitted(server) == 0
    assert proxy.records[0].fault is ProxyFault.ERROR and proxy.records[0].status is None


async def test_drop_resets_before_the_server_sees_the_request(
    server: tuple[str, SQLiteStore],
) -> None:
    faults = ProxyFaults(latency=(0, 0), error_rate=0, drop_rate=1.0)
    async with trio.open_nursery() as nursery:
        _, url = await through(server, faults, nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            with pytest.raises(ControlPlaneUnavailable):
                await plane.submit("task")
        nursery.cancel_scope.cancel()
    assert submitted(server) == 0


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_reset_or_truncate_after_the_server_answered_loses_only_the_answer(
    server: tuple[str, SQLiteStore], kind: str
) -> None:
    faults = ProxyFaults(latency=(0, 0), error_rate=0, **{f"{kind}_rate": 1.0})  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        proxy, url = await through(server, faults, nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            with pytest.raises(ControlPlaneUnavailable):
                await plane.submit("task")
        nursery.cancel_scope.cancel()
    assert submitted(server) == 1  # it happened; the client never heard
    assert proxy.records[0].status == 201
    assert proxy.records[0].fault.value == kind


async def test_a_burst_answers_503_to_everything_for_a_while(
    server: tuple[str, SQLiteStore],
) -> None:
    # Real sockets, so the real clock (a mock clock would jump while they wait);
    # the burst is a fraction of a second.
    faults = ProxyFaults(latency=(0, 0), error_rate=0, burst_rate=1.0, burst_duration=(0.3, 0.3))
    async with trio.open_nursery() as nursery:
        proxy, url = await through(server, faults, nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            for _ in range(3):
                with pytest.raises(TransientError):
                    await plane.stats()
            proxy.faults = NONE
            with pytest.raises(TransientError):
                await plane.stats()  # still inside the burst
            await trio.sleep(0.4)
            await plane.stats()
        nursery.cancel_scope.cancel()
    assert proxy.counts == {"error": 4, "pass": 1}


async def test_calm_and_max_faults_stop_the_faults(server: tuple[str, SQLiteStore]) -> None:
    faults = ProxyFaults(latency=(0, 0), error_rate=1.0, max_faults=2)
    async with trio.open_nursery() as nursery:
        proxy, url = await through(server, faults, nursery)
        async with HttpControlPlane.open(url, key=KEY) as plane:
            for _ in range(2):
                with pytest.raises(TransientError):
                    await plane.stats()
            await plane.stats()  # the budget is spent
            proxy.faults = ProxyFaults(latency=(0, 0), error_rate=1.0)
            proxy.calm()
            await plane.stats()
        nursery.cancel_scope.cancel()
    assert proxy.injected == 2


async def test_chunked_bodies_are_framed_to_their_end() -> None:
    left, right = trio.testing.memory_stream_pair()
    reader = _Reader(right)  # type: ignore[arg-type]
    await left.send_all(b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT")
    body = await _body(reader, {"transfer-encoding": "chunked"}, response=True)
    assert body is not None and body.startswith(b"4\r\nwiki") and body.endswith(b"x\r\n\r\n")
    assert bytes(reader.buffer) == b"NEXT"


def test_fault_rates_are_probabilities() -> None:
    with pytest.raises(ValueError, match="reset_rate"):
        ProxyFaults(reset_rate=2.0)


async def test_the_proxy_listens_on_loopback_only(server: tuple[str, SQLiteStore]) -> None:
    async with trio.open_nursery() as nursery:
        _, url = await through(server, NONE, nursery)
        nursery.cancel_scope.cancel()
    assert url.startswith("http://127.0.0.1:")
