"""A reverse proxy on loopback in front of an S3 endpoint that records every HTTP request passing
through it, so a test asserts how many requests (attempts, retries) a client really made instead
of how long it took: a count cannot flake on a slow machine, and a client that retried when it
should not have fails the test however fast it was.

    with CountingProxy(server.endpoint) as proxy:
        client = s3_client(spec.model_copy(update={"endpoint": proxy.endpoint}), creds)
        ...
        assert proxy.methods() == ["PUT"]

When the upstream cannot be reached (e.g. the S3 server was stopped) the proxy closes the client's
connection without an answer, as a dying server does, and still records the request.

Two hooks for fault injection (fault_kit.FaultProxy overrides them): `refuse` answers a request
with an S3 error instead of forwarding it, and `forwarded` runs after the upstream answered and
before the client hears it. A plain CountingProxy forwards everything.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

# Hop-by-hop headers (RFC 9110 7.6.1) and Expect: this proxy answers 100-continue itself and
# forwards whole bodies, so none of these may reach the upstream as the client sent them.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}


class CountingProxy:
    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.scheme == "http" and parsed.hostname and parsed.port, f"an http://host:port endpoint, not {upstream!r}"
        self.upstream = (parsed.hostname, parsed.port)
        self.requests: list[tuple[str, str]] = []  # (method, path with query), in arrival order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def methods(self) -> list[str]:
        with self._lock:
            return [method for method, _ in self.requests]

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def refuse(self, method: str, path: str) -> tuple[int, str] | None:
        """(HTTP status, S3 error code) to answer this request with, unforwarded; None forwards it."""
        return None

    def forwarded(self, method: str, path: str, status: int) -> None:
        """Called once the upstream answered `status`, before the client gets the answer."""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect of S3

            def log_message(self, format: str, *args: object) -> None:
                pass  # the records are the log

            def _forward(self) -> None:
                proxy._record(self.command, self.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if "chunked" in self.headers.get("Transfer-Encoding", ""):  # pyarrow's uploads
                    body: bytes | None = self._dechunked()
                    headers["Content-Length"] = str(len(body))
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                refusal = proxy.refuse(self.command, self.path)
                if refusal is not None:
                    self._error(*refusal)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                except OSError:
                    self.close_connection = True  # no answer at all, as from a server that is gone
                    return
                finally:
                    upstream.close()
                proxy.forwarded(self.command, self.path, response.status)
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    # a HEAD answer's Content-Length is the object's size, not this (empty) body's
                    if key.lower() not in _HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _error(self, status: int, code: str) -> None:
                """An S3 error answer, as botocore and pyarrow's AWS SDK parse it (the code from the XML)."""
                payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>refused by the test proxy</Message><RequestId>proxy</RequestId></Error>").encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _dechunked(self) -> bytes:
                """The body of a `Transfer-Encoding: chunked` request (RFC 9112 7.1), without trailers."""
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline().strip():  # trailer fields, up to the empty line
                    pass
                return b"".join(parts)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
