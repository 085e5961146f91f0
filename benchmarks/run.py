"""`internvl-queue bench`: run every benchmark in one process and report ratios.

    internvl-queue bench [--quick] [--json] [--model tiny|small|DIR] [--out DIR] [--report-dir DIR]

--quick (the tiny model, few jobs, a 12 s clip; under 3 minutes on 2 cores)
checks that the instrument works; the full mode (the "small" random-weight
model, whose compute matters on a CPU) gives the numbers in BENCHMARKS.md.
Results go to OUT/results.json, OUT/BENCHMARKS.md and a plot; the full mode
also rewrites the measured block of benchmarks/BENCHMARKS.md (or
--report-dir). Every headline is a ratio of two runs taken side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(".ivq-data") / "bench"


@dataclass
class Plan:
    model: str
    engine_jobs: int
    caps: list[int]
    service_jobs: int
    idle_jobs: int
    idle_mixes: tuple[str, ...]
    video_seconds: int
    video_repeats: int
    video_height: int
    images: int
    videos: int
    service_repeats: int = 1
    max_batch_size: int = 8  # the worker's defaults (worker/settings.py)
    max_wait_ms: float = 20.0
    thread_choices: list[int] = field(default_factory=lambda: [1, 2])


def plan_for(quick: bool, model: str | None) -> Plan:
    if quick:
        return Plan(model=model or "tiny", engine_jobs=16, caps=[1, 8], service_jobs=16, idle_jobs=5,
                    idle_mixes=("text", "one_tile"), video_seconds=60, video_repeats=2, video_height=360,
                    images=6, videos=2)
    return Plan(model=model or "small", engine_jobs=32, caps=[1, 4, 8, 16, 32], service_jobs=32, idle_jobs=12,
                idle_mixes=("text", "one_tile", "many_tiles", "video8", "realistic"), video_seconds=60,
                video_repeats=3, video_height=720, images=12, videos=4, service_repeats=2)


def _quiet(stream: Any) -> None:
    """Logs to stderr at WARNING, so --json leaves stdout to the one JSON object."""
    from worker.observability import configure_logging

    configure_logging("WARNING", stream=stream)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_all(plan: Plan, out: Path, progress) -> dict[str, Any]:
    from benchmarks.engine_bench import bench_grouping, bench_mix, bench_threads
    from benchmarks.mixes import build_media, build_mixes, write_media
    from benchmarks.report import machine_facts
    from benchmarks.service_bench import Service, ServiceConfig
    from benchmarks.video_bench import bench_video

    started = time.perf_counter()
    results: dict[str, Any] = {"meta": machine_facts(plan)}
    progress(f"video: sampling 8 frames from a {plan.video_seconds} s {plan.video_height}p clip")
    video = bench_video(out / "media", seconds=plan.video_seconds, repeats=plan.video_repeats,
                        height=plan.video_height)

    config = ServiceConfig(model=plan.model, out_dir=out, max_batch_size=plan.max_batch_size,
                           max_wait_ms=plan.max_wait_ms)
    progress(f"service: starting redis-server and a worker with model {plan.model!r}")
    with Service(config) as service:
        import torch

        results["meta"]["torch_threads"] = torch.get_num_threads()
        results["meta"]["cost_aware_grouping"] = service.runtime.batcher.similar_cost
        tile = int(service.runtime.loaded.processor.image_processor.size["height"])
        media = build_media(tile, images=plan.images, videos=plan.videos)
        write_media(media, service.media_dir)
        mixes = build_mixes(media, service.url_of, jobs=plan.engine_jobs)
        prepared = {name: service.prepared(mix) for name, mix in mixes.items()}

        engine: dict[str, Any] = {}
        for name, items in prepared.items():
            progress(f"engine: {name}, sequential and caps {plan.caps}")
            engine[name] = bench_mix(service.engine, items, caps=plan.caps, max_wait_ms=plan.max_wait_ms)
            engine[name]["mix"] = mixes[name].description
            engine[name]["prompt_tokens_mean"] = round(sum(p.prompt_tokens for p in items) / len(items), 1)
            engine[name]["tiles_mean"] = round(sum(p.tiles for p in items) / len(items), 2)
        progress("engine: padding with FIFO and with cost-aware grouping (realistic mix)")
        grouping = bench_grouping(service.engine, prepared["realistic"], cap=plan.max_batch_size,
                                  max_wait_ms=plan.max_wait_ms)
        progress(f"engine: torch threads {plan.thread_choices} (one_tile mix)")
        threads = bench_threads(service.engine, prepared["one_tile"], cap=plan.max_batch_size,
                                max_wait_ms=plan.max_wait_ms, choices=plan.thread_choices)

        svc_mixes = build_mixes(media, service.url_of, jobs=plan.service_jobs, seed=1)
        saturated: dict[str, Any] = {}
        for name, mix in svc_mixes.items():
            progress(f"service: {name}, {len(mix.requests)} jobs at once, then the bare engine on them "
                     f"(best of {plan.service_repeats})")
            items = service.prepared(mix)
            service.engine.generate_batch(items[:1])
            pairs = [(service.run_saturated(mix), service.run_engine_same_batching(items))
                     for _ in range(plan.service_repeats)]  # alternated, so load from elsewhere hits both
            run = max((p[0] for p in pairs), key=lambda x: x["jobs_per_s"])
            run["engine_same_batching"] = max((p[1] for p in pairs), key=lambda x: x["jobs_per_s"])
            run["service_over_engine"] = round(run["jobs_per_s"] / run["engine_same_batching"]["jobs_per_s"], 3)
            run["repeats"] = plan.service_repeats
            saturated[name] = run
        progress(f"service: one_tile at torch threads {plan.thread_choices}")
        chosen = torch.get_num_threads()
        for count in plan.thread_choices:
            torch.set_num_threads(count)
            threads[str(count)]["service_jobs_per_s"] = service.run_saturated(svc_mixes["one_tile"])["jobs_per_s"]
        torch.set_num_threads(chosen)
        idle: dict[str, Any] = {}
        for name in plan.idle_mixes:
            progress(f"service: {name}, one job at a time")
            idle[name] = service.run_idle(svc_mixes[name], plan.idle_jobs)

    default_cap = str(plan.max_batch_size)
    results.update({
        "batched_over_sequential": {m: r["batched_over_sequential"] for m, r in engine.items()},
        "service_over_engine": {m: r["service_over_engine"] for m, r in saturated.items()},
        "engine_busy_fraction": {m: r["engine_busy_fraction"] for m, r in saturated.items()},
        "idle_latency_overhead_ms": {"max_wait_ms": plan.max_wait_ms, "by_mix": idle,
                                     "p50": idle["one_tile"]["p50"], "p99": idle["one_tile"]["p99"]},
        "padding_waste": grouping,
        "video_sampling_speedup": video["speedup"],
        "jobs_per_s": {m: {"sequential": r["sequential"]["jobs_per_s"],
                           **{cap: run["jobs_per_s"] for cap, run in r["batched"].items()}}
                       for m, r in engine.items()},
        "torch_threads": threads,
        "details": {"engine": engine, "service": saturated, "video": video},
    })
    results["targets"] = targets(results, default_cap, plan.max_wait_ms)
    results["meta"]["bench_seconds"] = round(time.perf_counter() - started, 1)
    return results


def targets(r: dict[str, Any], cap: str, max_wait_ms: float) -> dict[str, Any]:
    def check(value: float, goal: float, higher: bool = True) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": bool(value >= goal if higher else value <= goal)}

    pad = r["padding_waste"]
    return {
        "batched_over_sequential_one_tile_default_cap": check(r["batched_over_sequential"]["one_tile"][cap], 3.0),
        "service_over_engine_min": check(min(r["service_over_engine"].values()), 0.9),
        "engine_busy_fraction_min": check(min(r["engine_busy_fraction"].values()), 0.9),
        "idle_latency_overhead_p50_ms": check(r["idle_latency_overhead_ms"]["p50"], max_wait_ms + 15, higher=False),
        "padding_waste_cut_by_grouping": {"value": pad["cost_aware"], "target": f"< {pad['fifo']}",
                                          "met": pad["cost_aware"] < pad["fifo"]},
        "video_sampling_speedup": check(r["video_sampling_speedup"], 5.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="internvl-queue bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few jobs (a smoke run, < 3 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--model", default=None, help="tiny | small | a checkpoint directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"work and cache dir (default {DEFAULT_OUT})")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="also write BENCHMARKS.md + plot here (full mode default: the benchmarks package)")
    args = parser.parse_args(argv)

    _quiet(sys.stderr)
    plan = plan_for(args.quick, args.model)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    results = run_all(plan, out, progress)
    words = list(argv if argv is not None else sys.argv[1:])
    # The report is committed: name the out dir, not where it lay on this machine.
    words = ["OUT" if i and words[i - 1] in ("--out", "--report-dir") else w for i, w in enumerate(words)]
    results["meta"]["command"] = "internvl-queue bench " + " ".join(words)
    results["meta"]["quick"] = args.quick
    (out / "results.json").write_text(json.dumps(results, indent=2))

    from benchmarks.report import write_report

    write_report(results, out)
    report_dir = args.report_dir or (None if args.quick else Path(__file__).resolve().parent)
    if report_dir is not None:
        write_report(results, report_dir)
    if args.json:
        print(json.dumps(results))
    else:
        from benchmarks.report import summary

        print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
