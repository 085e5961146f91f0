"""What `appendfsync always` costs against `everysec`, in jobs/s through the job state machine.

One redis-server (AOF on, its directory on this disk), one JobClient and the worker's JobStore:
each job is submitted (the create script and the Celery message), claimed and succeeded, by
`threads` threads at once, as a worker's task threads and several producers do. No model runs:
jobs/s is the Redis path every job takes, the part an fsync per write slows. The two settings
alternate on the same server (CONFIG SET appendfsync), round after round, and each keeps its
best round, so both see the same disk and the same neighbours.

    python -m benchmarks.fsync_bench [--jobs 400] [--rounds 3] [--threads 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from api_client import JobClient, JobRequest
from api_client.jobstate import JobStore
from worker.ops.embedded import EmbeddedRedis

POLICIES = ("everysec", "always")


def one_job(client: JobClient, worker: JobStore, n: int) -> None:
    job_id = client.submit(JobRequest.simple(f"fsync {n}", generation={"max_new_tokens": 4}))
    claim = worker.claim(job_id).claim
    assert claim is not None
    worker.succeed(claim, {"output_preview": "x", "result": "{}"})


def run_round(client: JobClient, worker: JobStore, jobs: int, threads: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda n: one_job(client, worker, n), range(jobs)))
    return jobs / (time.perf_counter() - started)


def measure(jobs: int, rounds: int, threads: int, work_dir: Path) -> dict:
    server = EmbeddedRedis(work_dir / "redis", appendonly=True)
    try:
        client = JobClient(server.url)
        worker = JobStore(client.redis, worker_id=f"bench-{uuid.uuid4().hex[:6]}", lease_s=60)
        run_round(client, worker, jobs // 4, threads)  # warm: scripts loaded, connections open
        best = dict.fromkeys(POLICIES, 0.0)
        per_round: dict[str, list[float]] = {p: [] for p in POLICIES}
        for _ in range(rounds):
            for policy in POLICIES:
                client.redis.config_set("appendfsync", policy)
                client.redis.flushall()
                rate = run_round(client, worker, jobs, threads)
                per_round[policy].append(round(rate, 1))
                best[policy] = max(best[policy], rate)
        client.close()
    finally:
        server.stop()
    return {"jobs_per_round": jobs, "threads": threads, "rounds": per_round,
            "jobs_per_s": {p: round(v, 1) for p, v in best.items()},
            "always_over_everysec": round(best["always"] / best["everysec"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where Redis writes its AOF (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = measure(args.jobs, args.rounds, args.threads, Path(tmp))
    if args.json:
        print(json.dumps(result))
    else:
        rates = result["jobs_per_s"]
        print(f"appendfsync everysec {rates['everysec']} jobs/s, always {rates['always']} jobs/s: "
              f"always/everysec = {result['always_over_everysec']} (best of {args.rounds} alternated rounds, "
              f"{args.jobs} jobs each, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
