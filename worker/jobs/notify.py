"""Turn one job event into a callback delivery (the notify task, on the callbacks queue).

A notify is sent only for an event the state machine recorded as owing a
callback (api_client/jobstate.py), so nothing here decides again which events
a callback wants. The webhook id is derived from the job and the event.
"""

from __future__ import annotations

import json
from typing import Any

from api_client.jobstate import JobStore
from api_client.schema import CallbackSpec, JobStatus
from worker.jobs.callbacks import build_delivery


def build_event_delivery(jobs: JobStore, job_id: str, event: str) -> dict | None:
    """The delivery for (job, event), or None when the record or its callback is gone."""
    rec = jobs.raw(job_id)
    callback = json.loads(rec.get("request", "{}")).get("callback") if rec else None
    if not callback:
        return None
    payload: dict[str, Any] = {"event": event, "status": JobStatus.from_record(rec).model_dump(mode="json")}
    if event == "succeeded" and rec.get("result"):
        payload["result"] = json.loads(rec["result"])
    return build_delivery(job_id, event, payload, CallbackSpec.model_validate(callback))
