"""Jepsen's bookkeeping for the Redis fault tests: every submit is acknowledged (an id came back) or
refused (BrokerUnavailable: it may or may not exist; nothing is owed for it), and only the
acknowledged ones are checked: each must end succeeded, with exactly one terminal event.

`Producer` submits from a thread until stopped, through any callable that returns a job id.
`check` reads the records once: lost (no record), failed (ended otherwise than succeeded),
duplicates (a job with more than one terminal event), and what is still not done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from api_client import BrokerUnavailable, keys
from api_client.errors import ServiceError


@dataclass
class Producer:
    submit: Callable[[int], str]
    pause_s: float = 0.01
    acked: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)  # monotonic time of each acknowledgement
    refused: int = 0
    unexpected: list[str] = field(default_factory=list)  # errors no client should raise: the test fails
    first_refused_at: float | None = None
    last_refused_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.acked.append(self.submit(n))
                self.acked_at.append(time.monotonic())
            except (BrokerUnavailable, ServiceError):
                now = time.monotonic()
                self.refused += 1
                self.first_refused_at = self.first_refused_at or now
                self.last_refused_at = now
                time.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 - kept and asserted on, never lost in a dead thread
                self.unexpected.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.1)
            self._stop.wait(self.pause_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


TERMINAL = {"succeeded", "failed", "cancelled"}


def check(r, acked: list[str]) -> dict[str, int]:
    """Acknowledged jobs by outcome: succeeded, lost, duplicates, not_done (still queued or running)."""
    pipe = r.pipeline(transaction=False)
    for job_id in acked:
        pipe.hget(keys.job(job_id), "state")
        pipe.lrange(keys.events(job_id), 0, -1)
    replies = pipe.execute()
    out = {"acknowledged": len(acked), "succeeded": 0, "lost": 0, "failed": 0, "duplicates": 0, "not_done": 0}
    for i in range(len(acked)):
        state = (replies[2 * i] or b"").decode()
        ends = sum(1 for e in replies[2 * i + 1] if any(f'"state":"{s}"' in e.decode() for s in TERMINAL))
        out["duplicates"] += ends > 1
        if state == "succeeded":
            out["succeeded"] += 1
        elif state in ("queued", "running"):
            out["not_done"] += 1
        elif state:
            out["failed"] += 1  # ended failed or cancelled
        else:
            out["lost"] += 1  # no record: an acknowledged write that did not survive
    return out


def not_done(r, acked: list[str]) -> dict[str, dict]:
    """The records (and events) of acknowledged jobs still queued or running: what a failure shows."""
    out = {}
    for job_id in acked:
        rec = {k.decode(): v.decode()[:200] for k, v in r.hgetall(keys.job(job_id)).items()}
        if rec.get("state") in ("queued", "running"):
            rec.pop("request", None)
            t = keys.TenantKeys.of(rec.get("tenant", ""))
            out[job_id] = {**rec, "events": [e.decode() for e in r.lrange(keys.events(job_id), 0, -1)],
                           "queued_index": r.zscore(keys.JobKeys.of(job_id).shard.queued, job_id),
                           "lane": r.zscore(t.lane, job_id), "in_backlog": r.lpos(t.backlog, job_id),
                           "in_lists": [n for n in keys.infer_queue_lists()
                                        if any(job_id.encode() in m for m in r.lrange(n, 0, -1))],
                           "unacked": [(tag, r.zscore("unacked_index", tag)) for tag, m in r.hgetall("unacked").items()
                                       if job_id.encode() in m], "now": time.time()}
    return out


def settle(r, acked: list[str], timeout: float) -> tuple[dict[str, int], float]:
    """Poll until no acknowledged job is queued or running (or `timeout`); returns (check, seconds)."""
    t0 = time.monotonic()
    while True:
        result = check(r, acked)
        if not result["not_done"] or time.monotonic() - t0 > timeout:
            return result, time.monotonic() - t0
        time.sleep(0.5)
