"""Network fault helpers: an S3 proxy that injects faults, and a webhook receiver.

`S3FaultProxy` is a small HTTP proxy on 127.0.0.1 in front of the moto S3
server. Each request is matched against a per-object plan: the next faults
for that path are taken one per request ("503", "reset", "slow"), and once a
plan is used up the request passes through unchanged. Path-style S3 URLs
(`/bucket/key`) make the object visible in the request line.

`WebhookReceiver` records every POST, checks its Standard Webhooks signature
with api_client.webhooks.verify, can answer 503 for a while, and can be taken
down (connection refused) and brought back on the same port.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from api_client.webhooks import WebhookVerificationError, verify

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_S3_503 = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
           b"<Message>injected by the fault proxy</Message></Error>")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class S3FaultProxy:
    """Per-request faults in front of an S3 endpoint; see the module docstring."""

    def __init__(self, upstream: str, slow_s: float = 1.5):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.slow_s = slow_s
        self.plans: dict[str, list[str]] = defaultdict(list)
        self.injected: Counter = Counter()  # fault kind -> times injected
        self.requests: Counter = Counter()  # "METHOD /bucket/key" -> times seen
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def plan(self, bucket: str, key: str, faults: list[str]) -> None:
        """The next len(faults) requests for s3://bucket/key get these faults, in order."""
        with self._lock:
            self.plans[f"/{bucket}/{key}"].extend(faults)

    def plan_prefix(self, bucket: str, prefix: str, faults: list[str]) -> None:
        """Like plan(), for any object whose key starts with prefix (e.g. results not yet named)."""
        with self._lock:
            self.plans[f"/{bucket}/{prefix}*"].extend(faults)

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            plan = self.plans.get(path) or next(
                (p for k, p in self.plans.items() if k.endswith("*") and p and path.startswith(k[:-1])), None)
            return plan.pop(0) if plan else None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests[f"{h.command} {path}"] += 1
        fault = self._next_fault(path)
        if fault:
            with self._lock:
                self.injected[fault] += 1
        if fault == "reset":
            # RST instead of FIN: the client sees "connection reset by peer".
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault == "503":
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(_S3_503)))
            h.end_headers()
            h.wfile.write(_S3_503)
            return
        if fault == "slow":
            time.sleep(self.slow_s)
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Delivery:
    webhook_id: str
    event_type: str
    job_id: str
    verified: bool
    status: int
    at: float = field(default_factory=time.time)


class WebhookReceiver:
    """Records callbacks and verifies them; `down()` refuses connections until `up()`."""

    def __init__(self, secret: str):
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.fail_next = 0  # answer this many of the next POSTs with 503 (then 204 again)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = verify(receiver.secret, headers, body)
                    verified = True
                except WebhookVerificationError:
                    event, verified = json.loads(body), False
                with receiver._lock:
                    status = 204 if verified else 400
                    if verified and receiver.fail_next > 0:
                        receiver.fail_next -= 1
                        status = 503
                    receiver.deliveries.append(Delivery(
                        headers.get("webhook-id", ""), event.get("type", ""),
                        event.get("data", {}).get("status", {}).get("job_id", ""), verified, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def up(self) -> None:
        if self._server is not None:
            return
        self._server = _Server(("127.0.0.1", self.port), self._handler())
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def terminal_ids_by_job(self) -> dict[str, set[tuple[str, str]]]:
        """job_id -> {(webhook_id, event type)} of delivered (2xx) terminal events."""
        out: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for d in self.snapshot():
            if d.status < 300 and d.event_type in ("job.succeeded", "job.failed", "job.cancelled"):
                out[d.job_id].add((d.webhook_id, d.event_type))
        return out

    def close(self) -> None:
        self.down()
