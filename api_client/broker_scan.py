"""Which jobs still have a "run" message in the broker: how the sweeper tells a job that waits
its turn from one whose message is gone.

A Celery message can vanish while its job record survives: Redis crashed after the
record reached its AOF but before the message did, a worker's BRPOP took it just as
the connection died (kombu had not yet put it in its `unacked` hash), or a failover
promoted a replica that had the record but not the message. The record is the truth,
so the sweeper sends the message again (api_client/jobstate.py `sweep`), but only for
a job whose message is in none of the places kombu keeps one:

- the waiting lists of the infer queue (`keys.infer_queue_lists()`), and
- kombu's `unacked` hash: delivered to a worker, not yet acknowledged (this includes
  messages held back by a countdown).

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

import re
from collections.abc import Iterable
from typing import Any

from api_client import keys

UNACKED_KEY = "unacked"  # kombu's redis transport default (transport option unacked_key)
_JOB_ID = re.compile(rb"(?<![0-9a-f-])[0-9a-f]{32}(?![0-9a-f-])")
CHUNK = 1000


def job_ids_in(raw: bytes) -> set[str]:
    """The job ids a raw broker message names."""
    return {m.decode() for m in _JOB_ID.findall(raw)}


def messages_present(client: Any, job_ids: Iterable[str], *, lists: list[str] | None = None,
                     unacked_key: str = UNACKED_KEY) -> set[str]:
    """The ids among `job_ids` that have a message waiting in the broker or held by a worker."""
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
        for raw in client.hvals(unacked_key):
            found |= job_ids_in(raw) & wanted
    return found
