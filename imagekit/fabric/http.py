"""A small, bounded HTTP/1.1 server for the fabric: the app is a plain function ``Request -> Response``.

The guest is untrusted, so the wire format is parsed by h11 (a strict HTTP/1.1 parser: request line,
header syntax, ``Content-Length`` and chunked framing) and the server is asyncio, one event loop per
listening socket on a thread of its own, so an idle or trickling connection costs a few kilobytes, not a
thread. What it enforces (:class:`Limits`):

- a request head of at most ``max_header_bytes``, complete within ``header_timeout`` however the client
  trickles ("slowloris"); a client silent for ``read_timeout`` is cut; no connection lives longer than
  ``connection_deadline``;
- request bodies only with a valid ``Content-Length`` no larger than ``max_body`` (else 413/400, answered
  without reading the body); chunked uploads are refused with 411 (the agents never send them);
- at most ``max_connections`` concurrent connections per socket: the excess gets a 503 and is closed at
  once, and a listen backlog of ``backlog`` so that a burst of connections is queued, not dropped;
- one request per connection (``Connection: close``), so a connection's lifetime is one exchange;
- anything the parser refuses is a 4xx naming what was wrong; any exception in the app becomes a 500 for
  that request, logged without the body; the server keeps serving.

Every answered request, including refused and malformed ones, is reported to ``on_served`` (method, path,
status; never headers or body).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import socket
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import h11

log = logging.getLogger(__name__)

_PRINTABLE = MappingProxyType({i: "?" for i in range(32)} | {127: "?"})
_MAX_QUERY_FIELDS = 50
_MAX_HEADERS = 100
_LINGER = 1.0


@dataclass(frozen=True)
class Limits:
    max_body: int = 1024 * 1024
    read_timeout: float = 10.0  # per socket read
    header_timeout: float = 10.0  # the whole request head, however the client trickles
    connection_deadline: float = 30.0  # whole connection
    max_connections: int = 256  # concurrent, per socket; the guest's relay allows fewer per endpoint
    max_header_bytes: int = 64 * 1024
    backlog: int = 512


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # the raw request target (path and query)
    path: str  # decoded path without the query
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; a repeated header keeps its first value
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


App = Callable[[Request], Response]
OnServed = Callable[[str, str, int], None]  # method, target (sanitized), status


def sanitize(text: str, limit: int = 512) -> str:
    """Make a client-supplied string safe for records (no control characters, bounded)."""
    text = text.translate(_PRINTABLE)
    return text if len(text) <= limit else text[:limit] + "…"


def escape(text: str, limit: int = 256) -> str:
    """Guest text made safe for one log line: every control, format, line- or paragraph-separator character
    (and the backslash) written as a Python-style escape, so no guest text can end a line or forge the
    next one; at most ``limit`` characters of the text are shown, then how many more there were."""
    shown, rest = text[:limit], len(text) - limit
    out = []
    for ch in shown:
        cat = unicodedata.category(ch)
        if ch == "\\":
            out.append("\\\\")
        elif cat[0] == "C" or cat in ("Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out) + (f"…[{rest} more characters]" if rest > 0 else "")


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _encode(response: Response, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_reason(response.status)}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Server: imagekit-fabric",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def _refusal(status: int, reason: str) -> Response:
    return Response(status, f"{_reason(status)}: {reason}\n".encode("utf-8", "replace"))


class _Refused(Exception):
    """The request cannot be served; ``response`` says why."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Exchange:
    """One connection: read one request under the limits, answer it, close."""

    def __init__(self, server: _Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.method = ""
        self.target = ""
        self.received = 0
        self.answered = False

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.limits.connection_deadline):
                try:
                    request = await self._read()
                except _Refused as refused:
                    await self._reply(refused.response)
                    return
                except TimeoutError:
                    # Only a client that started a request is told; an idle connection is just closed.
                    if self.received:
                        await self._reply(_refusal(408, "the request was not received in time"))
                    return
                if request is not None:
                    await self._reply(self.server.call_app(request))
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _receive(self, conn: h11.Connection, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.read_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - loop.time())
        if timeout <= 0:
            raise TimeoutError
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        self.received += len(data)
        conn.receive_data(data)  # b"" is the end of the client's stream

    async def _read(self) -> Request | None:
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        head_deadline: float | None = asyncio.get_running_loop().time() + limits.header_timeout
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                raise _Refused(_refusal(status, f"malformed request ({exc})")) from None
            except ValueError as exc:  # anything h11 did not turn into a protocol error
                raise _Refused(_refusal(400, f"malformed request ({type(exc).__name__})")) from None
            if event is h11.NEED_DATA:
                await self._receive(conn, head_deadline)
            elif isinstance(event, h11.Request):
                head, head_deadline = event, None
                self._check_head(event)
            elif isinstance(event, h11.Data):
                body += event.data  # only up to the Content-Length checked in _check_head
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return self._request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None  # closed before sending anything
            else:
                raise _Refused(_refusal(400, "malformed request"))

    def _check_head(self, head: h11.Request) -> None:
        self.method = head.method.decode("ascii", "replace")
        self.target = head.target.decode("ascii", "replace")
        if head.http_version not in (b"1.0", b"1.1"):
            raise _Refused(_refusal(505, "only HTTP/1.0 and HTTP/1.1 are served"))
        # h11 bounds only an incomplete head; a complete one is bounded here.
        if len(head.target) > self.limits.max_header_bytes:
            raise _Refused(_refusal(414, f"the request target is longer than {self.limits.max_header_bytes} bytes"))
        size = sum(len(name) + len(value) + 4 for name, value in head.headers)
        if len(head.headers) > _MAX_HEADERS or size > self.limits.max_header_bytes:
            raise _Refused(_refusal(
                431, f"more than {_MAX_HEADERS} header fields or {self.limits.max_header_bytes} bytes of them"))
        lengths: list[bytes] = []
        for name, value in head.headers:
            if name == b"transfer-encoding":
                raise _Refused(_refusal(411, "chunked bodies are not accepted; send a Content-Length"))
            if name == b"content-length":
                lengths.append(value)
        # h11 has checked the value: ASCII digits, one value. A 20-digit length is refused unread.
        if lengths and (len(lengths[0]) > 18 or int(lengths[0]) > self.limits.max_body):
            raise _Refused(_refusal(413, f"the body is larger than {self.limits.max_body} bytes"))

    def _request(self, head: h11.Request, body: bytes) -> Request:
        if not head.target.isascii():
            raise _Refused(_refusal(400, "the request target is not ASCII"))
        target = head.target.decode("ascii")
        try:
            split = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
            path = urllib.parse.unquote(split.path, errors="strict")
        except ValueError:
            reason = "invalid request target (bad escapes, or more than 50 query fields)"
            raise _Refused(_refusal(400, reason)) from None
        headers: dict[str, str] = {}
        for name, value in head.headers:
            headers.setdefault(name.decode("ascii", "replace"), value.decode("latin-1"))
        return Request(self.method, target, path, query, headers, body)

    async def _reply(self, response: Response) -> None:
        if self.answered:
            return
        self.answered = True
        self.server.record(self.method, self.target, response.status)
        self.writer.write(_encode(response, self.method == "HEAD"))
        await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()
        # Read what the client still sends (a refused body) for a moment, so that closing does not reset
        # the connection before the client has read the answer; at most a second and max_body bytes.
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(_LINGER):
                drained = 0
                while drained <= self.limits.max_body and (data := await self.reader.read(65536)):
                    drained += len(data)


class _Server:
    """One listening socket served by an event loop on its own thread."""

    def __init__(
        self, sock: socket.socket, app: App, on_served: OnServed, limits: Limits, name: str, service: str
    ) -> None:
        self.sock = sock
        self.app = app
        self.on_served = on_served
        self.limits = limits
        self.name = name
        self.service = service
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"fabric-{service}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(self._listen())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _listen(self) -> asyncio.Server:
        if self.sock.family == socket.AF_UNIX:
            return await asyncio.start_unix_server(self._accept, sock=self.sock, backlog=self.limits.backlog)
        return await asyncio.start_server(self._accept, sock=self.sock, backlog=self.limits.backlog)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        over = len(self._tasks) >= self.limits.max_connections
        self._tasks.add(task)
        try:
            if over:
                log.warning("%s: %s: more than %d connections, refusing one", self.name, self.service,
                            self.limits.max_connections)
                self.record("", "", 503)
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write(_encode(_refusal(503, "too many connections"), False))
                return
            await _Exchange(self, reader, writer).run()
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def call_app(self, request: Request) -> Response:
        try:
            return self.app(request)
        except Exception:
            log.exception("%s: %s handler failed for %s %s", self.name, self.service,
                          escape(request.method, 16), escape(request.target))
            return Response(500, b"internal error\n")

    def record(self, method: str, target: str, status: int) -> None:
        method, target = sanitize(method, 16), sanitize(target)
        # Recorded before the answer is sent, so a client that has its answer always finds the record.
        log.debug("%s: %s %s %s -> %d", self.name, self.service, method, target, status)
        try:
            self.on_served(method, target, status)
        except Exception:
            log.exception("%s: recording a request failed", self.name)

    def active_count(self) -> int:
        return len(self._tasks)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def close(self, grace: float = 5.0) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            self.thread.join(timeout=grace)
        self.sock.close()


class RunningServer:
    """A server and the thread that runs it; ``close()`` stops both and removes a Unix socket file."""

    def __init__(self, server: _Server, unix_path: str | None = None) -> None:
        self.server = server
        self.unix_path = unix_path

    @property
    def address(self) -> Any:
        return self.server.sock.getsockname()

    def active_count(self) -> int:
        return self.server.active_count()

    def close(self, grace: float = 5.0) -> None:
        self.server.close(grace)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


def _serve(sock: socket.socket, app: App, on_served: OnServed, limits: Limits, name: str, service: str) -> _Server:
    server = _Server(sock, app, on_served, limits, name, service)
    server.start()
    return server


def serve_unix(path: str, app: App, on_served: OnServed, limits: Limits, name: str, service: str) -> RunningServer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        os.chmod(path, 0o600)
        sock.listen(limits.backlog)
        server = _serve(sock, app, on_served, limits, name, service)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return RunningServer(server, path)


def serve_tcp(
    host: str, port: int, app: App, on_served: OnServed, limits: Limits, name: str, service: str
) -> RunningServer:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(limits.backlog)
        server = _serve(sock, app, on_served, limits, name, service)
    except BaseException:
        sock.close()
        raise
    return RunningServer(server)
