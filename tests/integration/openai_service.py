"""One service for the OpenAI-SDK tests: real uvicorn, the test run's redis-server, an in-process
worker (tiny model: gibberish text by design), the object store on moto's S3, and a loopback
HTTP server for https-style media (the SSRF guard lets private addresses through only with
callback_allow_private, as here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness import running_worker
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.tenants import TenantRegistry, key_hash, new_key
from worker.io.results_store import open_store
from worker.ops.embedded import serve_in_thread
from worker.settings import Settings

STORE_BUCKET, MEDIA_BUCKET = "oai-store", "oai-media"
WEBHOOK_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
# Tenant names of these tests only: the test run's Redis also holds other modules' tenants' jobs.
KEYS = {name: new_key() for name in ("acme", "globex", "oai-slow", "oai-tight", "oai-onestream", "oai-quitter",
                                      "oai-batchcap")}
LIMITS: dict[str, dict[str, Any]] = {"oai-slow": {"rate_per_s": 0.5, "burst": 1}, "oai-tight": {"max_active": 1},
                                     "oai-onestream": {"max_streams": 1}, "oai-batchcap": {"max_batch_jobs": 3}}


@dataclass
class Service:
    base: str  # http://127.0.0.1:PORT
    settings: Settings
    s3: Any
    media: MediaServer

    def client(self, tenant: str = "acme", **kw: Any):
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("api_key", KEYS[tenant])
        return openai.OpenAI(base_url=self.base + "/v1", **kw)


class MediaServer:
    """Serves `files` (path -> bytes) on a loopback port."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def openai_service(redis_url: str, s3_server: Any, data: Path) -> Iterator[Service]:
    s3 = s3_server.client()
    for bucket in (STORE_BUCKET, MEDIA_BUCKET):
        s3.create_bucket(Bucket=bucket)
    keys_file = data / "api-keys.json"
    keys_file.write_text(json.dumps({"tenants": {
        name: {"keys": [{"sha256": key_hash(key)}], **LIMITS.get(name, {})} for name, key in KEYS.items()}}))
    settings = Settings(redis_url=redis_url, data_dir=data, model="tiny", model_cache_dir=data.parent / "models-cache",
                        store_url=f"s3://{STORE_BUCKET}/ivq", s3_endpoint_url=s3_server.endpoint_url,
                        max_batch_size=8, concurrency=16, lease_s=2, cancel_poll_s=0.2, job_timeout_s=120,
                        allow_https_media=True, callback_allow_private=True, webhook_secret=WEBHOOK_SECRET)
    store = open_store(settings.resolved_store_url, s3_endpoint_url=settings.s3_endpoint_url)
    routes = BatchRoutes(store, max_body_bytes=settings.api_max_batch_bytes)
    media = MediaServer()
    app = create_api(redis_url, TenantRegistry(keys_file), batches=routes, served_model="tiny")
    try:
        with running_worker(settings), serve_in_thread(app) as base:
            yield Service(base, settings, s3, media)
    finally:
        media.close()
