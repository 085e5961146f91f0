"""Live progress of running jobs: the engine's snapshots of token ids, as settled text, in the job record.

The continuous engine calls a job's `Prepared.on_progress` (set in
worker/jobs/pipeline.py from `ProgressPublisher.hook`) on the model thread, at most
every IVQ_PROGRESS_INTERVAL_S, with the ids generated so far. The hook only
drops them in a mailbox: one slot per job, a newer snapshot replacing one
not yet sent, so a slow Redis costs memory per job, not per snapshot. One
thread per worker empties it: it decodes each snapshot exactly as the final
`Output.text` is decoded and writes the settled part
(model_runtime/text.py `settled_text`: no trailing U+FFFD, nothing a
tokenizer's space clean-up may still change, nothing from where a stop
string may start) with `JobStore.progress` (claim holder only; published on
the job's channel, not added to its events). So every text a job shows is a
prefix of its final `output_text`, and `JobClient.stream`'s pieces add up to
it. Errors there (Redis down, a bad decode) are logged and counted, never
raised into the engine; the job runs on without progress.

Only the continuous engine reports progress (IVQ_ENGINE=static: none);
IVQ_PROGRESS_INTERVAL_S=0 turns it off. Importing this module does not
import torch or transformers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from api_client.jobstate import Claim, JobStore
from model_runtime.text import settled_text

log = structlog.get_logger(__name__)

WARN_EVERY_S = 30.0  # a failing Redis logs one warning this often, with the count since


class ProgressPublisher:
    """Takes progress snapshots from the model thread and writes them to the job records, on its own thread."""

    def __init__(self, jobs: JobStore, tokenizer: Any) -> None:
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.published = 0  # snapshots written (tests and measurements read these)
        self.failed = 0
        self._latest: dict[str, tuple[Claim, tuple[str, ...], Sequence[int]]] = {}  # job_id -> newest snapshot
        self._cond = threading.Condition()
        self._stopping = False
        self._warned_at = 0.0
        self._unreported = 0
        self._thread = threading.Thread(target=self._loop, name="progress-publisher", daemon=True)

    def start(self) -> ProgressPublisher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is waiting, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def hook(self, claim: Claim, stops: tuple[str, ...]) -> Callable[[Sequence[int]], None]:
        """The job's `Prepared.on_progress`: runs on the model thread, so it only hands the ids over."""

        def on_progress(ids: Sequence[int]) -> None:
            with self._cond:
                self._latest[claim.job_id] = (claim, stops, ids)
                self._cond.notify()

        return on_progress

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._latest and not self._stopping:
                    self._cond.wait()
                batch, self._latest = self._latest, {}
                if not batch and self._stopping:
                    return
            for claim, stops, ids in batch.values():
                self._publish(claim, stops, ids)

    def _publish(self, claim: Claim, stops: tuple[str, ...], ids: Sequence[int]) -> None:
        try:
            self.jobs.progress(claim, len(ids), settled_text(self.tokenizer, ids, stops))
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - progress is best effort: the job runs on without it
            self.failed += 1
            self._unreported += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                log.warning("progress.write_failed", job_id=claim.job_id, error=repr(exc),
                            failures=self._unreported)
                self._warned_at, self._unreported = now, 0
