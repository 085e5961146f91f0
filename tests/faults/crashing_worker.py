"""`internvl-queue worker`, except that a job whose first text is PROMPT kills it.

    python -m tests.faults.crashing_worker PROMPT

The poison test's fault lives here, not in production code: the real worker
runs, and only its job store is wrapped, so the process dies with exit code 137
right after claiming the poison job, as if the job had crashed it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from api_client.jobstate import JobStore, Transition
from worker.cli.service import serve_worker
from worker.runtime import WorkerRuntime
from worker.settings import Settings


def _first_text(request_json: str) -> str | None:
    for message in json.loads(request_json).get("messages", []):
        for item in message.get("content", []):
            if item.get("type") == "text":
                return item.get("text")
    return None


class CrashingJobStore(JobStore):
    prompt = ""

    def claim(self, job_id: str) -> Transition:
        claimed = super().claim(job_id)
        if claimed.claim is not None and _first_text(claimed.claim.request_json) == self.prompt:
            print(json.dumps({"event": "job.crash_injected", "job_id": job_id}), flush=True)
            os._exit(137)
        return claimed


def _wrap(prompt: str, runtime: WorkerRuntime) -> None:
    assert runtime.ctx is not None
    jobs = CrashingJobStore(runtime.jobs.redis, worker_id=runtime.jobs.worker_id, lease_s=runtime.jobs.lease_s,
                            max_crashes=runtime.jobs.max_crashes)
    jobs.prompt = prompt
    runtime.ctx = dataclasses.replace(runtime.ctx, jobs=jobs)


if __name__ == "__main__":
    sys.exit(serve_worker(Settings(), on_started=lambda runtime: _wrap(sys.argv[1], runtime)))
