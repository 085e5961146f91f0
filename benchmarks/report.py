"""Turn one bench run's results into Markdown tables, a plot and a short summary.

`write_report` rewrites only the block between the two MEASURED markers of
BENCHMARKS.md, so the hand-written notes around it (what was tried, the GPU
plan) survive a re-run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

BEGIN = "<!-- MEASURED:BEGIN (written by `internvl-queue bench`; edits inside are overwritten) -->"
END = "<!-- MEASURED:END -->"
PLOT = "jobs_per_s_by_cap.png"
PACKAGES = ("torch", "transformers", "celery", "kombu", "redis", "av", "pillow", "numpy")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=False, cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(plan: Any) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": _cpu_model(), "cpus": os.cpu_count(),
        "gpu": "none", "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "versions": versions, "git_commit": _git_commit(), "model": plan.model,
        "max_batch_size": plan.max_batch_size, "max_wait_ms": plan.max_wait_ms,
        "caps": plan.caps, "fixed_caps": plan.fixed_caps, "fixed_max_new_tokens": plan.fixed_max_new_tokens,
        "engine_jobs_per_mix": plan.engine_jobs, "service_jobs_per_mix": plan.service_jobs,
        "celery_jobs": plan.celery_jobs,
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pair(a: Any, b: Any) -> str:
    return f"{a} / {b}"


def markdown(r: dict[str, Any]) -> str:
    meta, details = r["meta"], r["details"]
    caps = list(next(iter(r["continuous_over_sequential"].values())).keys())
    cap = str(meta["max_batch_size"])
    fixed = r["fixed_lengths"]
    fixed_caps = list(next(iter(fixed["continuous_over_sequential"].values())).keys())
    knobs = meta.get("continuous", {})
    v = meta["versions"]
    engine = details["engine"]
    lat = r["short_job_latency"]
    stall = r["decode_stall_ms"]
    e2e = r["end_to_end_over_celery_task"]
    parts = [
        f"Run {meta['date']}, {'QUICK smoke run' if meta.get('quick') else 'full mode'}, "
        f"{meta.get('bench_seconds', '?')} s. Command: `{meta.get('command', 'internvl-queue bench')}`"
        + (f" at commit `{meta['git_commit']}`." if meta.get("git_commit") else "."),
        "",
        _table(["machine", "value"], [
            ["CPU", f"{meta['cpu']} × {meta['cpus']} (shared with other work; absolute times are noise)"],
            ["GPU", meta["gpu"]], ["OS / Python", f"{meta['os']} / {meta['python']}"],
            ["versions", ", ".join(f"{k} {val}" for k, val in v.items() if val)],
            ["model", f"`{meta['model']}` (random weights: timings only, the text is gibberish)"],
            ["worker settings", (f"engine {meta.get('engine')}, max_batch_size {meta['max_batch_size']} (the default "
                                 f"cap below), max_wait_ms {meta['max_wait_ms']} (static), torch threads "
                                 f"{meta.get('torch_threads')}, continuous: max_batch_tokens "
                                 f"{knobs.get('max_batch_tokens')}, prefill_chunk_tokens "
                                 f"{knobs.get('prefill_chunk_tokens')}, vision_chunk_tiles "
                                 f"{knobs.get('vision_chunk_tiles')}")],
            ["jobs per mix", (f"engine {meta['engine_jobs_per_mix']}, service {meta['service_jobs_per_mix']}, "
                              f"service vs Celery task {meta.get('celery_jobs')}")],
            ["output lengths", (f"per job: max_new_tokens log-uniform 16–256 (headline); fixed: "
                                f"{fixed['max_new_tokens']} for every job (caps {', '.join(fixed_caps)})")],
        ]),
        "", "### Targets", "",
        _table(["headline", "measured", "target", "met"],
               [[k, t["value"], t["target"], "yes" if t["met"] else "**no**"] for k, t in r["targets"].items()]),
        "", ("### Per-job lengths: continuous / static, each over one generate per job "
             "(engine jobs/s; the same jobs, so also tokens/s)"), "",
        _table(["mix", "jobs", "prompt tokens (mean)", "tiles (mean)", "max_new_tokens (mean)",
                "completion tokens (mean)"] + [f"cap {c}" for c in caps],
               [[m, e["mix"], e["prompt_tokens_mean"], e["tiles_mean"], e["max_new_tokens_mean"],
                 e["completion_tokens_mean"]]
                + [_pair(r["continuous_over_sequential"][m][c], r["batched_over_sequential"][m][c]) for c in caps]
                for m, e in engine.items()]),
        "", (f"`batching_never_slower` (lowest continuous/sequential above cap 1): {r['batching_never_slower']}. "
             "Same tokens as one generate per job, every engine and cap (share of jobs): "
             + ", ".join(f"{m} {e['same_tokens_as_sequential']}" for m, e in engine.items()) + "."),
        "", "Tokens/s behind those ratios: continuous / static (mean batch: running rows per decode step / jobs per "
            "generate):", "",
        _table(["mix", "sequential"] + [f"cap {c}" for c in caps],
               [[m, e["sequential"]["tokens_per_s"]]
                + [f"{e['continuous'][c]['tokens_per_s']} / {e['batched'][c]['tokens_per_s']} "
                   f"({e['continuous'][c]['mean_batch']} / {e['batched'][c]['mean_batch']})" for c in caps]
                for m, e in engine.items()]),
        "", f"![continuous and static over one generate per job, against the cap]({PLOT})", "",
        f"### continuous_over_static (per-job lengths; headline at the default cap {cap})", "",
        _table(["mix", f"default cap {cap}"] + [f"cap {c}" for c in caps],
               [[m, r["continuous_over_static"][m]] + [e["continuous_over_static"][c] for c in caps]
                for m, e in engine.items()]),
        "", (f"### Fixed lengths: every job max_new_tokens {fixed['max_new_tokens']} "
             "(continuous / static, each over one generate per job)"), "",
        _table(["mix"] + [f"cap {c}" for c in fixed_caps]
               + [f"continuous/static, cap {fixed.get('default_cap', cap)}", "sequential jobs/s"],
               [[m] + [_pair(fixed["continuous_over_sequential"][m][c], fixed["batched_over_sequential"][m][c])
                       for c in fixed_caps]
                + [fixed["continuous_over_static"][m], details["engine_fixed_lengths"][m]["sequential"]["jobs_per_s"]]
                for m in fixed["continuous_over_sequential"]]),
        "", (f"`continuous_over_static_fixed_min` (the lowest continuous/static over the mixes at "
             f"{fixed['max_new_tokens']} tokens, cap {fixed.get('default_cap', cap)}): "
             f"{r.get('continuous_over_static_fixed_min', 'not measured')}."),
        "", (f"### short_job_latency (one_tile, cap {lat['cap']}: {lat['long_jobs']} jobs of {lat['long_tokens']} "
             f"tokens running, then {lat['short_jobs']} jobs of {lat['short_tokens']} tokens, one every "
             f"{lat['gap_ms']} ms; submit → result)"), "",
        _table(["engine", "p50 ms", "p99 ms", "max ms", "wall s"],
               [["continuous (StepLoop)", lat["continuous"]["p50"], lat["continuous"]["p99"], lat["continuous"]["max"],
                 lat["continuous"]["wall_s"]],
                [f"static (MicroBatcher, max_wait_ms {lat['max_wait_ms']})", lat["static"]["p50"],
                 lat["static"]["p99"], lat["static"]["max"], lat["static"]["wall_s"]]]),
        "", f"static p50 ÷ continuous p50: {lat['static_p50_over_continuous_p50']}.",
        "", (f"### decode_stall_ms (longest pause of the running rows while others' vision + prefill ran; "
             f"continuous, cap {stall.get('cap', cap)}, prefill_chunk_tokens {stall['prefill_chunk_tokens']}, "
             f"vision_chunk_tiles {stall['vision_chunk_tiles']})"), "",
        _table(["mix", "max stall ms", "vision calls", "prefill chunks", "decode steps"],
               [[m, ms, engine[m]["continuous"][cap]["vision_calls"], engine[m]["continuous"][cap]["prefill_chunks"],
                 engine[m]["continuous"][cap]["decode_steps"]] for m, ms in stall["by_mix"].items()]),
        "", ("### service_over_engine and engine_busy_fraction (saturating load: every job submitted at once; "
             "per-job lengths)"), "",
        _table(["mix", "service jobs/s", "service tokens/s", f"bare {meta.get('engine')} engine jobs/s (same jobs, "
                "worker's cap)", "service_over_engine", "engine_busy_fraction", "mean batch (service)"],
               [[m, s["jobs_per_s"], s.get("tokens_per_s"), s["engine_same_batching"]["jobs_per_s"],
                 s["service_over_engine"], s["engine_busy_fraction"], s["mean_batch"]]
                for m, s in details["service"].items()]),
        "", (f"### end_to_end_over_celery_task ({e2e['jobs']} {e2e.get('mix', 'one_tile')} jobs at once, per-job "
             "lengths; tokens/s from the first submit to the last result)"), "",
        _table(["path", "tokens/s", "jobs/s", "completion tokens", "seconds"],
               [["the service (JobClient → Redis → worker)", e2e["service_tokens_per_s"],
                 e2e["service"]["jobs_per_s"], e2e["service"]["tokens"], e2e["service"]["seconds"]],
                ["a plain Celery task, one generate per job (benchmarks/celery_baseline.py)",
                 e2e["celery_task_tokens_per_s"], e2e["celery_task"]["jobs_per_s"], e2e["celery_task"]["tokens"],
                 e2e["celery_task"]["seconds"]]]),
        "", f"ratio: {e2e['ratio']}.",
        *_e2e_fixed_section(r.get("end_to_end_over_celery_task_fixed")),
        *_structured_section(r.get("structured_over_free")),
        *_control_plane_section(r.get("control_plane")),
        "", "### idle_latency_overhead_ms (one job at a time: submit → result, minus generate)", "",
        _table(["mix", "jobs", "p50 ms", "p99 ms", "queued p50", "preprocess p50", "batch wait p50",
                "after generate p50", "max_wait_ms"],
               [[m, x["jobs"], x["p50"], x["p99"], x["queued_p50"], x["preprocess_p50"], x["batch_wait_p50"],
                 x["after_generate_p50"], x["max_wait_ms"]]
                for m, x in r["idle_latency_overhead_ms"]["by_mix"].items()]),
        "", ("### padding_waste (static engine: share of batch prompt tokens that are padding; realistic mix, "
             f"max_new_tokens {fixed['max_new_tokens']}, cap {r['padding_waste']['cap']})"), "",
        _table(["batch forming", "padding share", "engine jobs/s"],
               [["FIFO (oldest first)", r["padding_waste"]["fifo"], r["padding_waste"]["fifo_jobs_per_s"]],
                ["cost-aware (similar cost to the oldest)", r["padding_waste"]["cost_aware"],
                 r["padding_waste"]["cost_aware_jobs_per_s"]]]),
        "", "### video_sampling_speedup", "",
        _table(["clip", "frames kept", "seek + decode (ms)", "decode every frame (ms)", "speedup", "same frames"],
               [[(f"{details['video']['clip_seconds']} s {details['video']['clip_resolution']}, "
                  f"{details['video']['source_frames']} frames, {details['video']['clip_bytes'] // 1024} KiB"),
                 details["video"]["frames"], details["video"]["seek_ms"], details["video"]["decode_all_ms"],
                 details["video"]["speedup"], details["video"]["same_frames"]]]),
        "", "### torch intra-op threads (one_tile mix, per-job lengths)", "",
        _table(["threads", "engine sequential jobs/s", f"engine static jobs/s (cap {cap})",
                f"engine continuous jobs/s (cap {cap})", "static vs first", "continuous vs first",
                "service jobs/s (saturated)"],
               [[t, x["sequential_jobs_per_s"], x["batched_jobs_per_s"], x.get("continuous_jobs_per_s"),
                 x["batched_vs_first"], x.get("continuous_vs_first"), x.get("service_jobs_per_s")]
                for t, x in r["torch_threads"].items()]),
    ]
    if meta.get("phase_seconds"):
        parts += ["", "Seconds per phase: " + ", ".join(f"{k} {val}" for k, val in meta["phase_seconds"].items()) + "."]
    return "\n".join(parts)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for mix, ratios in r["continuous_over_sequential"].items():
        caps = list(ratios)
        line = ax.plot([int(c) for c in caps], [ratios[c] for c in caps], marker="o", label=f"{mix} continuous")[0]
        static = r["batched_over_sequential"][mix]
        ax.plot([int(c) for c in caps], [static[c] for c in caps], marker="s", linestyle="--", linewidth=1,
                color=line.get_color(), label=f"{mix} static")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([int(c) for c in next(iter(r["continuous_over_sequential"].values()))])
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("batch cap (max_batch_size)")
    ax.set_ylabel("engine jobs/s ÷ one generate per job")
    ax.set_title(f"per-job max_new_tokens 16–256, model {r['meta']['model']!r}, {r['meta']['cpus']} CPU cores\n"
                 "solid: continuous, dashed: static, dotted: one generate per job", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(r: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    plot(r, directory / PLOT)
    path = directory / "BENCHMARKS.md"
    block = f"{BEGIN}\n{markdown(r)}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Benchmarks\n\n{block}\n"
    path.write_text(text)
    return path


def _structured_section(x: dict[str, Any] | None) -> list[str]:
    if not x:
        return []
    step = x["per_step_ms"]
    return [
        "", (f"### structured_over_free ({x['jobs']} text jobs, cap {x['cap']}, every row constrained to a JSON "
             f"schema, then the same jobs free at the same lengths; vocabulary {x['vocab_width']})"), "",
        _table(["run", "tokens/s", "tokens"],
               [["constrained (llguidance masks)", x["constrained_tokens_per_s"], x["tokens"]],
                ["free, each job pinned to its constrained twin's length", x["free_tokens_per_s"], x["tokens"]]]),
        "", (f"ratio: {x['ratio']} (target 0.8). Per decode step with constrained rows ({step['constrained_rows']} "
             f"on average): mask fill {step['mask_fill']} ms on its own thread during the forward, wait after the "
             f"forward {step['mask_wait_after_forward']} ms, apply {step['mask_apply']} ms; a decode step "
             f"{x['decode_step_ms']} ms. Valid {x['valid']}, cut at max_new_tokens {x['cut_at_max_new_tokens']}. "
             f"Schema: {x['schema']}."),
    ]


def summary(r: dict[str, Any]) -> str:
    lines = ["headline                                         measured    target   met"]
    for name, t in r["targets"].items():
        lines.append(f"{name:48} {t['value']!s:10}  {t['target']!s:8} {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)


def _e2e_fixed_section(e2e: dict[str, Any] | None) -> list[str]:
    if not e2e:
        return []
    return [
        "", (f"### end_to_end_over_celery_task_fixed ({e2e['jobs']} {e2e['mix']} jobs at once, every job "
             f"max_new_tokens {e2e['max_new_tokens']}; jobs/s from the first submit to the last result)"), "",
        _table(["path", "jobs/s", "completion tokens", "seconds"],
               [["the service (JobClient → Redis → worker)", e2e["service_jobs_per_s"], e2e["service"]["tokens"],
                 e2e["service"]["seconds"]],
                ["a plain Celery task, one generate per job", e2e["celery_task_jobs_per_s"],
                 e2e["celery_task"]["tokens"], e2e["celery_task"]["seconds"]]]),
        "", f"ratio: {e2e['ratio']} (target 3).",
    ]


def _control_plane_section(cp: dict[str, Any] | None) -> list[str]:
    if not cp or "instant" not in cp:
        return []
    from benchmarks.control_plane import table

    return [
        "", ("### control plane (the real worker around an instant engine, then the tiny model at max_new_tokens 1; "
             "every job of a mix at once; CPU ms per job, Redis commands per job with the producer's waits)"), "",
        table(cp),
    ]
