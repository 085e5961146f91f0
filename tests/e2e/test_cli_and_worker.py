"""End to end: `internvl-queue worker` as a subprocess, driven by the CLI verbs,
with its /healthz, /readyz and /metrics scraped for real.

The tiny model's output is gibberish by design; assertions are on states,
codes, counters and exit statuses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from api_client import JobClient, JobRequest, keys
from model_runtime.samples import make_sample_image
from tests.faults.netfaults import WebhookReceiver
from worker.ops.embedded import free_port

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="

CLI = [sys.executable, "-m", "worker.cli"]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def worker_proc(redis_url, tmp_path_factory):
    import redis

    data = tmp_path_factory.mktemp("e2e")
    media = data / "media"
    media.mkdir()
    port = free_port()
    env = dict(os.environ, IVQ_REDIS_URL=redis_url, IVQ_DATA_DIR=str(data), IVQ_STORE_URL=f"file://{data}/store",
               IVQ_ALLOWED_FILE_ROOT=str(media), IVQ_MODEL="tiny",
               IVQ_MODEL_CACHE_DIR=str(data.parent / "models-cache"), IVQ_METRICS_PORT=str(port),
               IVQ_MAX_BATCH_SIZE="4", IVQ_LOG_LEVEL="INFO", IVQ_WORKER_ID="e2e-worker", IVQ_DRAIN_TIMEOUT_S="20",
               IVQ_WEBHOOK_SECRET=SECRET, IVQ_CALLBACK_ALLOW_PRIVATE="true")
    log_path = data / "worker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(CLI + ["worker"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    r = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    while time.monotonic() - started < 180:
        if r.hexists(keys.WORKERS, "e2e-worker"):
            break
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("worker did not become ready")
    yield {"proc": proc, "base": base, "media": media, "env": env, "log": log_path,
           "ready_s": time.monotonic() - started}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def cli(*args: str, redis_url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args) + ["--redis-url", redis_url], capture_output=True, text=True,
                          timeout=timeout)


def test_probes_report_ready_and_metrics_move(worker_proc, redis_url):
    base = worker_proc["base"]
    assert http_get(base + "/healthz")[0] == 200
    code, body = http_get(base + "/readyz")
    assert code == 200, body
    before = http_get(base + "/metrics")[1]
    assert metric(before, "ivq_model_load_seconds") > 0

    image = Path(worker_proc["media"]) / "cat.jpg"
    image.write_bytes(make_sample_image(200, 150, seed=9))
    out = cli("submit", "--prompt", "What animal?", "--image", f"file://{image}", "--max-new-tokens", "5",
              "--wait", "--json", redis_url=redis_url)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["state"] == "succeeded" and len(data["job_id"]) == 32
    # Another question about the same image: its tiles come from the vision cache, not the tower.
    out = cli("submit", "--prompt", "What colour is it?", "--image", f"file://{image}", "--max-new-tokens", "5",
              "--wait", "--json", redis_url=redis_url)
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "succeeded", out.stderr

    after = http_get(base + "/metrics")[1]
    misses = metric(after, "ivq_vision_cache_tiles_total", outcome="miss")
    assert misses >= 1 and metric(after, "ivq_vision_cache_tiles_total", outcome="hit") >= misses
    assert metric(after, "ivq_vision_cache_bytes", kind="used") > 0
    assert metric(after, "ivq_vision_cache_bytes", kind="capacity") == 256 * 1024 * 1024
    assert metric(after, "ivq_jobs_total", state="succeeded") >= metric(before, "ivq_jobs_total", state="succeeded") + 1
    assert metric(after, "ivq_batch_size_count") > metric(before, "ivq_batch_size_count")
    assert metric(after, "ivq_generate_seconds_count") > metric(before, "ivq_generate_seconds_count")
    assert metric(after, "ivq_tokens_generated_total") > metric(before, "ivq_tokens_generated_total")


def test_callback_attempts_are_counted(worker_proc, redis_url):
    base = worker_proc["base"]
    receiver = WebhookReceiver(SECRET)
    receiver.up()
    receiver.fail_next = 1  # the first attempt gets a 503: one retry, then delivered
    try:
        before = http_get(base + "/metrics")[1]
        with JobClient(redis_url) as client:
            job_id = client.submit(JobRequest.simple("hook me", generation={"max_new_tokens": 2},
                                                     callback={"url": receiver.url}))
            assert client.wait(job_id, timeout=60).state.value == "succeeded"
        deadline = time.monotonic() + 30
        while not any(d.job_id == job_id and d.status < 300 for d in receiver.snapshot()):
            assert time.monotonic() < deadline, receiver.snapshot()
            time.sleep(0.1)
        time.sleep(0.2)  # the counter moves right after the POST returns
        after = http_get(base + "/metrics")[1]
    finally:
        receiver.close()
    for outcome in ("retry", "delivered"):
        assert metric(after, "ivq_callbacks_total", outcome=outcome) == \
            metric(before, "ivq_callbacks_total", outcome=outcome) + 1, outcome


def test_cli_verbs_speak_json_with_state_and_error_code(worker_proc, redis_url):
    missing = f"file://{worker_proc['media']}/nope.jpg"
    out = cli("submit", "--prompt", "x", "--image", missing, "--json", redis_url=redis_url)
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    waited = cli("wait", job_id, "--timeout", "60", "--json", redis_url=redis_url)
    assert waited.returncode == 1
    data = json.loads(waited.stdout)
    assert data["job_id"] == job_id and data["state"] == "failed"
    assert data["error"]["code"] == "media_not_found"
    status = json.loads(cli("status", job_id, "--json", redis_url=redis_url).stdout)
    assert status["state"] == "failed" and status["error"]["code"] == "media_not_found"
    result = cli("result", job_id, "--json", redis_url=redis_url)
    assert result.returncode == 1 and json.loads(result.stdout)["error"]["code"] == "media_not_found"


def test_refused_submit_exits_non_zero_with_the_code(redis_url):
    out = cli("submit", "--prompt", "x", "--image", "ftp://host/file.jpg", "--json", redis_url=redis_url)
    assert out.returncode != 0
    assert json.loads(out.stdout)["error"]["code"] == "invalid_request"


def test_succeeded_result_and_status_via_cli(worker_proc, redis_url):
    out = cli("submit", "--prompt", "Say hi", "--max-new-tokens", "3", "--json", redis_url=redis_url)
    job_id = json.loads(out.stdout)["job_id"]
    assert cli("wait", job_id, "--timeout", "60", redis_url=redis_url).returncode == 0
    res = json.loads(cli("result", job_id, "--json", redis_url=redis_url).stdout)
    assert res["state"] == "succeeded"
    assert res["result"]["worker_id"] == "e2e-worker" and res["result"]["usage"]["completion_tokens"] >= 1


def test_client_verbs_do_not_import_the_model_stack():
    code = ("import sys; from worker import cli; cli.build_parser(); import api_client; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_logs_are_json_with_job_worker_and_batch_bound(worker_proc, redis_url):
    out = cli("submit", "--prompt", "log me", "--max-new-tokens", "2", "--wait", "--json", redis_url=redis_url)
    job_id = json.loads(out.stdout)["job_id"]
    time.sleep(0.5)
    lines = [json.loads(x) for x in Path(worker_proc["log"]).read_text().splitlines() if x.startswith("{")]
    done = [x for x in lines if x.get("event") == "job.succeeded" and x.get("job_id") == job_id]
    assert len(done) == 1, lines[-5:]
    assert done[0]["worker"] == "e2e-worker" and done[0]["attempt"] == 1 and done[0]["batch_id"]
    generated = [x for x in lines if x.get("event") == "generate.done" and x.get("job_id") == job_id]
    assert len(generated) == 1 and generated[0]["worker"] == "e2e-worker"
    assert generated[0]["batch_id"] == done[0]["batch_id"]  # the model thread's line and the job's agree


def test_sigterm_drains_and_exits_within_the_drain_time(worker_proc):
    proc = worker_proc["proc"]
    code, _ = http_get(worker_proc["base"] + "/readyz")
    assert code == 200
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=40)
    assert time.monotonic() - t0 < 25  # IVQ_DRAIN_TIMEOUT_S=20 plus slack
    log = Path(worker_proc["log"]).read_text()
    assert "worker.draining" in log
