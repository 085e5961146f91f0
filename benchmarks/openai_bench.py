"""The OpenAI SDK's chat.completions against the native HttpJobClient, for the same jobs, side by side.

    python -m benchmarks.openai_bench [--jobs 64] [--concurrency 16] [--rounds 3] [--latency-jobs 24]

One redis-server, one worker process (tiny model) and one `internvl-queue api` process (as
deployed, on loopback). Every job is the same text prompt decoding exactly `--tokens` tokens
(max_tokens = min_tokens), seeded, so both clients ask the worker for the same work. A caller
is one thread doing one job at a time, to its text:
- native: HttpJobClient.submit, then wait (Server-Sent Events), then result;
- openai: client.chat.completions.create (the request waits for the job).

Throughput: `--concurrency` callers over `--jobs` jobs, the variants alternating round by round;
each variant's best round counts. Latency: one caller, jobs one after another, alternating
native/openai job by job; p50 and p95 of each, and the difference of the p50s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from api_client import HttpJobClient, JobRequest
from benchmarks.api_bench import serving_api, serving_worker
from worker.ops.embedded import EmbeddedRedis


def _native_job(client: HttpJobClient, tokens: int) -> Callable[[int], str]:
    def one(i: int) -> str:
        job_id = client.submit(JobRequest.simple(f"Describe item {i}.", generation={
            "max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": True, "seed": i}))
        client.wait(job_id, timeout=600)
        result = client.result(job_id)
        if result is None:
            raise RuntimeError(f"native job {job_id} did not succeed: {client.status(job_id).error}")
        return result.output_text
    return one


def _openai_job(client: Any, tokens: int) -> Callable[[int], str]:
    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Describe item {i}."}]
        done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=tokens, seed=i,
                                              extra_body={"min_tokens": tokens})
        return str(done.choices[0].message.content)
    return one


def _round(job: Callable[[int], str], jobs: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []

    def timed(i: int) -> str:
        started = time.perf_counter()
        text = job(i)
        latencies.append(time.perf_counter() - started)
        return text

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(timed, range(jobs)))
    wall = time.perf_counter() - started
    return {"jobs_per_s": round(jobs / wall, 3), "seconds": round(wall, 3), "texts": texts,
            "p50_ms": round(_pct(latencies, 50) * 1000, 1)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def bench(work: Path, *, jobs: int, concurrency: int, rounds: int, latency_jobs: int, tokens: int) -> dict[str, Any]:
    import openai

    redis_server = EmbeddedRedis(work / "redis")
    try:
        with serving_worker(redis_server.url, work, IVQ_STORE_URL=f"file://{work / 'api' / 'api-store'}"), \
                serving_api(redis_server.url, work / "api") as (base, key), \
                HttpJobClient(base, key, timeout=600) as http:
            sdk = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
            variants = {"native": _native_job(http, tokens), "openai": _openai_job(sdk, tokens)}
            for job in variants.values():  # warm: connections, scripts, the first jobs
                _round(job, 4, 4)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, job in variants.items():
                    runs[name].append(_round(job, jobs, concurrency))
            same_text = runs["native"][0]["texts"] == runs["openai"][0]["texts"]
            latency: dict[str, list[float]] = {name: [] for name in variants}
            for i in range(latency_jobs):
                for name, job in (variants.items() if i % 2 == 0 else reversed(variants.items())):
                    started = time.perf_counter()
                    job(10_000 + i)
                    latency[name].append(time.perf_counter() - started)
            sdk.close()
    finally:
        redis_server.stop()
    best = {name: max(rs, key=lambda x: x["jobs_per_s"]) for name, rs in runs.items()}
    p50 = {name: _pct(v, 50) * 1000 for name, v in latency.items()}
    return {
        "jobs": jobs, "concurrency": concurrency, "rounds": rounds, "tokens_per_job": tokens,
        "jobs_per_s": {name: [x["jobs_per_s"] for x in rs] for name, rs in runs.items()},
        "ratio_openai_over_native": round(best["openai"]["jobs_per_s"] / best["native"]["jobs_per_s"], 3),
        "loaded_p50_ms": {name: b["p50_ms"] for name, b in best.items()},
        "same_texts": same_text,
        "latency_jobs": latency_jobs,
        "latency_ms": {name: {"p50": round(p50[name], 1), "p95": round(_pct(v, 95) * 1000, 1)}
                       for name, v in latency.items()},
        "added_p50_ms": round(p50["openai"] - p50["native"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-jobs", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ivq-openai-bench-") as tmp:
        result = bench(Path(tmp), jobs=args.jobs, concurrency=args.concurrency, rounds=args.rounds,
                       latency_jobs=args.latency_jobs, tokens=args.tokens)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
