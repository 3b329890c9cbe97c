"""``ChaosProxy``: an HTTP/1.1 proxy on loopback that injects network faults.

Put it between workers and a control-plane server to see what real sockets,
a real HTTP client and a real server do when the network misbehaves. For
each request it draws (from its seeded ``random.Random``) one of:

* **pass**: forwarded both ways after a random latency;
* **error**: a ``503`` made up by the proxy, the server never sees the request;
  a request may also start a **burst**, during which every request gets one;
* **drop**: the client's connection is reset before the request is forwarded;
* **reset**: the request is forwarded and fully answered by the server, then
  the client's connection is reset: the call happened, the caller never heard
  (the case a fencing token exists for);
* **truncate**: the server's answer is cut in the middle and the connection
  closed.

The proxy understands just enough HTTP/1.1 to find where requests and
responses end (``Content-Length``, chunked bodies, bodiless statuses), so it
injects faults per request even on kept-alive connections. It records every
request with the server's real status, so a checker can count, for instance,
how many ``stop`` calls the server accepted per item whatever the workers saw.

It listens on ``127.0.0.1`` only, and ``calm()`` (or ``max_faults``) turns
the faults off so that a run can converge before it is checked.
"""

from __future__ import annotations

import enum
import json
import math
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Final

import attrs
import trio

__all__ = ["ChaosProxy", "ProxyFault", "ProxyFaults", "ProxyRecord"]

_MAX_HEAD: Final = 64 * 1024
_BODILESS: Final = frozenset({204, 304})


class ProxyFault(enum.StrEnum):
    """What the proxy did to one request."""

    PASS = "pass"
    ERROR = "error"
    DROP = "drop"
    RESET = "reset"
    TRUNCATE = "truncate"


def _rate(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and 0 <= value <= 1):
        raise ValueError(f"{attribute.name} must be a probability, got {value!r}")


@attrs.frozen(kw_only=True)
class ProxyFaults:
    """How often each fault happens, per request.

    Attributes:
        latency: range of the delay added in each direction, in seconds.
        error_rate: chance of a made-up 503.
        burst_rate: chance that a request starts a burst of 503s.
        burst_duration: range of a burst's length, in seconds.
        drop_rate: chance the connection is reset before the request is forwarded.
        reset_rate: chance the connection is reset after the server answered.
        truncate_rate: chance the answer is cut in the middle.
        max_faults: after this many injected faults the proxy only forwards
            (``None``: no limit).
    """

    latency: tuple[float, float] = (0.0, 0.05)
    error_rate: float = attrs.field(default=0.03, validator=_rate)
    burst_rate: float = attrs.field(default=0.005, validator=_rate)
    burst_duration: tuple[float, float] = (0.5, 2.0)
    drop_rate: float = attrs.field(default=0.02, validator=_rate)
    reset_rate: float = attrs.field(default=0.03, validator=_rate)
    truncate_rate: float = attrs.field(default=0.03, validator=_rate)
    max_faults: int | None = None


@attrs.frozen
class ProxyRecord:
    """One request through the proxy.

    Attributes:
        method: the HTTP method.
        path: the request target (path and query).
        fault: what the proxy did.
        status: the status the *server* answered (``None`` when the request never
            reached it or its answer could not be read).
        at: trio time the request was read.
    """

    method: str
    path: str
    fault: ProxyFault
    status: int | None
    at: float


class _Closed(Exception):
    """The peer closed the connection between messages."""


class _Garbled(Exception):
    """Not HTTP/1.1 as far as the proxy can tell."""


class _Reader:
    """Buffered reads of HTTP/1.1 messages from one stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _more(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    async def head(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return head
            if len(self.buffer) > _MAX_HEAD:
                raise _Garbled("header section too large")
            if not await self._more():
                if self.buffer:
                    raise _Garbled("connection closed inside a header section")
                raise _Closed

    async def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not await self._more():
                raise _Garbled("connection closed inside a body")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) > _MAX_HEAD or not await self._more():
                raise _Garbled("bad chunked body")

    async def chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = await self.line()
            out += size_line
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _Garbled("bad chunk size") from None
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await self.line()
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            out += await self.exactly(size + 2)

    async def rest(self) -> bytes:
        while await self._more():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


async def _body(reader: _Reader, fields: dict[str, str], *, response: bool) -> bytes | None:
    """The body after a head; ``None`` means "until the connection closes"."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return await reader.chunked()
    length = fields.get("content-length")
    if length is not None:
        try:
            count = int(length)
        except ValueError:
            raise _Garbled("bad Content-Length") from None
        return await reader.exactly(count)
    return None if response else b""


def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close send an RST instead of a FIN."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


_UNAVAILABLE: Final = json.dumps(
    {"error": {"type": "unavailable", "message": "injected by the chaos proxy"}}
).encode()


def _service_unavailable() -> bytes:
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(_UNAVAILABLE)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + _UNAVAILABLE


class ChaosProxy:
    """A fault-injecting proxy from ``127.0.0.1`` to one upstream HTTP server.

    ``url = await nursery.start(proxy.run)`` returns the proxy's base URL once
    it listens; cancel the nursery to stop it (open connections are closed).

    Args:
        upstream_port: the server's port on ``127.0.0.1``.
        faults: fault rates.
        seed: seeds the per-request draws (connections interleave in real time,
            so a run is not replayed exactly, only its fault mix).
        observer: called with every request's :class:`ProxyRecord`.
    """

    def __init__(
        self,
        upstream_port: int,
        faults: ProxyFaults | None = None,
        *,
        seed: int = 0,
        observer: Callable[[ProxyRecord], None] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.faults = faults if faults is not None else ProxyFaults()
        self.observer = observer
        self._rng = random.Random(f"chaos-proxy:{seed}")
        self._burst_until = -math.inf
        self._calm = False
        self.requests = 0
        self.connections = 0
        #: Injected faults by kind (``pass`` counts the requests forwarded untouched).
        self.counts: Counter[str] = Counter()
        self.records: list[ProxyRecord] = []

    def calm(self) -> None:
        """Stop injecting faults: from now on every request is forwarded untouched."""
        self._calm = True

    @property
    def injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != ProxyFault.PASS)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(f"http://127.0.0.1:{port}")
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    # --- per connection ------------------------------------------------------

    def _draw(self) -> ProxyFault:
        faults = self.faults
        now = trio.current_time()
        roll = self._rng.random()
        if self._calm or (faults.max_faults is not None and self.injected >= faults.max_faults):
            return ProxyFault.PASS
        if now < self._burst_until:
            return ProxyFault.ERROR
        if self._rng.random() < faults.burst_rate:
            self._burst_until = now + self._rng.uniform(*faults.burst_duration)
            return ProxyFault.ERROR
        for fault, rate in (
            (ProxyFault.ERROR, faults.error_rate),
            (ProxyFault.DROP, faults.drop_rate),
            (ProxyFault.RESET, faults.reset_rate),
            (ProxyFault.TRUNCATE, faults.truncate_rate),
        ):
            if roll < rate:
                return fault
            roll -= rate
        return ProxyFault.PASS

    def _record(self, method: str, path: str, fault: ProxyFault, status: int | None) -> None:
        self.counts[fault.value] += 1
        record = ProxyRecord(method, path, fault, status, trio.current_time())
        self.records.append(record)
        if self.observer is not None:
            self.observer(record)

    async def _latency(self) -> None:
        low, high = self.faults.latency
        if high > 0:
            await trio.sleep(self._rng.uniform(low, high))

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with client:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
                async with upstream:
                    await self._relay(client, upstream)
        except (_Closed, _Garbled, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # one connection's trouble; the proxy goes on

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        from_client = _Reader(client)
        from_server = _Reader(upstream)
        while True:
            head = await from_client.head()
            request_line, fields = _headers(head)
            method, _, rest = request_line.partition(" ")
            path = rest.rpartition(" ")[0]
            body = await _body(from_client, fields, response=False)
            self.requests += 1
            fault = self._draw()
            if fault is ProxyFault.ERROR:
                self._record(method, path, fault, None)
                await client.send_all(_service_unavailable())
                return
            if fault is ProxyFault.DROP:
                self._record(method, path, fault, None)
                _reset(client)
                return
            await self._latency()
            await upstream.send_all(head + (body or b""))
            answer = await from_server.head()
            status_line, answer_fields = _headers(answer)
            status = int(status_line.split(" ")[1])
            if method == "HEAD" or status in _BODILESS or 100 <= status < 200:
                answer_body: bytes | None = b""
            else:
                answer_body = await _body(from_server, answer_fields, response=True)
            until_close = answer_body is None
            if answer_body is None:
                answer_body = await from_server.rest()
            self._record(method, path, fault, status)
            whole = answer + answer_body
            if fault is ProxyFault.RESET:
                _reset(client)
                return
            if fault is ProxyFault.TRUNCATE:
                await client.send_all(whole[: max(1, len(whole) // 2)])
                return
            await self._latency()
            await client.send_all(whole)
            if until_close or answer_fields.get("connection", "").lower() == "close":
                return
