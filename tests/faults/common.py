"""Helpers shared by the fault tests: figures for the summary, waiting, TTL checks.

Figures each test measures are kept in `FIGURES` and printed at the end of
the session by tests/faults/conftest.py (they are quoted in RELIABILITY.md).
"""

from __future__ import annotations

import time

from api_client import JobClient
from api_client.schema import JobStatus

FIGURES: list[str] = []


def record(line: str) -> None:
    """Keep one measured figure for the end-of-session summary."""
    FIGURES.append(line)
    print(line)


def wait_all(client: JobClient, job_ids: list[str], timeout: float) -> dict[str, JobStatus]:
    """Wait until every job is terminal (one deadline for all); returns the final statuses."""
    deadline = time.monotonic() + timeout
    out = {}
    for job_id in job_ids:
        out[job_id] = client.wait(job_id, timeout=max(0.1, deadline - time.monotonic()))
    return out


def keys_without_ttl(r) -> tuple[list[str], list[str]]:
    """(service keys with no TTL, other keys with no TTL) in this Redis."""
    from api_client import keys

    prefixes = (f"{keys.PREFIX}:", f"{{{keys.PREFIX}:")  # plain keys, and the job state's hash-tagged ones
    ours, others = [], []
    for k in r.scan_iter(count=1000):
        if r.ttl(k) == -1:
            name = k.decode()
            (ours if name.startswith(prefixes) else others).append(name)
    return sorted(ours), sorted(others)
