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
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                              cwd=Path(__file__).resolve().parent)
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
        "engine_jobs_per_mix": plan.engine_jobs, "service_jobs_per_mix": plan.service_jobs,
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(r: dict[str, Any]) -> str:
    meta, details = r["meta"], r["details"]
    caps = list(next(iter(r["batched_over_sequential"].values())).keys())
    v = meta["versions"]
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
            ["worker settings", (f"max_batch_size {meta['max_batch_size']}, max_wait_ms {meta['max_wait_ms']}, "
                                 f"torch threads {meta.get('torch_threads')}, cost-aware grouping "
                                 f"{meta.get('cost_aware_grouping')}")],
            ["jobs per mix", f"engine {meta['engine_jobs_per_mix']}, service {meta['service_jobs_per_mix']}"],
        ]),
        "", "### Targets", "",
        _table(["headline", "measured", "target", "met"],
               [[k, t["value"], t["target"], "yes" if t["met"] else "**no**"] for k, t in r["targets"].items()]),
        "", "### batched_over_sequential (engine jobs/s with the MicroBatcher ÷ one generate per job)", "",
        _table(["mix", "jobs", "prompt tokens (mean)", "tiles (mean)"] + [f"cap {c}" for c in caps],
               [[m, details["engine"][m]["mix"], details["engine"][m]["prompt_tokens_mean"],
                 details["engine"][m]["tiles_mean"]] + [ratios[c] for c in caps]
                for m, ratios in r["batched_over_sequential"].items()]),
        "", "Engine jobs/s behind those ratios (same run; mean batch size in brackets):", "",
        _table(["mix", "sequential"] + [f"cap {c}" for c in caps],
               [[m, e["sequential"]["jobs_per_s"]] + [f"{e['batched'][c]['jobs_per_s']} ({e['batched'][c]['mean_batch']})"
                                                      for c in caps] for m, e in details["engine"].items()]),
        "", f"![engine jobs/s against batch cap]({PLOT})", "",
        "### service_over_engine and engine_busy_fraction (saturating load: every job submitted at once)", "",
        _table(["mix", "service jobs/s", "bare engine jobs/s (same requests, same batching)", "service_over_engine",
                "engine_busy_fraction", "mean batch (service)"],
               [[m, s["jobs_per_s"], s["engine_same_batching"]["jobs_per_s"], s["service_over_engine"],
                 s["engine_busy_fraction"], s["mean_batch"]] for m, s in details["service"].items()]),
        "", "### idle_latency_overhead_ms (one job at a time: submit → result, minus generate)", "",
        _table(["mix", "jobs", "p50 ms", "p99 ms", "queued p50", "preprocess p50", "batch wait p50",
                "after generate p50", "max_wait_ms"],
               [[m, x["jobs"], x["p50"], x["p99"], x["queued_p50"], x["preprocess_p50"], x["batch_wait_p50"],
                 x["after_generate_p50"], x["max_wait_ms"]]
                for m, x in r["idle_latency_overhead_ms"]["by_mix"].items()]),
        "", ("### padding_waste (share of batch prompt tokens that are padding; realistic mix, "
             f"cap {r['padding_waste']['cap']})"), "",
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
        "", "### torch intra-op threads (one_tile mix)", "",
        _table(["threads", "engine sequential jobs/s", f"engine batched jobs/s (cap {meta['max_batch_size']})",
                "engine batched vs first", "service jobs/s (saturated)"],
               [[t, x["sequential_jobs_per_s"], x["batched_jobs_per_s"], x["batched_vs_first"],
                 x.get("service_jobs_per_s")]
                for t, x in r["torch_threads"].items()]),
    ]
    return "\n".join(parts)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for mix, rates in r["jobs_per_s"].items():
        caps = [c for c in rates if c != "sequential"]
        line = ax.plot([int(c) for c in caps], [rates[c] for c in caps], marker="o", label=mix)[0]
        ax.axhline(rates["sequential"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch cap (max_batch_size)")
    ax.set_ylabel("engine jobs/s")
    ax.set_title(f"model {r['meta']['model']!r} on {r['meta']['cpus']} CPU cores (dotted: one generate per job)")
    ax.legend(fontsize=8)
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


def summary(r: dict[str, Any]) -> str:
    lines = ["headline                                         measured    target   met"]
    for name, t in r["targets"].items():
        lines.append(f"{name:48} {t['value']!s:10}  {t['target']!s:8} {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)
