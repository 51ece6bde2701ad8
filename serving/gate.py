"""The HTTP request gate in front of tritonserver: tritonserver's HTTP endpoint has no bound on a request's size or
on its JSON nesting (a body of a few million ``[`` crashes the server in nvidia-pytriton's build), so `vpsde serve`
runs it on a private loopback port and listens on the public one with this HTTP/1.1 relay. A request passes when
its head is under :data:`MAX_HEAD` bytes, its body has a Content-Length of at most ``max_body`` bytes (no chunked
uploads) and its JSON part nests at most ``max_depth`` deep; otherwise it is answered 411 / 413 / 400 / 431 with
one line in Triton's error format and the connection is closed. Everything else is relayed unchanged, one
upstream connection per client connection, so keep-alive works as with tritonserver itself."""

from __future__ import annotations

import asyncio
import json
import threading

from vpsde.runtime.jsondepth import json_depth

MAX_HEAD = 64 * 1024
"""Bytes of request line and headers."""
DEFAULT_MAX_DEPTH = 32
"""Triton's inference JSON nests 3 deep plus one level per tensor dimension when data is nested."""


class RequestGate:
    """Listens on ``host:port`` and relays checked requests to tritonserver's HTTP endpoint on
    ``127.0.0.1:upstream_port``; runs an asyncio loop in a daemon thread (``start``/``stop``)."""

    def __init__(self, host: str, port: int, upstream_port: int, max_body: int,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.max_body, self.max_depth = max_body, max_depth
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vpsde-gate", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._idle: set[asyncio.Task] = set()  # connections waiting for their client's next request
        self._closing = False

    def start(self) -> None:
        """Bind the public port (OSError if taken) and start relaying."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, self.port, limit=MAX_HEAD), self._loop).result()

    def close(self) -> None:
        """Stop taking connections and close the idle ones (tritonserver waits for every open connection before it
        exits); a request in flight still gets its response, then its connection closes."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=5)

    def stop(self) -> None:
        """Close every connection and end the relay's thread."""
        if self._thread.is_alive():
            self.close()
            asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def _close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in self._idle:
            task.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not self._closing:
                self._idle.add(asyncio.current_task())
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    return await _refuse(reader, writer, 431, f"request head over {MAX_HEAD} bytes")
                finally:
                    self._idle.discard(asyncio.current_task())
                headers = _headers(head)
                if headers is None or len(head.split(b"\r\n", 1)[0].split(b" ")) != 3:  # METHOD TARGET VERSION
                    return await _refuse(reader, writer, 400, "malformed HTTP request head")
                if "transfer-encoding" in headers:
                    return await _refuse(reader, writer, 411, "send the body with a Content-Length (chunked uploads are "
                                                      "not accepted)")
                length = headers.get("content-length", "0")
                if not length.isdigit():
                    return await _refuse(reader, writer, 400, f"Content-Length: expected a byte count, got {length[:40]!r}")
                if int(length) > self.max_body:
                    return await _refuse(reader, writer, 413, f"request body of {int(length)} bytes; this server takes at "
                                                      f"most {self.max_body} (vpsde serve --max-request-mib)")
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                body = await reader.readexactly(int(length))
                json_part = body[:int(headers["inference-header-content-length"])] \
                    if headers.get("inference-header-content-length", "").isdigit() else body
                depth = json_depth(json_part)
                if depth > self.max_depth:
                    return await _refuse(reader, writer, 400, f"request JSON nests {depth} deep; at most {self.max_depth} "
                                                      "is accepted")
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=MAX_HEAD)
                upstream[1].write(head + body)
                await upstream[1].drain()
                if not await _relay_response(upstream[0], writer, head.startswith(b"HEAD ")):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:  # closed by close() or stop(); ending quietly (Python 3.11's stream callback
            return                      # calls exception() on a cancelled task and logs the CancelledError)
        finally:
            for w in ((upstream[1],) if upstream else ()) + (writer,):
                w.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _headers(head: bytes) -> dict[str, str] | None:
    """A request's or response's header fields (names lower-cased) after its start line; None if one is malformed."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                return None
            headers[name.strip().lower()] = value.strip()
    return headers


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(ln for ln in lines if ln.split(b":", 1)[0].strip().lower() != name)


LINGER_S = 5.0
"""After a refusal, how long the rest of the request is read and dropped, so the client reads the answer instead of
a reset connection."""


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, why: str) -> None:
    reason = {400: "Bad Request", 411: "Length Required", 413: "Payload Too Large",
              431: "Request Header Fields Too Large"}[status]
    body = json.dumps({"error": f"vpsde serve: {why}"}).encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    try:
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(_drop_rest(reader), LINGER_S)
    except (ConnectionError, asyncio.TimeoutError, asyncio.LimitOverrunError):
        pass


async def _drop_rest(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 20):
        pass


async def _relay_response(upstream: asyncio.StreamReader, writer: asyncio.StreamWriter, head_request: bool) -> bool:
    """Copy one response (Content-Length, chunked, or until close) to the client; False when the connection
    ends with it."""
    head = await upstream.readuntil(b"\r\n\r\n")
    writer.write(head)
    headers = _headers(head) or {}
    status = int(head.split(b" ", 2)[1]) if head[:5] == b"HTTP/" else 0
    keep = headers.get("connection", "").lower() != "close"
    if head_request or status in (204, 304) or 100 <= status < 200:
        pass
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            chunk = await upstream.read(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError("upstream closed mid-response")
            writer.write(chunk)
            remaining -= len(chunk)
            await writer.drain()
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await upstream.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            writer.write(size_line + await upstream.readexactly(size + 2))
            await writer.drain()
            if size == 0:
                break
    else:
        while chunk := await upstream.read(1 << 20):
            writer.write(chunk)
            await writer.drain()
        keep = False
    await writer.drain()
    return keep
