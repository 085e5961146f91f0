"""Server-Sent Events of one job: its state changes and its text as it grows.

Two kinds of event:
- `state`: one entry of the job's event list (queued, running, ..., the end), as JSON;
- `delta`: `{"text": ...}`, output text not sent before. Progress snapshots
  (worker/jobs/progress.py) are prefixes of the final text, and the last delta,
  sent just before the `succeeded` event, completes it: the deltas joined
  equal the result's `output_text`.

Every event's id is `<state events sent>:<characters sent>`, so a client that
reconnects with `Last-Event-ID` gets exactly what it has not seen. The stream
ends after the terminal state event. A comment line every 15 s keeps proxies
from closing an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from api_client import keys
from api_client.schema import JobState

KEEPALIVE_S = 15.0


def parse_last_event_id(value: str | None) -> tuple[int, int]:
    """(state events seen, characters seen) from a Last-Event-ID; (0, 0) when absent or foreign."""
    try:
        states, chars = (value or "").split(":")
        return max(0, int(states)), max(0, int(chars))
    except ValueError:
        return 0, 0


def _frame(event: str, data: dict, states: int, chars: int) -> str:
    return f"id: {states}:{chars}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(r: aioredis.Redis, job_id: str, last_event_id: str | None) -> AsyncIterator[str]:
    states, chars = parse_last_event_id(last_event_id)
    record, events_key = keys.job(job_id), keys.events(job_id)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(keys.events_channel(job_id))  # before reading: nothing falls in between
        while True:
            for raw in await r.lrange(events_key, states, -1):
                event = json.loads(raw)
                state = JobState(event["state"])
                if state is JobState.succeeded:
                    result = await r.hget(record, "result")
                    text = json.loads(result)["output_text"] if result else ""
                    if len(text) > chars:
                        yield _frame("delta", {"text": text[chars:]}, states, len(text))
                        chars = len(text)
                states += 1
                yield _frame("state", event, states, chars)
                if state.terminal:
                    return
            progress = await r.hget(record, "progress_text")
            text = progress.decode() if isinstance(progress, bytes) else (progress or "")
            if len(text) > chars:
                yield _frame("delta", {"text": text[chars:]}, states, len(text))
                chars = len(text)
            if await pubsub.get_message(timeout=KEEPALIVE_S) is None:
                yield ": keepalive\n\n"
    finally:
        await pubsub.aclose()
