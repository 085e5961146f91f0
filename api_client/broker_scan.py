"""Which jobs still have a "run" message in the broker: how the sweeper tells a job that waits
its turn from one whose message is gone.

A Celery message can vanish while its job record survives: Redis crashed after the
record reached its AOF but before the message did, a worker's BRPOP took it just as
the connection died (kombu had not yet put it in its `unacked` hash), or a failover
promoted a replica that had the record but not the message. The record is the truth,
so the sweeper sends the message again (api_client/jobstate.py `sweep`), but only for
a job whose message is in none of the places kombu keeps one:

- the waiting lists of the infer queue (`keys.infer_queue_lists()`), and
- kombu's `unacked` hash, for a message delivered to a worker less than `fresh_s` ago
  (a live worker claims its job within milliseconds), or held back by a countdown (its
  ETA still ahead). An older entry is a delivery nobody is acting on: a worker whose
  connection died with a failover, while the hash entry survived on the new primary,
  leaves it there until kombu restores it after the visibility timeout (an hour).

Each message names its job in its headers (`argsrepr`), a 32-hex id, which is all that
is matched. The lists are read from their head (where producers push) in chunks, so a
consumer popping their tail meanwhile makes nothing skipped; the hash is read after them,
so a message that moved from a list to the hash during the read is still seen. A job
missed in the instant between a BRPOP and kombu's write to `unacked` gets a second
message, which its claim drops: duplicates are harmless, silence is not.

Cost: one pass over the waiting messages (about 1 KB each) per sweeper round of each worker,
only in rounds where some queued job has waited longer than `resend_lost_after_s`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from api_client import keys
from api_client.jobstate import as_text

UNACKED_KEY = "unacked"  # kombu's redis transport defaults (transport options unacked_key, unacked_index_key)
UNACKED_INDEX_KEY = "unacked_index"
_JOB_ID = re.compile(rb"(?<![0-9a-f-])[0-9a-f]{32}(?![0-9a-f-])")
CHUNK = 1000


def job_ids_in(raw: bytes) -> set[str]:
    """The job ids a raw broker message names."""
    return {m.decode() for m in _JOB_ID.findall(raw)}


def messages_present(client: Any, job_ids: Iterable[str], *, fresh_s: float = 10.0, lists: list[str] | None = None,
                     unacked_key: str = UNACKED_KEY, unacked_index_key: str = UNACKED_INDEX_KEY) -> set[str]:
    """The ids among `job_ids` that have a message waiting in the broker, or held by a worker that
    took it less than `fresh_s` ago or holds it for a countdown."""
    wanted = set(job_ids)
    found: set[str] = set()
    if not wanted:
        return found
    for name in lists or keys.infer_queue_lists():
        start = 0
        while not wanted <= found:
            chunk = client.lrange(name, start, start + CHUNK - 1)
            for raw in chunk:
                found |= job_ids_in(raw) & wanted
            if len(chunk) < CHUNK:
                break
            start += CHUNK
    if not wanted <= found:
        now = time.time()
        taken_at = {as_text(tag): score for tag, score in client.zrange(unacked_index_key, 0, -1, withscores=True)}
        for tag, raw in client.hgetall(unacked_key).items():
            ids = job_ids_in(raw) & wanted
            if ids and (taken_at.get(as_text(tag), 0.0) > now - fresh_s or _eta_ahead(raw, now)):
                found |= ids
    return found


def _eta_ahead(raw: bytes, now: float) -> bool:
    """Is this unacked message held for a countdown that has not yet passed?"""
    try:
        message = json.loads(raw)[0]  # kombu keeps [message, exchange, routing_key]
        eta = (json.loads(message) if isinstance(message, str) else message)["headers"].get("eta")
        return bool(eta) and datetime.fromisoformat(eta).timestamp() > now
    except (ValueError, TypeError, KeyError, IndexError):
        return False
