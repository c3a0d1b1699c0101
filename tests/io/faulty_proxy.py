"""A fault-injecting HTTP proxy in front of an object-store emulator (moto, gcp-storage-emulator, Azurite).

It answers chosen requests as a busy or strict store does: a throttling reply, a reset connection, a response
cut short, a refused key (403) or refused credentials, deterministically (every n-th request), in the words of
the store behind it (`Replies`), and counts what it did.
"""

from __future__ import annotations

import collections
import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade",
              "content-length"}


def s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>FAULTPROXY</RequestId></Error>").encode()


@dataclass(frozen=True)
class Replies:
    """How one store says "slow down", "access denied" and "who are you": (status, headers, body) each, and
    the query texts that mark a listing request and a request for a listing's next page (to count pages)."""

    slowdown: tuple[int, tuple, bytes]
    denied: tuple[int, tuple, bytes]
    refused: tuple[int, tuple, bytes]
    list_marker: str
    next_page_marker: str


XML = (("Content-Type", "application/xml"),)
S3_REPLIES = Replies(
    slowdown=(503, XML, s3_error("SlowDown", "Please reduce your request rate.")),
    denied=(403, XML, s3_error("AccessDenied", "Access Denied")),
    refused=(403, XML, s3_error("InvalidAccessKeyId",
                                "The AWS Access Key Id you provided does not exist in our records.")),
    list_marker="list-type=2", next_page_marker="continuation-token=")


class FaultyProxy:
    """A threaded HTTP proxy in front of an emulator that misbehaves as a busy object store does.

    fail_every: every n-th request (counted over all requests) gets the next fault of `faults`:
      "slowdown" (the store's throttling reply), "reset" (TCP reset, no response), "short" (a GET body cut
      in half).
    deny: GET/HEAD of a path containing one of these strings gets the store's 403, every time.
    refuse_all: every request gets the store's reply to credentials it does not know.
    authorized: a check of each request's headers; requests failing it are refused too.
    latency: seconds added to every object GET (concurrency of fetches: counts["most in flight"]).
    at: {("METHOD /path?query", n): fault}: the n-th such request gets that fault (e.g. the second ranged GET
      of one object cut short), whatever fail_every says.
    """

    def __init__(self, upstream: str, fail_every: int = 0, faults=("slowdown",), deny=(), refuse_all=False,
                 latency: float = 0.0, replies: Replies = S3_REPLIES, authorized=None,
                 at: dict[tuple[str, int], str] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fail_every, self.faults, self.deny, self.at = fail_every, tuple(faults), tuple(deny), dict(at or {})
        self.refuse_all, self.latency, self.replies = refuse_all, latency, replies
        self.authorized = authorized
        self.counts: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()  # by "METHOD /path?query"
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as object-store clients use it

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def options(self, **extra) -> dict:
        """storage_options pointing s3fs at this proxy."""
        return {"client_kwargs": {"endpoint_url": self.url}, **extra}

    def is_listing(self, path: str) -> bool:
        return self.replies.list_marker in path

    def decide(self, method: str, path: str, headers=None) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            request = f"{method} {path}"
            self.requests[request] += 1
            number = self.counts["requests"]
            if method == "GET" and self.is_listing(path):
                self.counts["list pages"] += 1
                self.counts["next pages"] += self.replies.next_page_marker in path
            if self.refuse_all or (self.authorized and not self.authorized(headers)):
                self.counts["refused"] += 1
                return "refused"
            if method in ("GET", "HEAD") and any(key in path for key in self.deny):
                self.counts["denied"] += 1
                return "denied"
            if (request, self.requests[request]) in self.at:
                fault = self.at[request, self.requests[request]]
                self.counts[fault] += 1
                self.counts["injected"] += 1
                return fault
            if self.fail_every and number % self.fail_every == 0:
                fault = self.faults[(number // self.fail_every) % len(self.faults)]
                if fault == "short" and (method != "GET" or self.is_listing(path)):
                    fault = "slowdown"
                self.counts[fault] += 1
                self.counts["injected"] += 1
                return fault
        return None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = read_request_body(handler)
        fault = self.decide(handler.command, handler.path, handler.headers)
        if fault in ("slowdown", "denied", "refused"):
            status, headers, payload = getattr(self.replies, fault)
            respond(handler, status, list(headers), payload)
            return
        if fault == "reset":  # RST instead of a response: ECONNRESET on the client
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return
        if self.latency and handler.command == "GET" and not self.is_listing(handler.path):
            with self.lock:
                self.counts["in flight"] += 1
                self.counts["most in flight"] = max(self.counts["most in flight"], self.counts["in flight"])
            time.sleep(self.latency)
            with self.lock:
                self.counts["in flight"] -= 1
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {key: value for key, value in handler.headers.items() if key.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            passed = [(key, value) for key, value in response.getheaders() if key.lower() not in HOP_BY_HOP]
            if handler.command == "HEAD":
                respond(handler, response.status, passed, b"", length=response.getheader("Content-Length", "0"))
            elif fault == "short" and len(data) > 1:  # promise all, send half, hang up
                respond(handler, response.status, passed, data[: len(data) // 2], length=str(len(data)))
                handler.close_connection = True
            else:
                respond(handler, response.status, passed, self.reply_body(handler, data))
        finally:
            upstream.close()

    def reply_body(self, handler: BaseHTTPRequestHandler, data: bytes) -> bytes:
        """The upstream's response body as passed on (a subclass may rewrite it)."""
        return data


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0], 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b""):
            pass
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def respond(handler, status: int, headers, payload: bytes, length: str | None = None) -> None:
    handler.send_response(status)
    for key, value in headers:
        handler.send_header(key, value)
    handler.send_header("Content-Length", length if length is not None else str(len(payload)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)
        handler.wfile.flush()
