"""The autoscaling simulator: sane properties of the KEDA/HPA replay, and its CLI verb."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from worker.ops import autoscale_sim


@pytest.fixture(scope="module")
def sim():
    return autoscale_sim


@pytest.fixture(scope="module")
def burst(sim):
    return sim.arrivals("burst", quick=True, seed=1)


@pytest.mark.parametrize("pattern", ["steady", "burst", "diurnal"])
def test_every_job_is_served_and_the_fleet_ends_at_zero(sim, pattern):
    times = sim.arrivals(pattern, quick=True, seed=2)
    r = sim.simulate(sim.Params(), times)
    assert r.jobs == len(times) > 100
    assert r.served == r.jobs
    assert r.pods_at_end == 0  # minReplicaCount 0 after a long idle tail
    assert 0 <= r.wait_p50_s <= r.wait_p95_s <= r.wait_p99_s <= r.wait_max_s
    assert r.gpu_hours > 0


def test_first_jobs_wait_at_least_a_cold_start(sim):
    r = sim.simulate(sim.Params(cold_start_s=120), np.array([10.0, 11.0, 12.0]))
    assert r.served == 3
    assert r.wait_p50_s >= 120


def test_lower_target_means_more_pods(sim, burst):
    few = sim.simulate(sim.Params(target=64, max_replicas=50), burst)
    many = sim.simulate(sim.Params(target=4, max_replicas=50), burst)
    assert many.max_pods > few.max_pods
    assert np.mean(many.series["pods"]) > np.mean(few.series["pods"])
    assert many.wait_p95_s <= few.wait_p95_s


def test_max_replicas_caps_the_fleet(sim, burst):
    assert sim.simulate(sim.Params(target=1, max_replicas=3), burst).max_pods == 3


def test_longer_cooldown_costs_more_gpu_hours(sim, burst):
    hours = [sim.simulate(sim.Params(cooldown_s=c), burst).gpu_hours for c in (60, 300, 900)]
    assert hours[0] < hours[1] < hours[2]


def test_activation_above_zero_strands_a_small_backlog(sim):
    # Three jobs never lift the backlog above an activation of 5: with
    # minReplicaCount 0 no pod ever starts, which is why the manifests use 0.
    times = np.array([5.0, 6.0, 7.0])
    assert sim.simulate(sim.Params(activation=5), times).served == 0
    assert sim.simulate(sim.Params(activation=0), times).served == 3


def test_minimum_replicas_keep_pods_through_idle(sim, burst):
    r = sim.simulate(dataclasses.replace(sim.Params(), min_replicas=1), burst)
    assert r.pods_at_end == 1


def test_main_json_is_one_object_with_sweep(sim, capsys):
    assert sim.main(["--quick", "--json", "--no-plot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["patterns"]) == {"steady", "burst", "diurnal", "batch", "batch (lists)"}
    assert {row["knob"] for row in out["sweep"]} == {"target", "activation", "cooldown_s"}
    assert out["provenance"]["throughput"] == "ASSUMED placeholder"
    assert out["plot"] is None


def test_cli_verb_runs_from_anywhere_and_writes_the_plot_in_the_current_directory(tmp_path):
    # The image ships the worker package and no deploy/: the verb must need nothing else.
    png = tmp_path / "scaling.png"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "simulate-autoscale", "--quick", "--pattern", "burst", "--no-sweep",
         "--throughput", "3"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "burst" in proc.stdout and "throughput: given" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_50000_line_batch_asks_for_max_replicas_on_the_waiting_set_and_one_pod_on_the_lists(sim):
    # The ScaledObject reads ivq:waiting, which holds every line of a batch; before, it read
    # the broker's lists, where a tenant's batch shows only its released lane (16 jobs).
    times, batch = sim.workload("batch")
    assert len(times) == sim.BATCH_LINES == 50_000 and batch.all()
    params = sim.Params(max_replicas=8)
    waiting = sim.simulate(params, times, batch=batch)
    lists = sim.simulate(dataclasses.replace(params, signal="lists"), times, batch=batch)
    print(f"\n50,000-line batch: ivq:waiting asks for {waiting.max_pods} pods, done in "
          f"{waiting.wait_max_s / 3600:.1f} h; the broker's lists ask for {lists.max_pods}, "
          f"done in {lists.wait_max_s / 3600:.1f} h")
    assert waiting.max_pods == params.max_replicas
    assert lists.max_pods == 1
    assert waiting.served == lists.served == 50_000 and waiting.pods_at_end == lists.pods_at_end == 0
    assert waiting.wait_max_s < lists.wait_max_s / 4


def test_interactive_jobs_are_seen_alike_by_both_signals(sim, burst):
    # Only a batch's lines differ between the two: every interactive job is on the lists too.
    a = sim.simulate(sim.Params(), burst)
    b = sim.simulate(sim.Params(signal="lists"), burst)
    assert (a.max_pods, a.wait_p95_s, a.gpu_hours) == (b.max_pods, b.wait_p95_s, b.gpu_hours)


def test_main_shows_the_batch_on_both_signals(sim, capsys):
    assert sim.main(["--quick", "--json", "--no-plot", "--no-sweep", "--pattern", "batch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["patterns"]["batch"]["max_pods"] == sim.Params().max_replicas
    assert out["patterns"]["batch (lists)"]["max_pods"] == 1
