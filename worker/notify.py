"""Turn one job event into a callback delivery (runs on the callbacks queue).

The webhook id is derived from the job id and the event, so a duplicated
notify message yields the same `webhook-id` and receivers can deduplicate:
one terminal callback per job, even under at-least-once delivery.
"""

from __future__ import annotations

import json
from typing import Any

from api_client import keys
from api_client.records import Records, status_from_record
from api_client.schema import CallbackSpec
from worker.callbacks import build_delivery, wants


def build_event_delivery(redis: Any, job_id: str, event: str) -> dict | None:
    rec = Records(redis).raw(job_id)
    if not rec:
        return None
    callback = json.loads(rec.get("request", "{}")).get("callback")
    if not callback:
        return None
    spec = CallbackSpec.model_validate(callback)
    if not wants(spec, event):
        return None
    payload: dict[str, Any] = {"event": event, "status": status_from_record(rec).model_dump(mode="json")}
    if event == "succeeded" and rec.get("result"):
        payload["result"] = json.loads(rec["result"])
    delivery = build_delivery(job_id, event, payload, spec)
    delivery["webhook_id"] = f"msg_{job_id}_{event}"
    return delivery


__all__ = ["build_event_delivery", "keys"]
