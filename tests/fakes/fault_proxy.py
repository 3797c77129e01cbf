"""An HTTP fault proxy for tests: put it between a client and an OpenAI-compatible server (the fake) and
it breaks chosen requests, each chosen by its number among the requests to ``paths``, never by time.

    with FaultProxy(fake.base_url, {2: "reset", 5: "partial", 7: "slow", 9: "lost"}) as proxy:
        cfg = ... base_url=proxy.base_url ...

Faults (``plan``: request number, 1-based, -> fault):

- ``reset``: the connection is reset (RST) before the request is forwarded: the server never sees it;
- ``lost``: forwarded and answered, then the connection is reset before a byte of the answer is sent
  (the server did the work; the client must ask again, and gets the same answer);
- ``partial``: the status line, the headers and half the body, then the connection closes;
- ``slow``: the answer is sent in ``slow_pieces`` pieces, ``slow_s`` apart (inside any deadline);
- ``stall``: nothing is sent back until the client gives up (its request deadline).

Requests to other paths, and unplanned ones, are forwarded untouched. Every request is forwarded on a
fresh upstream connection (``Connection: close``); ``log`` lists (number, path, fault) of every counted
request. Runs in a background thread with its own event loop, on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Self
from urllib.parse import urlsplit

FAULTS = ("reset", "lost", "partial", "slow", "stall")


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _with_close(head: bytes) -> bytes:
    lines = [line for line in head.rstrip(b"\r\n").split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


class FaultProxy:
    def __init__(self, upstream_base_url: str, plan: dict[int, str] | None = None,
                 paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions"),
                 slow_s: float = 0.05, slow_pieces: int = 6):
        bad = {n: f for n, f in (plan or {}).items() if f not in FAULTS}
        if bad:
            raise ValueError(f"unknown faults {bad}: expected {FAULTS}")
        parts = urlsplit(upstream_base_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.prefix = parts.path.rstrip("/")
        self.plan, self.paths = dict(plan or {}), paths
        self.slow_s, self.slow_pieces = slow_s, slow_pieces
        self.log: list[tuple[int, str, str | None]] = []
        self.port = 0
        self._count = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def faults_done(self) -> dict[str, int]:
        with self._lock:
            done: dict[str, int] = {}
            for _, _, fault in self.log:
                if fault:
                    done[fault] = done.get(fault, 0) + 1
            return done

    async def _forward(self, head: bytes, body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(_with_close(head) + body)
            await writer.drain()
            return await reader.read()  # until the upstream closes (Connection: close)
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                length = int(_header(head, b"content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                path = head.split(b" ", 2)[1].decode("latin-1").split("?", 1)[0]
                fault = None
                if path in self.paths:
                    with self._lock:
                        self._count += 1
                        number = self._count
                        fault = self.plan.get(number)
                        self.log.append((number, path, fault))
                if fault == "reset":
                    writer.transport.abort()
                    return
                if fault == "stall":
                    await reader.read()  # until the client closes the connection
                    writer.transport.abort()
                    return
                answer = await self._forward(head, body)
                if fault == "lost":
                    writer.transport.abort()
                    return
                if fault == "partial":
                    split = answer.find(b"\r\n\r\n") + 4
                    writer.write(answer[: split + max(1, (len(answer) - split) // 2)])
                    await writer.drain()
                    writer.close()
                    return
                if fault == "slow":
                    step = -(-len(answer) // self.slow_pieces)
                    for i in range(0, len(answer), step):
                        writer.write(answer[i: i + step])
                        await writer.drain()
                        await asyncio.sleep(self.slow_s)
                else:
                    writer.write(answer)
                    await writer.drain()
                writer.close()  # the upstream answered with Connection: close; so do we
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            async def close() -> None:
                self._server.close()
                await self._server.wait_closed()
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
