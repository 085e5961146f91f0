"""Replay arrival patterns against KEDA + HPA's scaling rule for the inference workers.

What it models (deploy/kubernetes/base/keda.yaml, deploy/SCALING.md):
  * KEDA polls the backlog (the jobs that wait, `ivq:waiting`, + jobs in
    flight) every `polling_s`; it activates 0 -> 1 when the backlog exceeds
    `activation`, and scales N -> 0 once it has stayed at or below it for
    `cooldown_s`. With `signal="lists"` it sees what the broker's lists held
    instead (the ScaledObject before `ivq:waiting`): every interactive job that
    waits, but of a tenant's batch only its released lane (`lane_jobs`).
  * The HPA (sync every `hpa_sync_s`) sets desired = ceil(backlog / target)
    within [1, max], skips changes within its 10 % tolerance, scales up by at
    most max(4 pods, 100 %) per step, and scales down only to the highest
    recommendation of the last `stabilization_s`, one pod per minute.
  * A new pod serves after `cold_start_s` (model load + warm-up; image pull
    aside); a ready pod starts `throughput` jobs/s (FIFO) and each job stays
    in flight for `batch_latency_s` (one generate call).
The `batch` pattern is one tenant's 50,000-line batch file: on the broker's
lists the fleet stays at one pod; on `ivq:waiting` it asks for max_replicas.
It reports queue wait (arrival -> a worker starts the job) p50/p95/p99, pods
over time (PNG), GPU-hours (pod lifetime incl. cold start) and a sweep over
target, activation and cooldown. Only numpy (matplotlib optional) is needed.

    internvl-queue simulate-autoscale [--quick] [--json] [--pattern burst] [--target 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PLOT = Path("scaling.png")  # the current directory: an installed package may be read-only
PATTERNS = ("steady", "burst", "diurnal", "batch")
SWEPT = ("steady", "burst", "diurnal")  # the knob sweep's patterns
SIGNALS = ("waiting", "lists")
BATCH_LINES = 50_000
HPA_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class Params:
    # PLACEHOLDER figures, not measurements: replace throughput and cold start
    # with the numbers from benchmarks/ (tiny model) or a real GPU run.
    throughput: float = 2.0  # jobs/s one pod completes (assumed)
    cold_start_s: float = 90.0  # pod scheduled -> serving (assumed)
    batch_latency_s: float = 4.0  # one batch's generate time (assumed: batch 8 at 2 jobs/s)
    target: float = 32.0  # scalingModifiers.target (backlog per pod)
    activation: float = 0.0  # activationTarget
    cooldown_s: float = 300.0
    polling_s: float = 15.0
    hpa_sync_s: float = 15.0
    stabilization_s: float = 300.0  # HPA scaleDown.stabilizationWindowSeconds
    scale_down_pods_per_min: int = 1
    min_replicas: int = 0
    max_replicas: int = 8
    signal: str = "waiting"  # what KEDA counts as waiting: "waiting" (ivq:waiting) or "lists" (broker lists)
    lane_jobs: int = 16  # IVQ_BATCH_LANE_JOBS: a batch tenant's jobs on the broker's lists at a time


@dataclasses.dataclass
class Result:
    jobs: int
    served: int
    wait_p50_s: float
    wait_p95_s: float
    wait_p99_s: float
    wait_max_s: float
    gpu_hours: float
    max_pods: int
    pods_at_end: int
    duration_s: float
    series: dict = dataclasses.field(repr=False, default_factory=dict)

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("series")
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def arrivals(pattern: str, *, quick: bool = False, seed: int = 0) -> np.ndarray:
    """Sorted arrival times (s) for one pattern; Poisson within each shape."""
    return workload(pattern, quick=quick, seed=seed)[0]


def workload(pattern: str, *, quick: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted arrival times, which of them are batch lines or None for none) for one pattern."""
    scale = 0.25 if quick else 1.0
    if pattern == "batch":  # one tenant's batch file, its lines created within 10 s
        times = np.sort(np.random.default_rng(seed).uniform(60, 70, int(BATCH_LINES * scale)))
        return times, np.ones(len(times), dtype=bool)
    return _interactive(pattern, scale, seed), None


def _interactive(pattern: str, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if pattern == "steady":  # 6 jobs/s for 1 h (3 pods' worth at the defaults)
        horizon = 3600 * scale
        return np.sort(rng.uniform(0, horizon, rng.poisson(6.0 * horizon)))
    if pattern == "burst":  # idle, then 3000 jobs within 60 s, idle, a second smaller burst
        gap = 1200 * scale
        first = rng.uniform(gap, gap + 60, int(3000 * scale))
        second = rng.uniform(3 * gap, 3 * gap + 30, int(600 * scale))
        return np.sort(np.concatenate([first, second]))
    if pattern == "diurnal":  # one compressed "day": 0 .. 12 jobs/s and back
        horizon = 4 * 3600 * scale
        grid = np.arange(0, horizon, 1.0)
        rate = 6.0 * (1 - np.cos(2 * np.pi * grid / horizon))
        counts = rng.poisson(rate)
        return np.sort(np.repeat(grid, counts) + rng.uniform(0, 1, counts.sum()))
    raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


class _Fleet:
    """Pods as (created_at, ready_at); GPU time is counted from creation."""

    def __init__(self) -> None:
        self.pods: list[tuple[float, float]] = []
        self.pod_seconds = 0.0

    def resize(self, n: int, now: float, cold_start_s: float) -> None:
        while len(self.pods) < n:
            self.pods.append((now, now + cold_start_s))
        while len(self.pods) > n:
            # The ReplicaSet removes pods that are not ready first, then the newest.
            not_ready = [p for p in self.pods if p[1] > now]
            victim = max(not_ready or self.pods, key=lambda p: p[0])
            self.pods.remove(victim)
            self.pod_seconds += now - victim[0]

    def ready(self, now: float) -> int:
        return sum(1 for _, ready_at in self.pods if ready_at <= now)

    def close(self, now: float) -> None:
        self.pod_seconds += sum(now - created for created, _ in self.pods)


def simulate(p: Params, arrival_times: np.ndarray, *, batch: np.ndarray | None = None,
             idle_tail_s: float | None = None, dt: float = 1.0) -> Result:
    """Run the control loop second by second until the arrivals end plus an idle tail.
    `batch`: which arrivals are batch lines (None: none are)."""
    if p.signal not in SIGNALS:
        raise ValueError(f"unknown signal {p.signal!r}; choose from {SIGNALS}")
    arrival_times = np.asarray(arrival_times, dtype=float)
    batch_before = np.concatenate([[0], np.cumsum(np.zeros(len(arrival_times)) if batch is None else batch)])
    if idle_tail_s is None:
        idle_tail_s = p.cooldown_s + p.stabilization_s + p.polling_s + 600
    end = (arrival_times[-1] if len(arrival_times) else 0.0) + idle_tail_s
    fleet = _Fleet()
    replicas = p.min_replicas
    fleet.resize(replicas, 0.0, p.cold_start_s)
    arrived = served = 0  # served = started on a worker
    start_times = np.full(len(arrival_times), np.inf)
    credit = 0.0
    last_active = -math.inf
    recommendations: deque[tuple[float, int]] = deque()
    last_scale_down = -math.inf
    waits = np.full(len(arrival_times), np.nan)
    series: dict[str, list[float]] = {"t": [], "pods": [], "ready": [], "backlog": []}
    poll_every = max(1, round(p.polling_s / dt))
    hpa_every = max(1, round(p.hpa_sync_s / dt))
    step = -1
    while (step + 1) * dt <= end + 1e-9:
        step += 1
        now = step * dt
        arrived = int(np.searchsorted(arrival_times, now, side="right"))
        ready = fleet.ready(now)
        # Service: ready pods take jobs in FIFO order; idle capacity is not banked.
        credit += ready * p.throughput * dt
        take = min(int(credit), arrived - served)
        if take:
            waits[served : served + take] = now - arrival_times[served : served + take]
            start_times[served : served + take] = now
            served += take
        credit = credit - take if arrived > served else 0.0
        finished = int(np.searchsorted(start_times[:served], now - p.batch_latency_s, side="right"))
        backlog = arrived - served
        visible = arrived - finished  # what the scaler sees: the jobs that wait + in flight
        if p.signal == "lists":  # of a batch's waiting lines, the broker's lists show only the lane
            batch_waiting = int(batch_before[arrived] - batch_before[served])
            visible -= batch_waiting - min(batch_waiting, p.lane_jobs)

        if step % poll_every == 0:  # KEDA operator: activation and scale to zero
            if visible > p.activation:
                last_active = now
                if replicas == 0:
                    replicas = max(1, p.min_replicas)
            elif p.min_replicas == 0 and replicas > 0 and now - last_active >= p.cooldown_s:
                replicas = 0
                recommendations.clear()
        if replicas > 0 and step % hpa_every == 0:  # HPA controller, 1 <-> N
            desired = max(1, p.min_replicas, math.ceil(visible / p.target))
            if abs(visible / (p.target * replicas) - 1) <= HPA_TOLERANCE:
                desired = replicas
            desired = min(desired, p.max_replicas)
            recommendations.append((now, desired))
            while recommendations and recommendations[0][0] < now - p.stabilization_s:
                recommendations.popleft()
            if desired > replicas:
                replicas = min(desired, max(replicas + 4, 2 * replicas))
            else:
                floor = max(r for _, r in recommendations)
                if floor < replicas and now - last_scale_down >= 60:
                    replicas = max(floor, replicas - p.scale_down_pods_per_min)
                    last_scale_down = now
        fleet.resize(replicas, now, p.cold_start_s)
        if served < len(arrival_times) and replicas > 0:  # a long backlog: run until it is served, then the tail
            end = max(end, now + idle_tail_s)
        if step % max(1, int(10 / dt)) == 0:
            for key, value in (("t", now), ("pods", len(fleet.pods)), ("ready", ready), ("backlog", backlog)):
                series[key].append(value)
    fleet.close(end)
    done = waits[~np.isnan(waits)]
    pct = (lambda q: float(np.percentile(done, q))) if len(done) else (lambda q: float("nan"))
    return Result(
        jobs=len(arrival_times),
        served=served,
        wait_p50_s=pct(50),
        wait_p95_s=pct(95),
        wait_p99_s=pct(99),
        wait_max_s=float(done.max()) if len(done) else float("nan"),
        gpu_hours=fleet.pod_seconds / 3600,
        max_pods=int(max(series["pods"])),
        pods_at_end=len(fleet.pods),
        duration_s=end,
        series=series,
    )


def sweep(base: Params, pattern: str, *, quick: bool, seed: int) -> list[dict]:
    """One knob at a time around `base`: target, activation threshold, cooldown."""
    times = arrivals(pattern, quick=quick, seed=seed)
    knobs: dict[str, list[Any]] = {
        "target": [8, 16, 32, 64],
        "activation": [0, 5, 50],
        "cooldown_s": [60, 300, 900],
    }
    rows = []
    for knob, values in knobs.items():
        for value in values:
            r = simulate(dataclasses.replace(base, **{knob: value}), times)
            rows.append({"pattern": pattern, "knob": knob, "value": value, **r.summary()})
    return rows


def _plot(results: dict[str, Result], params: Params, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return None
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items(), strict=True):
        t = np.asarray(r.series["t"]) / 60
        ax.step(t, r.series["pods"], where="post", label="pods (incl. starting)")
        ax.step(t, r.series["ready"], where="post", label="pods serving")
        ax.set_ylabel("pods")
        twin = ax.twinx()
        twin.plot(t, r.series["backlog"], color="tab:red", alpha=0.5, label="backlog (jobs)")
        twin.set_ylabel("backlog")
        ax.set_title(f"{name}: p95 wait {r.wait_p95_s:.0f} s, {r.gpu_hours:.2f} GPU-h")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("minutes")
    fig.suptitle(
        f"KEDA/HPA replay (ASSUMED {params.throughput} jobs/s/pod, {params.cold_start_s:.0f} s cold start, "
        f"target {params.target:g}, cooldown {params.cooldown_s:.0f} s)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = Params()
    ap = argparse.ArgumentParser(prog="simulate-autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", choices=(*PATTERNS, "all"), default="all")
    ap.add_argument("--throughput", type=float, default=d.throughput,
                    help="jobs/s per pod (default: ASSUMED placeholder)")
    ap.add_argument("--cold-start", type=float, default=d.cold_start_s,
                    help="seconds to serve after scheduling (ASSUMED)")
    ap.add_argument("--batch-latency", type=float, default=d.batch_latency_s, help="seconds per generate (ASSUMED)")
    ap.add_argument("--target", type=float, default=d.target)
    ap.add_argument("--activation", type=float, default=d.activation)
    ap.add_argument("--cooldown", type=float, default=d.cooldown_s)
    ap.add_argument("--polling", type=float, default=d.polling_s)
    ap.add_argument("--stabilization", type=float, default=d.stabilization_s)
    ap.add_argument("--min-replicas", type=int, default=d.min_replicas)
    ap.add_argument("--max-replicas", type=int, default=d.max_replicas)
    ap.add_argument("--signal", choices=SIGNALS, default=d.signal,
                    help="what KEDA counts: waiting (ivq:waiting, the manifests) or lists (the broker's lists only)")
    ap.add_argument("--lane-jobs", type=int, default=d.lane_jobs, help="IVQ_BATCH_LANE_JOBS (the lists signal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="shorter patterns, burst-only sweep")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG to write (default: ./scaling.png)")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = Params(
        throughput=args.throughput, cold_start_s=args.cold_start, batch_latency_s=args.batch_latency,
        target=args.target, activation=args.activation, cooldown_s=args.cooldown,
        polling_s=args.polling, stabilization_s=args.stabilization,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, signal=args.signal,
        lane_jobs=args.lane_jobs,
    )  # fmt: skip
    defaults = Params()
    patterns = PATTERNS if args.pattern == "all" else (args.pattern,)
    results = {}
    for name in patterns:
        times, batch = workload(name, quick=args.quick, seed=args.seed)
        results[name] = simulate(params, times, batch=batch)
        if batch is not None:  # the same batch on the other signal, side by side
            other = next(s for s in SIGNALS if s != params.signal)
            results[f"{name} ({other})"] = simulate(dataclasses.replace(params, signal=other), times, batch=batch)
    rows = []
    if not args.no_sweep:
        for name in ("burst",) if args.quick else [p for p in patterns if p in SWEPT]:
            rows += sweep(params, name, quick=args.quick, seed=args.seed)
    plot = None if args.no_plot else _plot(results, params, args.plot)
    provenance = {
        "throughput": "given" if params.throughput != defaults.throughput else "ASSUMED placeholder",
        "cold_start_s": "given" if params.cold_start_s != defaults.cold_start_s else "ASSUMED placeholder",
        "batch_latency_s": "given" if params.batch_latency_s != defaults.batch_latency_s else "ASSUMED placeholder",
        "arrival patterns": "synthetic (Poisson), not production traffic",
        "scaling rule": "KEDA 2.x scalingModifiers sum + HPA autoscaling/v2 (documented behaviour)",
        "signal": f"{params.signal} (waiting: ivq:waiting, every job that waits; lists: the broker's lists only)",
    }
    if args.json:
        out = {
            "params": dataclasses.asdict(params),
            "provenance": provenance,
            "patterns": {k: r.summary() for k, r in results.items()},
            "sweep": rows,
            "plot": plot,
        }
        print(json.dumps(out, indent=None, allow_nan=False, default=str))
        return 0
    cols = ["pattern", "jobs", "served", "wait_p50_s", "wait_p95_s", "wait_p99_s", "gpu_hours", "max_pods",
            "pods_at_end"]
    print("Parameters:", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(params).items()))
    print("Provenance:", "; ".join(f"{k}: {v}" for k, v in provenance.items()))
    print()
    print(_table([{"pattern": k, **r.summary()} for k, r in results.items()], cols))
    if rows:
        print("\nSweep (one knob at a time):")
        print(_table(rows, ["pattern", "knob", "value", *cols[1:]]))
    if plot:
        print(f"\nplot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
