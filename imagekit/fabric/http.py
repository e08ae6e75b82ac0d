"""A small, bounded HTTP/1.1 server for the fabric: the app is a plain function ``Request -> Response``.

Built on :mod:`http.server` for request-line and header parsing (its limits: 64 KiB per line, 100 header
lines), plus what a service facing untrusted guests needs:

- request bodies only with a valid ``Content-Length`` no larger than ``Limits.max_body`` (else 413/411/400,
  answered without reading the body); chunked uploads are refused (the agents never send them);
- a per-read socket timeout and a hard per-connection deadline (a watchdog shuts the socket down), so an
  idle or trickling client ("slowloris") holds a thread for a bounded time;
- a cap on concurrent connections (extra ones are closed at once);
- one request per connection (``Connection: close``), so a connection's lifetime is one exchange;
- any exception in the app becomes a 500 for that request and is logged without the body; the server
  keeps serving.

Every answered request, including refused and malformed ones, is reported to ``on_served`` (method, path,
status; never headers or body).
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

log = logging.getLogger("imagekit.fabric")

_PRINTABLE = MappingProxyType({i: "?" for i in range(32)} | {127: "?"})


@dataclass(frozen=True)
class Limits:
    max_body: int = 1024 * 1024
    read_timeout: float = 10.0  # per socket read
    connection_deadline: float = 30.0  # whole connection, however the client trickles
    max_connections: int = 32


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
    """Make a client-supplied string safe for records and logs (no control characters, bounded)."""
    text = text.translate(_PRINTABLE)
    return text if len(text) <= limit else text[:limit] + "…"


class _Handler(http.server.BaseHTTPRequestHandler):
    # Constants only; all state is per instance or on the server object.
    protocol_version = "HTTP/1.1"
    server_version = "imagekit-fabric"
    sys_version = ""

    server: _ServerMixin  # type: ignore[assignment]

    def setup(self) -> None:
        limits = self.server.limits
        self.request.settimeout(limits.read_timeout)
        super().setup()
        self._answered = False
        self._watchdog = threading.Timer(limits.connection_deadline, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        # Unblocks a read in progress: the handler sees EOF or an error and ends.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def address_string(self) -> str:
        # Unix-socket peers have no address tuple; the VM is named by the server's log prefix.
        return self.server.name

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged once, in _reply, without bodies

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Called by parse_request for malformed request lines, bad versions, too many/too long headers.
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._reply(Response(code, (text + "\n").encode("utf-8", "replace")))

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.command = ""
        self.path = ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            return
        if not self.raw_requestline:
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = "HTTP/1.1"
            self.send_error(414, "Request-URI Too Long")
            return
        try:
            ok = self.parse_request()
        except (TimeoutError, OSError):
            return
        if not ok:
            if not self._answered:
                self.send_error(400, "Bad request")
            return
        self.close_connection = True
        body = self._read_body()
        if body is None:
            return
        request = self._request(body)
        if request is None:
            return
        try:
            response = self.server.app(request)
        except Exception:
            log.exception(
                "%s: %s handler failed for %s %s",
                self.server.name,
                self.server.service,
                self.command,
                sanitize(self.path),
            )
            response = Response(500, b"internal error\n")
        self._reply(response)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding") is not None:
            self.send_error(411, "Length Required (chunked bodies are not accepted)")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            self.send_error(400, "Bad request (invalid Content-Length)")
            return None
        length = int(lengths[0].strip())
        if length > self.server.limits.max_body:
            self.send_error(413, f"Payload Too Large (limit {self.server.limits.max_body} bytes)")
            return None
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            return None
        if len(body) != length:
            return None  # the client went away or the deadline passed mid-body
        return body

    def _request(self, body: bytes) -> Request | None:
        try:
            split = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True, max_num_fields=50)
            path = urllib.parse.unquote(split.path, errors="strict")
        except ValueError:
            self.send_error(400, "Bad request (invalid request target)")
            return None
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), value)
        return Request(self.command, self.path, path, query, headers, body)

    def _reply(self, response: Response) -> None:
        if self._answered:
            return
        self._answered = True
        # Always frame answers as HTTP/1.1, also for HTTP/0.9-style or unparsable request lines, so that
        # every client sees a status line.
        self.request_version = "HTTP/1.1"
        status = response.status
        target = sanitize(self.path or "")
        method = sanitize(self.command or "", 16)
        # Recorded before the answer is sent, so a client that has its answer always finds the record.
        log.debug("%s: %s %s %s -> %d", self.server.name, self.server.service, method, target, status)
        try:
            self.server.on_served(method, target, status)
        except Exception:
            log.exception("%s: recording a request failed", self.server.name)
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Connection", "close")
            for name, value in response.headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            self.wfile.flush()
        except (TimeoutError, OSError):
            pass


class _ServerMixin(socketserver.ThreadingMixIn):
    daemon_threads = True
    block_on_close = False
    app: App
    on_served: OnServed
    limits: Limits
    name: str
    service: str

    def _setup_fabric(self, app: App, on_served: OnServed, limits: Limits, name: str, service: str) -> None:
        self.app = app
        self.on_served = on_served
        self.limits = limits
        self.name = name
        self.service = service
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            over = len(self._active) >= self.limits.max_connections
            if not over:
                self._active.add(request)
        if over:
            log.warning("%s: %s: too many connections, refusing one", self.name, self.service)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._active_lock:
            self._active.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def close_active(self) -> None:
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def active_count(self) -> int:
        with self._active_lock:
            return len(self._active)


class UnixHTTPServer(_ServerMixin, socketserver.UnixStreamServer):
    pass


class TCPHTTPServer(_ServerMixin, socketserver.TCPServer):
    allow_reuse_address = True


class RunningServer:
    """A server and the thread that runs it; ``close()`` stops both and removes a Unix socket file."""

    def __init__(self, server: UnixHTTPServer | TCPHTTPServer, unix_path: str | None = None) -> None:
        self.server = server
        self.unix_path = unix_path
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"fabric-{server.service}",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> Any:
        return self.server.server_address

    def close(self, grace: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.close_active()
        deadline = time.monotonic() + grace
        while self.server.active_count() and time.monotonic() < deadline:
            time.sleep(0.01)  # handler threads finish right after their sockets are shut down
        self._thread.join(timeout=grace)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


def serve_unix(path: str, app: App, on_served: OnServed, limits: Limits, name: str, service: str) -> RunningServer:
    server = UnixHTTPServer(path, _Handler, bind_and_activate=False)
    server._setup_fabric(app, on_served, limits, name, service)
    try:
        server.server_bind()
        os.chmod(path, 0o600)
        server.server_activate()
    except BaseException:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return RunningServer(server, path)


def serve_tcp(
    host: str, port: int, app: App, on_served: OnServed, limits: Limits, name: str, service: str
) -> RunningServer:
    server = TCPHTTPServer((host, port), _Handler, bind_and_activate=False)
    server._setup_fabric(app, on_served, limits, name, service)
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    return RunningServer(server)
