"""A poison job that kills its worker every time ends `failed: poison`; the jobs behind it succeed.

The crash comes from the test's own entry point around the real worker
(tests/faults/crashing_worker.py): it calls os._exit(137) right after claiming
a job whose first text item matches. A supervisor restarts the worker after each death, as Kubernetes
would. Each death leaves the job `running` with a lease nobody renews; the
next worker's sweeper counts a crash and re-queues it, and at
IVQ_MAX_CRASHES it ends the job as poison instead of feeding it to yet
another worker.
"""

from __future__ import annotations

import time

from api_client import JobRequest, keys
from api_client.schema import ErrorCode
from tests.faults.common import record, wait_all
from tests.faults.corpus import raw_message
from tests.faults.procs import Supervisor, worker_env

POISON = "this prompt crashes the worker"
MAX_CRASHES = 2
GOOD = 10


def test_poison_job_fails_after_max_crashes_and_the_queue_keeps_moving(redis_srv, client, model_cache, tmp_path):
    env = worker_env(redis_url=redis_srv.url, data_dir=tmp_path / "data", model_cache_dir=model_cache,
                     max_crashes=MAX_CRASHES, lease_s=3, visibility_timeout_s=10,
                     max_batch_size=4, max_wait_ms=50, warmup=False)
    sup = Supervisor(env, tmp_path / "logs", "sup", redis_srv.url,
                     command=("-m", "tests.faults.crashing_worker", POISON)).start()
    try:
        t0 = time.monotonic()
        poison = client.submit(JobRequest.simple(POISON, generation={"max_new_tokens": 4}))
        while not sup.exits:  # the first worker dies on it
            assert time.monotonic() - t0 < 60, "the poison job did not crash its worker"
            time.sleep(0.05)
        good = client.submit_many(JobRequest.simple(f"good {i}", generation={"max_new_tokens": 8})
                                  for i in range(GOOD))
        final = wait_all(client, [poison, *good], timeout=150)
        elapsed = time.monotonic() - t0
        poison_exits = list(sup.exits)
        # A message kombu cannot even decode (body not base64) is "unrecoverable" for the
        # Celery consumer: the worker exits and is restarted, the message is gone, the
        # next job is served. (Only someone who can write to the broker can do this.)
        client.redis.lpush(keys.INFER_QUEUE, raw_message("%%% not base64 %%%", "application/json"))
        after = client.submit(JobRequest.simple("after a broken message", generation={"max_new_tokens": 2}))
        assert client.wait(after, timeout=90).state.value == "succeeded"
        broken_exits = sup.exits[len(poison_exits):]
    finally:
        sup.stop()

    p = final[poison]
    assert p.state.value == "failed" and p.error.code is ErrorCode.poison, p
    assert int(client.jobs.raw(poison)["crashes"]) == MAX_CRASHES
    assert poison_exits == [137] * MAX_CRASHES, poison_exits  # one death per delivery, then no more
    assert all(final[j].state.value == "succeeded" for j in good), \
        {j: (final[j].state.value, final[j].error) for j in good if final[j].state.value != "succeeded"}
    innocent_crashes = sum(int(client.jobs.raw(j).get("crashes", 0)) for j in good)
    assert client.result(poison) is None
    record(f"poison: 1 poison + {GOOD} good jobs; worker deaths {len(poison_exits)} "
           f"(exit codes {poison_exits}, each restarted), "
           f"poison failed with code poison after {MAX_CRASHES} crashes; good "
           f"succeeded {GOOD}/{GOOD} (crashes counted against good jobs: {innocent_crashes}); {elapsed:.0f}s. "
           f"Undecodable raw message: worker exit codes {broken_exits}, next job served")
