"""Vision reuse and priority inside the worker, measured on the bare continuous engine behind the worker's StepLoop.

    python -m benchmarks.reuse_bench [--model small] [--priority-model M] [--rounds 3] [--threads 1]
                                     [--only reuse|priority] [--out FILE]

- vision reuse: 20 images x 4 questions (the shared mix) and 80 distinct
  images (448 px JPEGs, 16 tokens each), all submitted at once, in jobs/s,
  with the vision cache on (the worker's default) and off, alternating, each
  run on a fresh engine (an empty cache). Tile digests are taken at submit,
  inside the clock and in this process (the worker takes them in its
  preprocessing processes: this counts them against the cache). The vision share is the
  engine's vision time over its step time with the cache off: the ceiling.
- priority: interactive one-image jobs arriving one after another, their
  latency (submit to result) on an idle engine and during a flood of batch
  jobs (priority -1), with priority on, and with every job at one priority
  (first come, first served: the behaviour before it). The flood keeps
  2 x cap batch jobs held, as a worker's task threads do (Celery prefetch =
  threads = 2 x max_batch_size); batch jobs/s is counted over the same span.
  The vision cache is off here (the flood cycles through 32 images).
Every ratio is of runs taken side by side in this one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from worker.model.steploop import StepLoop

QUESTIONS = ("What is the main object?", "What colour is it?", "Read any text in the image.",
             "Is anything damaged?")
IMAGE_PX, TOKENS, CAP = 448, 16, 16


def load(model: str, threads: int) -> Any:
    import torch

    from model_runtime.loading import load_runtime

    torch.set_num_threads(threads)
    return load_runtime(model, cache_dir=Path(tempfile.gettempdir()) / "ivq-bench-models", device="cpu")


def images(count: int, seed: int = 0) -> list[Any]:
    from model_runtime.media import MediaLimits, decode_image
    from model_runtime.samples import make_sample_image

    return [decode_image(make_sample_image(IMAGE_PX, IMAGE_PX, seed=seed + i), MediaLimits()) for i in range(count)]


def job(loaded: Any, image: Any, question: str, request_id: str, priority: int = 0) -> Any:
    from model_runtime.prompts import prepare, simple_chat
    from model_runtime.types import Sampling

    url = f"file://{request_id}.jpg"
    item = prepare(loaded.processor, simple_chat(question, images=[url]), {url: image},
                   Sampling(max_new_tokens=TOKENS, min_new_tokens=TOKENS), request_id=request_id,
                   context_length=loaded.context_length)
    item.priority = priority
    return item


def engine(loaded: Any, cache_mb: float) -> Any:
    from model_runtime.capacity import CPU_DEFAULT_BATCH_TOKENS
    from model_runtime.engine_continuous import ContinuousEngine
    from worker.settings import Settings

    fields = Settings.model_fields
    return ContinuousEngine(loaded, max_batch_size=CAP, max_batch_tokens=CPU_DEFAULT_BATCH_TOKENS,
                            prefill_chunk_tokens=fields["prefill_chunk_tokens"].default,
                            vision_chunk_tiles=fields["vision_chunk_tiles"].default, vision_cache_mb=cache_mb)


def loop_for(eng: Any) -> StepLoop:
    from model_runtime.vision_cache import ensure_keys

    return StepLoop(eng, before_submit=ensure_keys if eng.vision_cache.enabled else None, name="bench").start()


# ---------------------------------------------------------------- vision reuse
def reuse_mixes(loaded: Any) -> dict[str, list[tuple[Any, str]]]:
    rng = random.Random(25)
    shared_images, distinct_images = images(20, seed=100), images(80, seed=200)
    shared = [(image, q) for image in shared_images for q in QUESTIONS]
    rng.shuffle(shared)  # the questions about one image arrive spread out, not back to back
    distinct = [(image, QUESTIONS[i % 4]) for i, image in enumerate(distinct_images)]
    return {"shared_20x4": shared, "distinct_80": distinct}


def run_reuse(loaded: Any, mix: list[tuple[Any, str]], cache_mb: float, tag: str) -> dict[str, Any]:
    items = [job(loaded, image, q, f"{tag}-{i}") for i, (image, q) in enumerate(mix)]
    eng = engine(loaded, cache_mb)
    loop = loop_for(eng)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        outs = [f.result(timeout=3600) for f in [loop.submit(item) for item in items]]
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        loop.stop(drain=True, timeout=60)
    s, cache = eng.stats, eng.vision_cache.snapshot()
    return {"jobs_per_s": len(items) / seconds, "seconds": seconds, "jobs_per_cpu_s": len(items) / cpu,
            "vision_share": s.vision_seconds / s.generate_seconds,
            "vision_tiles": s.vision_tiles, "tiles": sum(p.tiles for p in items), "hits": cache.hits,
            "deduped": cache.deduped, "misses": cache.misses, "token_ids": [o.token_ids for o in outs]}


def bench_reuse(loaded: Any, rounds: int) -> dict[str, Any]:
    mixes = reuse_mixes(loaded)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"on": [], "off": []} for m in mixes}
    for r in range(rounds):
        for name, mix in mixes.items():
            for variant in (("off", "on") if r % 2 == 0 else ("on", "off")):  # alternate which goes first
                mb = 0 if variant == "off" else 256
                runs[name][variant].append(run_reuse(loaded, mix, mb, f"{name}-{variant}-{r}"))
    out: dict[str, Any] = {}
    for name, by in runs.items():
        pairs = list(zip(by["on"], by["off"], strict=True))
        same = all(a["token_ids"] == b["token_ids"] for a, b in pairs)
        out[name] = {
            "on_jobs_per_s": round(max(x["jobs_per_s"] for x in by["on"]), 3),
            "off_jobs_per_s": round(max(x["jobs_per_s"] for x in by["off"]), 3),
            "ratio_best": round(max(x["jobs_per_s"] for x in by["on"]) / max(x["jobs_per_s"] for x in by["off"]), 3),
            "ratio_median": round(statistics.median(a["jobs_per_s"] / b["jobs_per_s"] for a, b in pairs), 3),
            "ratios_per_round": [round(a["jobs_per_s"] / b["jobs_per_s"], 3) for a, b in pairs],
            # Process CPU seconds: what the machine's other load disturbs least.
            "cpu_ratio_median": round(statistics.median(a["jobs_per_cpu_s"] / b["jobs_per_cpu_s"]
                                                        for a, b in pairs), 3),
            "cpu_ratios_per_round": [round(a["jobs_per_cpu_s"] / b["jobs_per_cpu_s"], 3) for a, b in pairs],
            "vision_share_off": round(statistics.median(x["vision_share"] for x in by["off"]), 3),
            "vision_share_on": round(statistics.median(x["vision_share"] for x in by["on"]), 3),
            "tiles": by["on"][0]["tiles"], "tiles_computed_on": by["on"][0]["vision_tiles"],
            "hits": by["on"][0]["hits"], "deduped": by["on"][0]["deduped"], "same_tokens": same}
    return out


# ---------------------------------------------------------------- priority
def run_priority(loaded: Any, interactive: list[Any], pool: list[Any] | None, *, gap_s: float) -> dict[str, Any]:
    """Interactive jobs one after another (`gap_s` apart), alone or during an endless flood of copies of `pool`
    keeping 2 x cap batch jobs held. The vision cache is off: every flood job runs the tower."""
    eng = engine(loaded, 0)
    loop = loop_for(eng)
    stop = threading.Event()
    done_batch: list[float] = []
    feeder = None
    if pool is not None:
        held = threading.Semaphore(2 * CAP)

        def feed() -> None:
            for n in itertools.count():
                while not held.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = dataclasses.replace(pool[n % len(pool)], request_id=f"flood-{n}")
                future = loop.submit(item)
                future.add_done_callback(lambda _f: (done_batch.append(time.perf_counter()), held.release()))

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(2.0)  # the flood is in full swing
    latencies = []
    started = time.perf_counter()
    try:
        for item in interactive:
            t0 = time.perf_counter()
            loop.submit(dataclasses.replace(item)).result(timeout=600)
            latencies.append(time.perf_counter() - t0)
            time.sleep(gap_s)
        span = time.perf_counter() - started
        batch_done = sum(1 for t in done_batch if t >= started)
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(timeout=30)
        loop.stop(drain=False, timeout=120)
    return {"p50_ms": statistics.median(latencies) * 1000.0, "latencies_ms": [round(x * 1000, 1) for x in latencies],
            "batch_jobs_per_s": batch_done / span if pool is not None else None, "preempted": eng.stats.preempted}


def bench_priority(loaded: Any, rounds: int, *, interactive_jobs: int = 10, gap_s: float = 0.3) -> dict[str, Any]:
    pics = images(interactive_jobs, seed=300)
    flood_pics = images(32, seed=400)
    interactive = [job(loaded, pics[i], QUESTIONS[i % 4], f"i{i}", priority=0) for i in range(interactive_jobs)]
    pools = {priority: [job(loaded, flood_pics[i], f"Batch question {i}.", f"b{i}", priority=priority)
                        for i in range(len(flood_pics))] for priority in (-1, 0)}
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "flood_priority": [], "flood_fifo": []}
    for r in range(rounds):
        order = ["idle", "flood_priority", "flood_fifo"] if r % 2 == 0 else ["flood_fifo", "flood_priority", "idle"]
        for variant in order:
            pool = None if variant == "idle" else pools[-1 if variant == "flood_priority" else 0]
            runs[variant].append(run_priority(loaded, interactive, pool, gap_s=gap_s))
    idle = statistics.median(x["p50_ms"] for x in runs["idle"])
    on = statistics.median(x["p50_ms"] for x in runs["flood_priority"])
    fifo = statistics.median(x["p50_ms"] for x in runs["flood_fifo"])
    batch_on = statistics.median(x["batch_jobs_per_s"] for x in runs["flood_priority"])
    batch_fifo = statistics.median(x["batch_jobs_per_s"] for x in runs["flood_fifo"])
    return {"idle_p50_ms": round(idle, 1), "flood_p50_ms_priority": round(on, 1), "flood_p50_ms_fifo": round(fifo, 1),
            "flood_over_idle_priority": round(on / idle, 3), "flood_over_idle_fifo": round(fifo / idle, 3),
            "batch_jobs_per_s_priority": round(batch_on, 3), "batch_jobs_per_s_fifo": round(batch_fifo, 3),
            "batch_throughput_ratio": round(batch_on / batch_fifo, 3),
            "preempted": [x["preempted"] for x in runs["flood_priority"]], "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reuse_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--priority-model", default=None, help="the priority section's model (default: --model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["reuse", "priority"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks.run import _quiet

    _quiet(sys.stderr)  # stdout is the one JSON object
    loaded = load(args.model, args.threads)
    warm = engine(loaded, 0)
    warm.run_until_done([job(loaded, images(1, seed=9)[0], "warm", "warm")])
    result: dict[str, Any] = {"model": args.model, "torch_threads": args.threads, "rounds": args.rounds, "cap": CAP,
                              "max_new_tokens": TOKENS, "image_px": IMAGE_PX}
    if args.only in (None, "reuse"):
        result["vision_reuse"] = bench_reuse(loaded, args.rounds)
    if args.only in (None, "priority"):
        if args.priority_model not in (None, args.model):
            loaded = load(args.priority_model, args.threads)
            warm = engine(loaded, 0)
            warm.run_until_done([job(loaded, images(1, seed=9)[0], "warm", "warm")])
        result["priority_model"] = args.priority_model or args.model
        result["priority"] = bench_priority(loaded, args.rounds)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
