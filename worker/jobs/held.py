"""The claims one worker holds: leases renewed, lost claims flagged for the engine.

A task thread holds a claim from the moment it starts a job until it ends it.
The runtime's threads call `renew_all` (every lease_s / 3) and `flag_lost`
(every IVQ_CANCEL_POLL_S): a job cancelled by its producer, or taken over by
another worker, has its flag set, and the engine drops it at its next step, so
it stops using the GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
import structlog

from api_client.jobstate import Claim, JobStore

log = structlog.get_logger(__name__)


class HeldClaims:
    def __init__(self, jobs: JobStore):
        self.jobs = jobs
        self._claims: dict[str, Claim] = {}
        self._lost: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def hold(self, claim: Claim) -> Callable[[], bool]:
        """Renew this claim's lease from now on; returns the job's "is its claim lost?" check."""
        with self._lock:
            self._claims[claim.job_id] = claim
            flag = self._lost.setdefault(claim.job_id, threading.Event())
        return flag.is_set

    def release(self, claim: Claim) -> None:
        with self._lock:
            self._claims.pop(claim.job_id, None)
            self._lost.pop(claim.job_id, None)

    def held(self) -> list[Claim]:
        with self._lock:
            return list(self._claims.values())

    def renew_all(self) -> None:
        for claim in self.held():
            try:
                if not self.jobs.renew(claim):
                    log.info("job.claim_lost", job_id=claim.job_id)
            except redis.RedisError as exc:
                log.warning("lease.renew_failed", job_id=claim.job_id, error=str(exc))

    def flag_lost(self) -> None:
        """One pipelined read of every held claim; flag those that are gone."""
        try:
            lost = self.jobs.lost(self.held())
        except redis.RedisError as exc:
            log.warning("cancel_watch.failed", error=str(exc))
            return
        with self._lock:
            for job_id in lost:
                flag = self._lost.get(job_id)
                if flag is not None and not flag.is_set():
                    flag.set()
                    log.info("job.cancel_seen", job_id=job_id)
