"""`internvl-queue bench`: run every benchmark in one process and report ratios.

    internvl-queue bench [--quick] [--json] [--model tiny|small|DIR] [--out DIR] [--report-dir DIR]

--quick (the tiny model, few jobs, caps 1 and 8; under 3 minutes on 2 cores)
checks that the instrument works; the full mode (the "small" random-weight
model, whose compute matters on a CPU) gives the numbers in BENCHMARKS.md.
Each job asks for its own max_new_tokens (log-uniform 16..256, the headline);
the same jobs at max_new_tokens=16 give a second set of tables. One generate
per job, the static engine and the continuous engine run side by side.
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


def worker_default(name: str) -> Any:
    """A worker setting's default (worker/settings.py), without reading the environment."""
    from worker.settings import Settings

    return Settings.model_fields[name].default


@dataclass
class Plan:
    model: str
    engine_jobs: int
    caps: list[int]  # per-job lengths (the headline)
    fixed_caps: list[int]  # max_new_tokens=16 for every job
    service_jobs: int
    celery_jobs: int  # one_tile jobs for the service against the plain Celery task
    latency_long_jobs: int  # long jobs already running when the short ones arrive
    idle_jobs: int
    idle_mixes: tuple[str, ...]
    video_seconds: int
    video_repeats: int
    video_height: int
    images: int
    videos: int
    service_repeats: int = 1
    max_batch_size: int = 16  # the default cap: the worker's, or the largest cap below it
    max_wait_ms: float = 20.0  # the worker's (worker/settings.py)
    fixed_max_new_tokens: int = 16
    thread_choices: list[int] = field(default_factory=lambda: [1, 2])
    structured_jobs: int = 32  # text jobs for structured_over_free, at the default cap
    structured_repeats: int = 2
    quick: bool = False


def default_cap(caps: list[int]) -> int:
    """The worker's max_batch_size when the caps include it, else the largest cap below it."""
    worker = int(worker_default("max_batch_size"))
    return worker if worker in caps else max([c for c in caps if c <= worker] or [min(caps)])


def plan_for(quick: bool, model: str | None) -> Plan:
    wait = float(worker_default("max_wait_ms"))
    if quick:
        caps = [1, 8]
        cap = default_cap(caps)
        return Plan(model=model or "tiny", engine_jobs=16, caps=caps, fixed_caps=caps, service_jobs=16,
                    celery_jobs=16, latency_long_jobs=cap // 2, idle_jobs=5, idle_mixes=("text", "one_tile"),
                    video_seconds=60, video_repeats=2, video_height=360, images=6, videos=2, max_batch_size=cap,
                    max_wait_ms=wait, structured_jobs=cap, structured_repeats=1, quick=True)
    caps = [1, 4, 8, 16, 32]
    cap = default_cap(caps)
    return Plan(model=model or "small", engine_jobs=32, caps=caps, fixed_caps=caps, service_jobs=32,
                celery_jobs=48, latency_long_jobs=cap // 2, idle_jobs=12,
                idle_mixes=("text", "one_tile", "many_tiles", "video8", "realistic"), video_seconds=60,
                video_repeats=3, video_height=720, images=12, videos=4, service_repeats=2, max_batch_size=cap,
                max_wait_ms=wait)


def _quiet(stream: Any) -> None:
    """Logs to stderr at WARNING, so --json leaves stdout to the one JSON object."""
    from worker.ops.logs import configure_logging

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


class Phases:
    """Wall seconds per phase (meta.phase_seconds), so a slow phase is easy to find."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._started = 0.0

    def __call__(self, name: str, message: str) -> None:
        self.end()
        self.progress(message)
        self._name, self._started = name, time.perf_counter()

    def end(self) -> None:
        if self._name is not None:
            spent = time.perf_counter() - self._started
            self.seconds[self._name] = round(self.seconds.get(self._name, 0.0) + spent, 1)
            self._name = None


def run_all(plan: Plan, out: Path, progress) -> dict[str, Any]:
    from benchmarks.api_bench import bench_api_over_direct
    from benchmarks.celery_baseline import CeleryBaseline
    from benchmarks.control_plane import bench_control_plane, control_plane_plan
    from benchmarks.engine_bench import bench_grouping, bench_mix, bench_short_job_latency, bench_threads, warm_up
    from benchmarks.mixes import build_media, build_mixes, write_media
    from benchmarks.report import machine_facts
    from benchmarks.service_bench import Service, ServiceConfig
    from benchmarks.structured_bench import bench_structured
    from benchmarks.video_bench import bench_video

    started = time.perf_counter()
    phase = Phases(progress)
    results: dict[str, Any] = {"meta": machine_facts(plan)}
    phase("video", f"video: sampling 8 frames from a {plan.video_seconds} s {plan.video_height}p clip")
    video = bench_video(out / "media", seconds=plan.video_seconds, repeats=plan.video_repeats,
                        height=plan.video_height)

    # Its own redis-server and worker processes, before the in-process service (which would take its jobs).
    phase("control_plane", "control plane: the real worker around an instant engine, then the tiny model")
    results["control_plane"] = bench_control_plane(out / "control-plane", control_plane_plan(plan.quick),
                                                   progress=progress)

    cap = plan.max_batch_size
    config = ServiceConfig(model=plan.model, out_dir=out, max_batch_size=cap, max_wait_ms=plan.max_wait_ms)
    phase("service_start", f"service: starting redis-server and a worker with model {plan.model!r}")
    with Service(config) as service:
        import torch

        loaded = service.runtime.ctx.loaded
        knobs = service.knobs
        meta = results["meta"]
        meta.update(torch_threads=torch.get_num_threads(), engine=service.settings.engine,
                    cost_aware_grouping=getattr(service.runtime.ctx.queue, "similar_cost", None),
                    continuous=knobs.as_dict())
        tile = int(loaded.processor.image_processor.size["height"])
        media = build_media(tile, images=plan.images, videos=plan.videos)
        write_media(media, service.media_dir)
        regimes = {"per_job": build_mixes(media, service.url_of, jobs=plan.engine_jobs),
                   "fixed": build_mixes(media, service.url_of, jobs=plan.engine_jobs,
                                        max_new_tokens=plan.fixed_max_new_tokens)}
        prepared = {regime: {name: service.prepared(mix) for name, mix in mixes.items()}
                    for regime, mixes in regimes.items()}

        engine: dict[str, dict[str, Any]] = {"per_job": {}, "fixed": {}}
        for regime, caps in (("per_job", plan.caps), ("fixed", plan.fixed_caps)):
            lengths = "per-job lengths" if regime == "per_job" else f"max_new_tokens {plan.fixed_max_new_tokens}"
            for name, items in prepared[regime].items():
                phase(f"engine_{regime}",
                      f"engine ({lengths}): {name}, sequential, static and continuous at caps {caps}")
                run = bench_mix(loaded, items, caps=caps, max_wait_ms=plan.max_wait_ms, knobs=knobs,
                                max_batch_cost=service.settings.max_batch_cost)
                run["mix"] = regimes[regime][name].description
                run["prompt_tokens_mean"] = round(sum(p.prompt_tokens for p in items) / len(items), 1)
                run["tiles_mean"] = round(sum(p.tiles for p in items) / len(items), 2)
                engine[regime][name] = run
        phase("short_job_latency", f"engine: short jobs arriving behind {plan.latency_long_jobs} long ones "
                                   f"(one_tile, cap {cap}), continuous and static")
        latency = bench_short_job_latency(loaded, prepared["per_job"]["one_tile"], cap=cap,
                                          max_wait_ms=plan.max_wait_ms, knobs=knobs, long_jobs=plan.latency_long_jobs)
        phase("padding", "engine: padding with FIFO and with cost-aware grouping (static, realistic mix, "
                         f"max_new_tokens {plan.fixed_max_new_tokens})")
        grouping = bench_grouping(loaded, prepared["fixed"]["realistic"], cap=cap, max_wait_ms=plan.max_wait_ms)
        phase("structured", f"engine: every row constrained to a JSON schema, then the same jobs free at the same "
                            f"lengths (text mix, cap {cap})")
        structured = bench_structured(loaded, prepared["per_job"]["text"][: plan.structured_jobs], cap=cap,
                                      knobs=knobs, repeats=plan.structured_repeats)
        phase("threads", f"engine: torch threads {plan.thread_choices} (one_tile mix)")
        threads = bench_threads(loaded, prepared["per_job"]["one_tile"], cap=cap, max_wait_ms=plan.max_wait_ms,
                                choices=plan.thread_choices, knobs=knobs)

        svc_mixes = build_mixes(media, service.url_of, jobs=plan.service_jobs, seed=1)
        saturated: dict[str, Any] = {}
        for name, mix in svc_mixes.items():
            phase("service", f"service: {name}, {len(mix.requests)} jobs at once, then the bare "
                             f"{service.settings.engine} engine on them (best of {plan.service_repeats})")
            items = service.prepared(mix)
            warm_up(loaded, items, cap=cap, knobs=knobs)
            pairs = [(service.run_saturated(mix), service.run_engine_same_batching(items))
                     for _ in range(plan.service_repeats)]  # alternated, so load from elsewhere hits both
            run = max((p[0] for p in pairs), key=lambda x: x["jobs_per_s"])
            run["engine_same_batching"] = max((p[1] for p in pairs), key=lambda x: x["jobs_per_s"])
            run["service_over_engine"] = round(run["jobs_per_s"] / run["engine_same_batching"]["jobs_per_s"], 3)
            run["repeats"] = plan.service_repeats
            saturated[name] = run

        e2e_mix = build_mixes(media, service.url_of, jobs=plan.celery_jobs, names=("one_tile",), seed=2)["one_tile"]
        phase("celery_task", f"service against a plain Celery task (one generate per job): {plan.celery_jobs} "
                             f"one_tile jobs at once (best of {plan.service_repeats})")
        # Leaving a Celery worker stops every worker of the process: this one stays up until the service stops.
        base = service.attach(CeleryBaseline(service.redis.url, loaded=loaded, store=service.runtime.store,
                                             media_limits=service.runtime.ctx.media_limits,
                                             max_tiles=service.settings.max_tiles, alongside=service.app))
        base.run(e2e_mix.requests[:2])  # the baseline worker's first task off the clock
        e2e_service, e2e_celery = against_celery_task(service, base, e2e_mix, plan.service_repeats, "tokens_per_s")
        # The same at fixed short outputs (tagging, moderation): every job max_new_tokens 16, jobs/s.
        e2e_fixed_mix = build_mixes(media, service.url_of, jobs=plan.celery_jobs, names=("one_tile",), seed=2,
                                    max_new_tokens=plan.fixed_max_new_tokens)["one_tile"]
        phase("celery_task_fixed", f"service against the plain Celery task: {plan.celery_jobs} one_tile jobs at "
                                   f"max_new_tokens {plan.fixed_max_new_tokens}")
        fixed_service, fixed_celery = against_celery_task(service, base, e2e_fixed_mix, plan.service_repeats,
                                                          "jobs_per_s")

        phase("api", f"service through the HTTP API against JobClient: {plan.celery_jobs} one_tile jobs at once")
        api_direct = bench_api_over_direct(service, e2e_mix.requests, plan.service_repeats)

        phase("threads_service", f"service: one_tile at torch threads {plan.thread_choices}")
        chosen = torch.get_num_threads()
        for count in plan.thread_choices:
            torch.set_num_threads(count)
            threads[str(count)]["service_jobs_per_s"] = service.run_saturated(svc_mixes["one_tile"])["jobs_per_s"]
        torch.set_num_threads(chosen)
        idle: dict[str, Any] = {}
        for name in plan.idle_mixes:
            phase("idle", f"service: {name}, one job at a time")
            idle[name] = service.run_idle(svc_mixes[name], plan.idle_jobs)
        phase("shutdown", "service: stopping")
    phase.end()

    c = str(cap)
    fixed_cap = c if cap in plan.fixed_caps else str(max([x for x in plan.fixed_caps if x <= cap] or plan.fixed_caps))
    per_job, fixed = engine["per_job"], engine["fixed"]

    def ratios(table: dict[str, Any], key: str) -> dict[str, Any]:
        return {m: r[key] for m, r in table.items()}

    stall = {m: r["continuous"][c]["max_decode_stall_ms"] for m, r in per_job.items()}
    results.update({
        "batched_over_sequential": ratios(per_job, "batched_over_sequential"),
        "continuous_over_sequential": ratios(per_job, "continuous_over_sequential"),
        "continuous_over_static": {m: r["continuous_over_static"][c] for m, r in per_job.items()},
        "batching_never_slower": min((v for r in per_job.values()
                                      for k, v in r["continuous_over_sequential"].items() if int(k) > 1), default=0.0),
        "decode_stall_ms": {"by_mix": stall, "max": max(stall.values()), "cap": cap,
                            "prefill_chunk_tokens": knobs.prefill_chunk_tokens,
                            "vision_chunk_tiles": knobs.vision_chunk_tiles},
        "fixed_lengths": {
            "max_new_tokens": plan.fixed_max_new_tokens, "caps": [str(x) for x in plan.fixed_caps],
            "continuous_over_sequential": ratios(fixed, "continuous_over_sequential"),
            "batched_over_sequential": ratios(fixed, "batched_over_sequential"),
            "continuous_over_static": {m: r["continuous_over_static"][fixed_cap] for m, r in fixed.items()},
            "default_cap": fixed_cap,
        },
        # The scheduler never loses to one static batch: the lowest continuous/static over the mixes,
        # every job at max_new_tokens 16, the default cap.
        "continuous_over_static_fixed_min": min(r["continuous_over_static"][fixed_cap] for r in fixed.values()),
        "short_job_latency": latency,
        "service_over_engine": {m: r["service_over_engine"] for m, r in saturated.items()},
        "engine_busy_fraction": {m: r["engine_busy_fraction"] for m, r in saturated.items()},
        "end_to_end_over_celery_task": {
            "service_tokens_per_s": e2e_service["tokens_per_s"], "celery_task_tokens_per_s": e2e_celery["tokens_per_s"],
            "ratio": round(e2e_service["tokens_per_s"] / e2e_celery["tokens_per_s"], 3), "jobs": plan.celery_jobs,
            "mix": "one_tile", "service": e2e_service, "celery_task": e2e_celery, "repeats": plan.service_repeats,
        },
        "end_to_end_over_celery_task_fixed": {
            "max_new_tokens": plan.fixed_max_new_tokens, "jobs": plan.celery_jobs, "mix": "one_tile",
            "service_jobs_per_s": fixed_service["jobs_per_s"], "celery_task_jobs_per_s": fixed_celery["jobs_per_s"],
            "ratio": round(fixed_service["jobs_per_s"] / fixed_celery["jobs_per_s"], 3),
            "service": fixed_service, "celery_task": fixed_celery, "repeats": plan.service_repeats,
        },
        "api_over_direct": api_direct,
        "structured_over_free": structured,
        "idle_latency_overhead_ms": {"max_wait_ms": plan.max_wait_ms, "by_mix": idle,
                                     "p50": idle["one_tile"]["p50"], "p99": idle["one_tile"]["p99"]},
        "padding_waste": grouping,
        "video_sampling_speedup": video["speedup"],
        "jobs_per_s": {m: {"sequential": r["sequential"]["jobs_per_s"],
                           **{k: run["jobs_per_s"] for k, run in r["batched"].items()}}
                       for m, r in per_job.items()},
        "tokens_per_s": {m: {"sequential": r["sequential"]["tokens_per_s"],
                             "static": {k: run["tokens_per_s"] for k, run in r["batched"].items()},
                             "continuous": {k: run["tokens_per_s"] for k, run in r["continuous"].items()}}
                         for m, r in per_job.items()},
        "torch_threads": threads,
        "details": {"engine": per_job, "engine_fixed_lengths": fixed,
                    "continuous_over_static_by_cap": ratios(per_job, "continuous_over_static"),
                    "fixed_lengths_continuous_over_static_by_cap": ratios(fixed, "continuous_over_static"),
                    "service": saturated, "video": video},
    })
    results["targets"] = targets(results, c, str(max(plan.caps)), plan.max_wait_ms)
    results["meta"]["phase_seconds"] = phase.seconds
    results["meta"]["bench_seconds"] = round(time.perf_counter() - started, 1)
    return results


def against_celery_task(service: Any, base: Any, mix: Any, repeats: int, key: str) -> tuple[dict, dict]:
    """The service and the plain Celery task on the same jobs, alternated `repeats` times; the best run of each
    by `key` (tokens/s or jobs/s)."""
    pairs = [(service.run_saturated(mix), base.run(mix.requests)) for _ in range(repeats)]
    return (max((p[0] for p in pairs), key=lambda x: x[key]), max((p[1] for p in pairs), key=lambda x: x[key]))


def targets(r: dict[str, Any], cap: str, top: str, max_wait_ms: float) -> dict[str, Any]:
    """Every headline against its goal; `cap` is the default cap, `top` the largest one measured."""
    def check(value: float, goal: float, higher: bool = True) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": bool(value >= goal if higher else value <= goal)}

    pad = r["padding_waste"]
    cont = r["continuous_over_sequential"]
    return {
        "continuous_over_sequential_text_largest_cap": check(cont["text"][top], 3.0),
        "continuous_over_sequential_one_tile_largest_cap": check(cont["one_tile"][top], 2.0),
        "continuous_over_sequential_realistic_largest_cap": check(cont["realistic"][top], 1.6),
        "batching_never_slower": check(r["batching_never_slower"], 1.0),
        "continuous_over_static_realistic_default_cap": check(r["continuous_over_static"]["realistic"], 1.8),
        "continuous_over_static_fixed_min": check(r["continuous_over_static_fixed_min"], 1.0),
        # continuous p50 <= 0.5 x static p50
        "short_job_latency_static_p50_over_continuous_p50": check(
            r["short_job_latency"]["static_p50_over_continuous_p50"], 2.0),
        "end_to_end_over_celery_task": check(r["end_to_end_over_celery_task"]["ratio"], 2.0),
        "end_to_end_over_celery_task_fixed": check(r["end_to_end_over_celery_task_fixed"]["ratio"], 3.0),
        "api_over_direct": check(r["api_over_direct"]["ratio"], 0.9),
        "structured_over_free": check(r["structured_over_free"]["ratio"], 0.8),
        "batched_over_sequential_one_tile_default_cap": check(r["batched_over_sequential"]["one_tile"][cap], 3.0),
        "service_over_engine_min": check(min(r["service_over_engine"].values()), 0.85),
        "engine_busy_fraction_min": check(min(r["engine_busy_fraction"].values()), 0.9),
        "idle_latency_overhead_p50_ms": check(r["idle_latency_overhead_ms"]["p50"], max_wait_ms + 15, higher=False),
        "padding_waste_cut_by_grouping": {"value": pad["cost_aware"], "target": f"< {pad['fifo']}",
                                          "met": pad["cost_aware"] < pad["fifo"]},
        "video_sampling_speedup": check(r["video_sampling_speedup"], 5.0),
        "control_plane_one_tile_model_process_cpu_ms": check(
            r["control_plane"]["headline"]["instant_one_tile_model_process_cpu_ms"], 8.0, higher=False),
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
