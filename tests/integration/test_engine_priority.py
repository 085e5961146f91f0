"""Interactive before batch inside the continuous engine, and preemption that changes no output.

Batch-class requests (a batch file's jobs: priority below 0) wait behind
interactive ones; an interactive request that finds the running batch full of
batch-class rows takes the place of the newest, which is recomputed from
scratch when it rejoins. Every output still equals `model.generate` alone.
"""

from __future__ import annotations

import dataclasses
from model_runtime.prompts import simple_chat
from model_runtime.types import Output, Prepared, Sampling
from worker.model.steploop import StepLoop
from tests.integration.test_engine_continuous import GRID, IMG, TALL, engine, media, prep, solo_tokens

__all__ = ["media"]  # the module-scoped fixture, shared

BATCH = -1  # api_client.keys.BATCH_PRIORITY


def job(runtime, media, request_id: str, *, priority: int, tokens: int = 16, image: str = IMG) -> Prepared:
    item = prep(runtime, simple_chat(f"Describe {request_id}.", images=[image]), media,
                Sampling(max_new_tokens=tokens, min_new_tokens=tokens), request_id)
    return dataclasses.replace(item, priority=priority)


def run(eng, *, add_at: dict[int, list[Prepared]]) -> tuple[dict[str, Output], list[str]]:
    """Step until done, adding requests at the given steps; results and the order they finished in."""
    results: dict[str, Output] = {}
    order: list[str] = []
    step = 0
    while step <= max(add_at) or eng.has_work():
        for item in add_at.get(step, []):
            eng.add(item)
        for prepared, result in eng.step():
            assert isinstance(result, Output), result
            results[prepared.request_id] = result
            order.append(prepared.request_id)
        step += 1
    return results, order


def test_an_interactive_request_behind_queued_batch_ones_is_admitted_first(tiny_runtime, media):
    batch = [job(tiny_runtime, media, f"batch-{i}", priority=BATCH, tokens=6) for i in range(3)]
    urgent = job(tiny_runtime, media, "urgent", priority=0, tokens=6, image=TALL)
    eng = engine(tiny_runtime, max_batch_size=1)
    results, order = run(eng, add_at={0: [*batch, urgent]})
    assert order == ["urgent", "batch-0", "batch-1", "batch-2"]
    assert eng.stats.preempted == 0  # nothing ran yet: ordering alone did it
    for item in (*batch, urgent):
        assert results[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_an_interactive_request_preempts_a_batch_row_whose_output_stays_the_same(tiny_runtime, media):
    batch = [job(tiny_runtime, media, f"batch-{i}", priority=BATCH, tokens=20) for i in range(3)]
    urgent = job(tiny_runtime, media, "urgent", priority=5, tokens=4, image=TALL)
    eng = engine(tiny_runtime, max_batch_size=2)
    results, order = run(eng, add_at={0: batch, 6: [urgent]})  # at step 6 two batch rows are decoding
    assert eng.stats.preempted == 1
    assert order[0] == "urgent"  # it did not wait for a batch row to end
    assert results["urgent"].wait_ms < min(results[b.request_id].generate_ms for b in batch[:2])
    for item in (*batch, urgent):  # the preempted row was recomputed: the same tokens
        assert results[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_a_batch_request_still_joining_goes_back_to_the_queue_before_a_running_row_is_preempted(tiny_runtime, media):
    batch = [job(tiny_runtime, media, f"batch-{i}", priority=BATCH, tokens=8, image=GRID) for i in range(2)]
    urgent = job(tiny_runtime, media, "urgent", priority=0, tokens=4, image=TALL)
    eng = engine(tiny_runtime, max_batch_size=2, vision_chunk_tiles=1)  # 13 tiles: several steps of joining
    results, order = run(eng, add_at={0: batch, 1: [urgent]})
    assert order[0] == "urgent" and eng.stats.preempted == 0  # no decoding row lost its work
    for item in (*batch, urgent):
        assert results[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_interactive_rows_are_never_preempted_for_each_other(tiny_runtime, media):
    first = [job(tiny_runtime, media, f"first-{i}", priority=0, tokens=10) for i in range(2)]
    later = job(tiny_runtime, media, "later", priority=9, tokens=4, image=TALL)
    eng = engine(tiny_runtime, max_batch_size=2)
    _, order = run(eng, add_at={0: first, 4: [later]})
    assert eng.stats.preempted == 0 and order[-1] == "later"


def test_the_model_thread_serves_an_interactive_job_submitted_behind_batch_jobs_first(tiny_runtime, media):
    """Through the worker's StepLoop: a backlog of batch jobs, then one interactive job; it ends first."""
    eng = engine(tiny_runtime, max_batch_size=2)
    loop = StepLoop(eng)  # started once every job is in its queue
    try:
        futures = {f"batch-{i}": loop.submit(job(tiny_runtime, media, f"batch-{i}", priority=BATCH, tokens=12))
                   for i in range(6)}
        futures["urgent"] = loop.submit(job(tiny_runtime, media, "urgent", priority=1, tokens=12, image=TALL))
        ended: list[str] = []
        for name, future in futures.items():
            future.add_done_callback(lambda _f, name=name: ended.append(name))
        loop.start()
        outs = {name: future.result(timeout=60) for name, future in futures.items()}
    finally:
        loop.stop(drain=True, timeout=30)
    assert ended.index("urgent") <= 1  # in the first pair admitted, not behind three pairs of batch jobs
    assert outs["urgent"].wait_ms < min(outs[f"batch-{i}"].wait_ms for i in range(2, 6))
