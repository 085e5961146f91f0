"""`python -m benchmarks.gpu_check`: what one GPU can do for this service, in one short run.

    python -m benchmarks.gpu_check [--tiny] [--host-jobs-per-s N] [--json] [--out FILE]

Needs only torch, transformers (tokenizers) and pillow, so it runs on a bare
CUDA machine (../shared/GPU.md); a missing structlog is replaced by a silent
stand-in. No weights exist anywhere: the timings come from a random-weight
InternVL3-1B of the real dimensions in bf16 (vision InternViT-300M, language
Qwen2.5-0.5B), so they match the real model's; only the words are meaningless.
It reports:

- equality: the continuous engine against one `model.generate` alone per
  request (greedy), on the tiny checkpoint, with sdpa and eager, and with
  flash_attention_2 when it imports; float32 (the guarantee the tests hold)
  and bfloat16 (share of requests whose ids match, kernels may differ by shape);
- decode step time at batch 1, 8, 32 and 64 against the bandwidth floor
  (language weights + the KV read, over --bandwidth-tb-s);
- vision tiles/s;
- engine jobs/s for one-tile jobs at 16 tokens and at per-job lengths
  (log-uniform 16..256, as benchmarks/mixes.py), continuous at the worker's
  default cap and at 64 against one `generate` per job;
- vision reuse: one-tile jobs at 16 tokens, each image asked four times or
  once, jobs/s with the vision cache on against off, and the vision share of
  the engine's step time (where InternViT-300M is most of a one-tile job);
- the host path's jobs/s beside it (--host-jobs-per-s, from the host bench),
  so the output says whether the GPU or the host bounds a worker.

`--tiny` runs every section on a CPU with the tiny dimensions in seconds
(tests/test_gpu_check.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

from benchmarks.gpu_measure import (BANDWIDTH_TB_S, BATCHES, Plan, check_equality, decode_steps, engine_rates,
                                    plan_for, random_internvl, vision_rate, vision_reuse)


def _ensure_structlog() -> None:
    """model_runtime logs through structlog; on a bare machine a silent logger stands in."""
    try:
        import structlog
    except ImportError:
        class _Silent:
            def __getattr__(self, _name: str) -> Any:
                return lambda *_a, **_k: None

        stub = types.ModuleType("structlog")
        stub.get_logger = lambda *_a, **_k: _Silent()  # type: ignore[attr-defined]
        sys.modules["structlog"] = stub
        return
    import logging

    # Warnings and worse, to stderr: --json leaves stdout to the one JSON object.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

def bound(engine: dict[str, Any], host_jobs_per_s: float | None) -> dict[str, Any]:
    """Which side caps one worker on one-tile jobs at 16 tokens: the GPU (engine) or the host path."""
    fixed = engine["fixed_16"]
    gpu = max(v["jobs_per_s"] for k, v in fixed.items() if k.startswith("continuous_cap_"))
    if host_jobs_per_s is None:
        return {"gpu_jobs_per_s": gpu, "host_jobs_per_s": None, "bound": "unknown (pass --host-jobs-per-s)"}
    return {"gpu_jobs_per_s": gpu, "host_jobs_per_s": host_jobs_per_s,
            "bound": "host" if host_jobs_per_s < gpu else "gpu", "gpu_over_host": round(gpu / host_jobs_per_s, 2)}




def run(plan: Plan, host_jobs_per_s: float | None, progress: Any) -> dict[str, Any]:
    import torch
    import transformers

    started = time.perf_counter()
    result: dict[str, Any] = {"meta": {
        "device": torch.cuda.get_device_name(0) if plan.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "dims": plan.dims, "dtype": plan.dtype, "bandwidth_tb_s": plan.bandwidth_tb_s}}
    phases: dict[str, float] = {}

    def phase(name: str, fn: Any, *args: Any) -> Any:
        progress(name)
        begun = time.perf_counter()
        value = fn(*args)
        phases[name] = round(time.perf_counter() - begun, 1)
        return value

    result["equality"] = phase("equality", check_equality, plan)
    model = phase("build", random_internvl, plan.dims, plan.device, plan.dtype)
    result["meta"]["parameters"] = sum(p.numel() for p in model.parameters())
    result["decode_step"] = phase("decode_step", decode_steps, plan, model)
    result["vision"] = phase("vision", vision_rate, plan, model)
    result["engine"] = phase("engine", engine_rates, plan, model)
    result["vision_reuse"] = phase("vision_reuse", vision_reuse, plan, model)
    result["host"] = bound(result["engine"], host_jobs_per_s)
    result["meta"]["phase_seconds"] = phases
    result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summary(r: dict[str, Any]) -> str:
    lines = [f"gpu_check on {r['meta']['device']} ({r['meta']['dims']} dims, {r['meta']['dtype']}), "
             f"{r['meta']['seconds']} s"]
    for attn, by_dtype in r["equality"].items():
        if isinstance(by_dtype, str):
            lines.append(f"  equality {attn}: {by_dtype}")
            continue
        for dtype, eq in by_dtype.items():
            lines.append(f"  equality {attn} {dtype}: {eq['same']}/{eq['jobs']} requests as generate alone")
    for batch in BATCHES:
        d = r["decode_step"][str(batch)]
        lines.append(f"  decode step batch {batch}: {d['ms']} ms (floor {d['floor_ms']} ms, x{d['over_floor']})")
    lines.append(f"  vision: {r['vision']['tiles_per_s']} tiles/s")
    for regime, row in r["engine"].items():
        if not isinstance(row, dict):
            continue
        caps = ", ".join(f"cap {k.rsplit('_', 1)[1]} {v['jobs_per_s']} ({v['over_sequential']}x)"
                         for k, v in row.items() if k.startswith("continuous_cap_"))
        lines.append(f"  engine one_tile {regime}: sequential {row['sequential_jobs_per_s']} jobs/s; continuous {caps}")
    for name, row in r["vision_reuse"].items():
        if isinstance(row, dict):
            lines.append(f"  vision reuse {name}: cache on {row['on']['jobs_per_s']} jobs/s, "
                         f"off {row['off']['jobs_per_s']} ({row['on_over_off']}x); "
                         f"vision share off {row['off']['vision_share']}")
    host = r["host"]
    lines.append(f"  bound: {host['bound']} (gpu {host['gpu_jobs_per_s']} jobs/s, host {host['host_jobs_per_s']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions on the CPU (checks the script)")
    parser.add_argument("--host-jobs-per-s", type=float, default=None,
                        help="one worker's host-path jobs/s for one-tile jobs (the host bench's figure)")
    parser.add_argument("--bandwidth-tb-s", type=float, default=BANDWIDTH_TB_S)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    _ensure_structlog()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here; --tiny checks the script on a CPU")
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = dataclasses.replace(plan_for(args.tiny), bandwidth_tb_s=args.bandwidth_tb_s)
    result = run(plan, args.host_jobs_per_s, lambda name: print(f"[gpu_check] {name}",
                                                                              file=sys.stderr, flush=True))
    result["meta"]["command"] = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
