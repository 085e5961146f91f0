"""`internvl-queue bench --quick --json` runs end to end and reports every headline.

One subprocess run (about 100 s on 2 idle cores, the control plane included): the values are measurements
and are not checked here, only that the instrument produces each of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEADLINES = ("batched_over_sequential", "continuous_over_sequential", "continuous_over_static", "batching_never_slower",
             "decode_stall_ms", "fixed_lengths",
             "continuous_over_static_fixed_min", "short_job_latency", "service_over_engine", "engine_busy_fraction",
             "end_to_end_over_celery_task", "end_to_end_over_celery_task_fixed", "api_over_direct",
             "idle_latency_overhead_ms", "padding_waste",
             "video_sampling_speedup", "structured_over_free", "control_plane")
MIXES = {"text", "one_tile", "many_tiles", "video8", "realistic"}
CAPS = {"1", "8"}
TARGETS = {
    "continuous_over_sequential_text_largest_cap", "continuous_over_sequential_one_tile_largest_cap",
    "continuous_over_sequential_realistic_largest_cap", "batching_never_slower",
    "continuous_over_static_realistic_default_cap", "continuous_over_static_fixed_min",
    "short_job_latency_static_p50_over_continuous_p50",
    "end_to_end_over_celery_task", "end_to_end_over_celery_task_fixed", "api_over_direct",
    "batched_over_sequential_one_tile_default_cap",
    "structured_over_free",
    "service_over_engine_min",
    "engine_busy_fraction_min", "idle_latency_overhead_p50_ms", "padding_waste_cut_by_grouping",
    "video_sampling_speedup", "control_plane_one_tile_model_process_cpu_ms"}
CONTROL_PLANE_MIXES = {"text", "one_tile", "twelve_tiles", "video8"}
STAGES = {"fetch", "decode", "processor", "handoff", "state", "result_write", "events", "celery", "model_thread"}


def _by_mix_and_cap(table: dict) -> None:
    assert set(table) == MIXES
    assert all(set(caps) == CAPS for caps in table.values()), table


@pytest.mark.slow
@pytest.mark.timeout(620)
def test_quick_bench_prints_one_json_object_with_every_headline(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", "--quick", "--json", "--out", str(tmp_path / "bench")],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)  # stdout is exactly one JSON object; logs went to stderr

    for key in (*HEADLINES, "meta", "jobs_per_s", "tokens_per_s", "torch_threads", "targets", "details"):
        assert key in result, key
    # Per-job lengths (the headline): mix x cap ratios for both engines, one ratio per mix between them.
    api = result["api_over_direct"]
    assert api["ratio"] > 0 and api["api"]["redis_commands_per_job"] > 0 and api["direct"]["jobs"] == api["jobs"]
    assert api["progress"]["enabled"] and api["progress"]["commands_per_job_off"] > 0
    structured = result["structured_over_free"]
    assert structured["ratio"] > 0 and structured["valid"] + structured["cut_at_max_new_tokens"] == structured["jobs"]
    assert {"mask_fill", "mask_wait_after_forward", "mask_apply"} <= set(structured["per_step_ms"])
    # The control plane: the real worker with the instant engine and with the tiny model, every mix.
    plane = result["control_plane"]
    for engine in ("instant", "tiny"):
        assert set(plane[engine]) == CONTROL_PLANE_MIXES, plane[engine].keys()
        for m in plane[engine].values():
            assert m["jobs_per_s"] > 0 and m["cpu_ms_per_job"] >= m["model_process_cpu_ms_per_job"] >= 0
            assert STAGES <= set(m["stages_cpu_ms_per_job"]) and m["redis_commands_per_job"] > 0
    _by_mix_and_cap(result["batched_over_sequential"])
    _by_mix_and_cap(result["continuous_over_sequential"])
    assert set(result["continuous_over_static"]) == MIXES
    assert all(isinstance(v, float) for v in result["continuous_over_static"].values())
    assert isinstance(result["batching_never_slower"], float)
    stall = result["decode_stall_ms"]
    assert {"by_mix", "max", "prefill_chunk_tokens", "vision_chunk_tiles"} <= set(stall)
    assert set(stall["by_mix"]) == MIXES
    # The same three tables with every job at max_new_tokens 16.
    fixed = result["fixed_lengths"]
    _by_mix_and_cap(fixed["continuous_over_sequential"])
    _by_mix_and_cap(fixed["batched_over_sequential"])
    assert set(fixed["continuous_over_static"]) == MIXES
    assert result["continuous_over_static_fixed_min"] == min(fixed["continuous_over_static"].values())
    latency = result["short_job_latency"]
    for engine in ("continuous", "static"):
        assert {"p50", "p99"} <= set(latency[engine])
    assert "static_p50_over_continuous_p50" in latency
    e2e = result["end_to_end_over_celery_task"]
    assert {"service_tokens_per_s", "celery_task_tokens_per_s", "ratio", "jobs"} <= set(e2e)
    fixed_e2e = result["end_to_end_over_celery_task_fixed"]
    assert fixed_e2e["max_new_tokens"] == 16 and fixed_e2e["ratio"] > 0
    assert fixed_e2e["ratio"] == round(fixed_e2e["service_jobs_per_s"] / fixed_e2e["celery_task_jobs_per_s"], 3)
    assert set(result["service_over_engine"]) == MIXES
    assert set(result["engine_busy_fraction"]) == MIXES
    assert {"p50", "p99", "max_wait_ms", "by_mix"} <= set(result["idle_latency_overhead_ms"])
    assert {"fifo", "cost_aware"} <= set(result["padding_waste"])
    assert isinstance(result["video_sampling_speedup"], float)
    for mix, rates in result["tokens_per_s"].items():
        assert mix in MIXES and set(rates["static"]) == CAPS and set(rates["continuous"]) == CAPS
    assert set(result["details"]["continuous_over_static_by_cap"]) == MIXES
    assert set(result["targets"]) == TARGETS
    assert all({"value", "target", "met"} <= set(t) for t in result["targets"].values())
    assert result["meta"]["quick"] is True and result["meta"]["model"] == "tiny"

    # The report and the plot were written to the out dir, not into the package.
    report = (tmp_path / "bench" / "BENCHMARKS.md").read_text()
    assert "continuous_over_static" in report and "short_job_latency" in report and "MEASURED:END" in report
    assert "control plane" in report
    assert (tmp_path / "bench" / "jobs_per_s_by_cap.png").stat().st_size > 1000


def test_similar_cost_batches_like_sized_items_with_the_oldest() -> None:
    """The cost-aware batch forming the benchmark measures: the oldest goes first, joined by its nearest costs."""
    import threading

    from worker.model.batcher import MicroBatcher

    batches: list[list[float]] = []
    release = threading.Event()

    def run(items: list[float], _info) -> list[float]:
        batches.append(list(items))
        release.wait(5)
        return items

    batcher = MicroBatcher(run, max_batch_size=3, max_wait_ms=1000, cost=lambda x: x, similar_cost=True).start()
    try:
        blocker = batcher.submit(0.0)  # occupies the model thread while the backlog forms
        while not batches:
            threading.Event().wait(0.001)
        for _ in range(6):
            batcher.announce()
        futures = [batcher.submit(cost, announced=True) for cost in (500.0, 10.0, 480.0, 12.0, 900.0, 11.0)]
        release.set()
        assert [f.result(timeout=5) for f in futures] == [500.0, 10.0, 480.0, 12.0, 900.0, 11.0]
        blocker.result(timeout=5)
    finally:
        batcher.stop(timeout=5)
    assert batches[1] == [500.0, 480.0, 900.0]  # the oldest, then the costs nearest to it
    assert batches[2] == [10.0, 11.0, 12.0]
