"""The client side of docker/e2e.sh, run in the client image on the compose network.

  python driver.py submit OUT N [--long]   submit N mixed jobs through the HTTP API, job ids to OUT
  python driver.py running IDS N           wait until at least N of those jobs are running
  python driver.py check IDS               wait for every job; check states, results in S3 (one version each)

Prints one JSON object per command; exits non-zero when a check fails.
Only the HTTP API (IVQ_API_URL, IVQ_API_KEY) and the S3 endpoint (IVQ_S3_ENDPOINT_URL) are used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import urlparse

from api_client import HttpJobClient, JobRequest

SAMPLE = "s3://internvl-queue/samples/sample.png"
PROMPTS = ["Describe the image in one sentence.", "What colours do you see?", "Count the objects.",
           "Write a haiku about queues.", "Summarise: Redis holds the queue, S3 the media and results."]


def _client() -> HttpJobClient:
    return HttpJobClient(os.environ["IVQ_API_URL"], os.environ["IVQ_API_KEY"], timeout=60.0)


def mixed_request(i: int, long: bool) -> JobRequest:
    """Image, two images or text only; short and long outputs; greedy and sampled; priorities."""
    images = [[SAMPLE], [SAMPLE, SAMPLE], []][i % 3]
    tokens = 192 if long else [8, 32, 64][i % 3]
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens if long else 0}
    if i % 4 == 3:
        generation.update(do_sample=True, temperature=0.8, seed=i)
    return JobRequest.simple(PROMPTS[i % len(PROMPTS)], images=images, generation=generation, priority=i % 3)


def _wait_for_api(timeout: float = 180.0) -> None:
    """Right after `up` the API may not listen yet: retry until it answers."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            httpx.get(os.environ["IVQ_API_URL"] + "/readyz", timeout=5.0).raise_for_status()
            return
        except httpx.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def submit(out: str, n: int, long: bool) -> dict:
    started = time.time()
    with _client() as client:
        _wait_for_api()
        ids = [client.submit(mixed_request(i, long)) for i in range(n)]
    with open(out, "w") as f:
        f.write("\n".join(ids) + "\n")
    return {"submitted": len(ids), "seconds": round(time.time() - started, 2)}


def _ids(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def running(path: str, n: int, timeout: float = 300.0) -> dict:
    ids = _ids(path)
    deadline = time.time() + timeout
    with _client() as client:
        while time.time() < deadline:
            states = [client.status(j).state.value for j in ids]
            if states.count("running") >= n:
                return {"running": states.count("running"), "succeeded": states.count("succeeded")}
            time.sleep(0.2)
    raise SystemExit(f"fewer than {n} jobs running after {timeout} s")


def _s3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["IVQ_S3_ENDPOINT_URL"])


def check(path: str, timeout: float = 900.0) -> dict:
    ids = _ids(path)
    s3 = _s3()
    report: dict = {"jobs": len(ids), "succeeded": 0, "lost": 0, "not_succeeded": {}, "results_in_s3": 0,
                    "results_with_one_version": 0, "max_attempts": 0}
    with _client() as client:
        for job_id in ids:
            try:
                status = client.wait(job_id, timeout=max(1.0, timeout))
            except Exception as exc:  # noqa: BLE001 - a job that never ends is lost; say which and why
                report["lost"] += 1
                report["not_succeeded"][job_id] = f"{type(exc).__name__}: {exc}"
                continue
            report["max_attempts"] = max(report["max_attempts"], status.attempts)
            if status.state.value != "succeeded":
                report["not_succeeded"][job_id] = status.state.value
                continue
            report["succeeded"] += 1
            url = urlparse(status.result_url or "")
            if url.scheme != "s3":
                report["not_succeeded"][job_id] = f"result not in S3: {status.result_url}"
                continue
            key = url.path.lstrip("/")
            versions = s3.list_object_versions(Bucket=url.netloc, Prefix=key).get("Versions", [])
            versions = [v for v in versions if v["Key"] == key]
            report["results_in_s3"] += bool(versions)
            report["results_with_one_version"] += len(versions) == 1
            if len(versions) != 1:
                report["not_succeeded"][job_id] = f"{len(versions)} result versions in S3"
    report["ok"] = (report["succeeded"] == report["results_in_s3"] == report["results_with_one_version"]
                    == len(ids) and report["lost"] == 0)
    return report


def main(argv: list[str]) -> int:
    verb = argv[0]
    if verb == "submit":
        result = submit(argv[1], int(argv[2]), "--long" in argv)
    elif verb == "running":
        result = running(argv[1], int(argv[2]))
    elif verb == "check":
        result = check(argv[1])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
