"""A tiny threaded HTTP server on loopback that the HTTP emulators (Graph API, Data Manager REST)
share. Each emulator supplies one `handle(request) -> response` function.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 256 * 1024 * 1024


class DropConnection(Exception):
    """Raised by a handler to close the socket without answering (fault injection)."""


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass(slots=True)
class HttpResponse:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # send these bytes as is (e.g. a non-JSON error page)


Handler = Callable[[HttpRequest], HttpResponse]


class LoopbackHttpServer:
    """Serves `handler` on 127.0.0.1:`port` (0 = a free port) in a daemon thread."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        outer = handler

        class _RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: with Nagle's algorithm the second waits for the client's
            # delayed ACK (40 ms on Linux) on every keep-alive request
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return  # emulators keep their own request log; never print to stderr

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self.send_error(413)
                    return
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = HttpRequest(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                try:
                    resp = outer(req)
                except DropConnection:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                payload = resp.raw if resp.raw is not None else json.dumps(resp.body).encode()
                self.send_response(resp.status)
                content_type = "application/json; charset=UTF-8" if resp.raw is None else "text/html"
                headers = {"Content-Type": content_type, **resp.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve
            do_POST = _serve
            do_DELETE = _serve
            do_PATCH = _serve

        class _Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # a client that went away mid-request (killed, timed out) is normal life for a platform
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return
                super().handle_error(request, client_address)

        self._server = _Server((host, port), _RequestHandler)
        self._server.daemon_threads = True
        # shutdown() waits for the loop to look again: every 0.5 s by default, on each emulator's stop
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LoopbackHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
