"""10,000 lines in one batch are accepted in seconds with flat memory: the body is
spooled to disk, checked line by line, and the jobs created 500 per round trip.
(No worker here: only the accepting is measured.)"""

from __future__ import annotations

import json
import time
import tracemalloc

from api_client import HttpJobClient, JobRequest
from tests.integration.test_http_batches import ACME, registry
from tests.services import start_redis
from worker.http.app import create_api
from worker.ops.embedded import serve_in_thread
from worker.http.batch_routes import BatchRoutes
from worker.io.results_store import open_store

LINES = 10_000


def test_ten_thousand_lines_are_accepted_in_seconds_with_flat_memory(tmp_path):
    server = start_redis(tmp_path / "redis")
    try:
        routes = BatchRoutes(open_store(f"file://{tmp_path / 'store'}"), max_body_bytes=64 * 1024 * 1024)
        request = JobRequest.simple("describe", generation={"max_new_tokens": 2}).model_dump(mode="json")
        body = "".join(json.dumps({"custom_id": f"c-{i}", "request": request}) + "\n" for i in range(LINES))
        with serve_in_thread(create_api(server.url, registry(), batches=routes)) as base, \
                HttpJobClient(base, ACME, timeout=180) as client:
            client.submit_batch([{"custom_id": "warm", "request": request}])
            started = time.monotonic()
            accepted = client.submit_batch(body)
            seconds = time.monotonic() - started
            status = client.batch(accepted["batch_id"])
            tracemalloc.start()  # again, traced (slower): how much memory one 10,000-line request takes
            client.submit_batch(body)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        print(f"batch scale: {LINES} lines ({len(body) / 1e6:.1f} MB) accepted in {seconds:.2f}s; "
              f"peak Python memory of a traced second submit {peak / 1e6:.1f} MB")
        assert accepted["accepted"] == LINES and status["total"] == LINES
        assert status["counts"]["queued"] == LINES
        # The client's own copy of the body is most of it: nothing is kept per line on the server.
        assert peak < 3 * len(body)
        assert seconds < 60  # a generous bound for a loaded 2-core machine; the figure is printed
    finally:
        server.stop()
