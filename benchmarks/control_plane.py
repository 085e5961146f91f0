"""The control plane alone: the real worker around an engine that costs nothing, and where its CPU goes.

A worker subprocess runs exactly what `internvl-queue worker` runs (Celery's
threads pool, Redis, the file store, the task threads, the step loop), except
that the bench swaps its engine for the **instant engine** below, which hands
each request back with max_new_tokens tokens without running a model. So
jobs/s is what the host path allows, and every CPU second is control plane.
The same figures are taken with the tiny model at max_new_tokens 1.

Per mix (text, one 448 px tile, twelve tiles, an 8-frame video) it reports
jobs/s (every job submitted at once, until the last result), the worker's CPU
ms per job over all its processes, the CPU ms per job of the process that
drives the model, per thread group and per stage (fetch, decode, processor,
state transitions, result write, events, Celery), and the Redis commands per
job by command (INFO commandstats). Stages are thread CPU time
(`time.thread_time`) inside wrapped calls in the worker process
(`StageProbes`); Celery is the consumer's main thread plus the task threads'
CPU outside `process_job`.

    python -m benchmarks.control_plane [--quick] [--json]   # this section alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.control_plane_worker import STAGES, serve

INSTANT_MODEL = "tile448"  # the processor of InternVL3's 448 px tile; the instant engine never runs the model
TINY_MODEL = "tiny"
MIXES = ("text", "one_tile", "twelve_tiles", "video8")


# ---------------------------------------------------------------- the bench side


@dataclass
class ControlPlanePlan:
    jobs: dict[str, int]  # per mix, instant engine
    tiny_jobs: dict[str, int]
    warmup_jobs: int = 4
    prep_workers: tuple[int, ...] = ()  # one_tile with the instant engine at each pool size ((): not measured)
    instant_model: str = INSTANT_MODEL
    instant_tile: int = 448
    concurrency: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def control_plane_plan(quick: bool) -> ControlPlanePlan:
    if quick:  # the instrument works; the figures are too few to mean much (and no 448 px checkpoint to build)
        return ControlPlanePlan(jobs={"text": 8, "one_tile": 8, "twelve_tiles": 3, "video8": 3},
                                tiny_jobs={"text": 4, "one_tile": 4, "twelve_tiles": 2, "video8": 2}, warmup_jobs=2,
                                instant_model=TINY_MODEL, instant_tile=56)
    return ControlPlanePlan(jobs={"text": 400, "one_tile": 400, "twelve_tiles": 80, "video8": 80},
                            tiny_jobs={"text": 200, "one_tile": 200, "twelve_tiles": 60, "video8": 60})


def build_requests(tile: int, media_dir: Path, counts: dict[str, int]) -> dict[str, list[Any]]:
    """Requests per mix at max_new_tokens 1; the media are written under media_dir (file://)."""
    from api_client.schema import GenerationParams, JobRequest
    from model_runtime.samples import make_sample_image, make_sample_video

    media_dir.mkdir(parents=True, exist_ok=True)
    one = [f"one-{tile}-{i}.jpg" for i in range(8)]
    twelve = [f"twelve-{tile}-{i}.jpg" for i in range(4)]
    clips = [f"clip-{tile}-{i}.mp4" for i in range(2)]
    for i, name in enumerate(one):
        _write_once(media_dir / name, lambda i=i: make_sample_image(tile, tile, seed=300 + i))
    for i, name in enumerate(twelve):  # 4 x 3 tiles (+ the thumbnail)
        _write_once(media_dir / name, lambda i=i: make_sample_image(4 * tile, 3 * tile, seed=400 + i))
    for name in clips:
        _write_once(media_dir / name, lambda: make_sample_video(seconds=4.0, fps=10, width=2 * tile,
                                                                height=3 * tile // 2))
    url = lambda name: f"file://{media_dir / name}"  # noqa: E731
    one_token = GenerationParams(max_new_tokens=1)
    out: dict[str, list[Any]] = {}
    for mix, n in counts.items():
        if mix == "text":
            out[mix] = [JobRequest.simple(f"Is there a cat in item {i}? Answer yes or no.", generation=one_token)
                        for i in range(n)]
        elif mix == "one_tile":
            out[mix] = [JobRequest.simple(f"Tag item {i}.", images=[url(one[i % len(one)])], generation=one_token)
                        for i in range(n)]
        elif mix == "twelve_tiles":
            out[mix] = [JobRequest.simple(f"Tag item {i}.", images=[url(twelve[i % len(twelve)])],
                                          generation=one_token) for i in range(n)]
        elif mix == "video8":
            out[mix] = [JobRequest(messages=[{"role": "user", "content": [
                {"type": "video", "url": url(clips[i % len(clips)]), "num_frames": 8},
                {"type": "text", "text": f"Tag clip {i}."}]}], generation=one_token) for i in range(n)]
    return out


def _write_once(path: Path, make: Callable[[], bytes]) -> None:
    if not path.exists():
        path.write_bytes(make())


class BenchWorker:
    """One worker subprocess (`serve` above) and the handles to measure it."""

    def __init__(self, redis_url: str, root: Path, model: str, *, instant: bool,
                 env: dict[str, str] | None = None, code_root: Path | None = None) -> None:
        self.worker_id = f"bench-{model}-{uuid.uuid4().hex[:6]}"
        self.root = root
        base = {k: v for k, v in os.environ.items() if not k.startswith("IVQ_")}
        # The worker imports this tree's packages (or code_root's: another commit, side by side).
        repo = str(code_root or Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (repo, base.get("PYTHONPATH", "")) if p)
        self.env = {**base, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "IVQ_REDIS_URL": redis_url,
                    "IVQ_MODEL": model, "IVQ_MODEL_CACHE_DIR": str(root / "models"),
                    "IVQ_DATA_DIR": str(root / "worker"), "IVQ_STORE_URL": f"file://{root / 'store'}",
                    "IVQ_ALLOWED_FILE_ROOT": str(root), "IVQ_LOG_LEVEL": "WARNING", "IVQ_WORKER_ID": self.worker_id,
                    "IVQ_WARMUP": "false" if instant else "true", **(env or {})}
        self.args = [sys.executable, "-m", "benchmarks.control_plane", "serve"] + (["--instant"] if instant else [])
        self.cwd = repo  # `-m` puts the working directory first on the path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> BenchWorker:
        import redis

        from api_client import keys

        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / f"{self.worker_id}.log", "wb")
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.cwd)
        r = redis.Redis.from_url(self.env["IVQ_REDIS_URL"])
        deadline = time.monotonic() + 300
        while not r.hexists(keys.WORKERS, self.worker_id):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench worker did not start (exit {self.proc.poll()}), see {self._log.name}")
            time.sleep(0.1)
        r.close()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.close()

    def snapshot(self) -> dict[str, Any]:
        """The worker's probes, plus CPU seconds of its own process and of its child processes."""
        import psutil

        assert self.proc is not None and self.proc.stdin is not None
        path = self.root / f"snap-{uuid.uuid4().hex[:8]}.json"
        self.proc.stdin.write(f"snapshot {path}\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the bench worker did not answer a snapshot")
            time.sleep(0.01)
        snap = json.loads(path.read_text())
        path.unlink()
        proc = psutil.Process(self.proc.pid)
        times = proc.cpu_times()
        snap["model_process_cpu_s"] = times.user + times.system
        children = 0.0
        for child in proc.children(recursive=True):
            try:
                t = child.cpu_times()
                children += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        snap["child_processes_cpu_s"] = children
        return snap


def _commands(r: Any) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def measure(worker: BenchWorker, client: Any, requests: list[Any], redis_client: Any) -> dict[str, Any]:
    """Submit every request at once, wait for all; what the worker spent on them, per job."""
    before, cmds_before = worker.snapshot(), _commands(redis_client)
    started = time.perf_counter()
    ids = client.submit_many(requests)
    statuses = [client.wait(job_id, timeout=1800) for job_id in ids]
    wall = time.perf_counter() - started
    after, cmds_after = worker.snapshot(), _commands(redis_client)
    failed = [s.error for s in statuses if s.state.value != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} control-plane jobs failed, first: {failed[0]}")
    n = len(ids)
    per_job_ms = lambda a, b: round((a - b) * 1000.0 / n, 2)  # noqa: E731
    model = per_job_ms(after["model_process_cpu_s"], before["model_process_cpu_s"])
    children = per_job_ms(after["child_processes_cpu_s"], before["child_processes_cpu_s"])
    diff = lambda key: {k: per_job_ms(after[key].get(k, 0.0), before[key].get(k, 0.0))  # noqa: E731
                        for k in set(after[key]) | set(before[key])}
    threads, stages = diff("threads_cpu_s"), diff("stages_cpu_s")
    in_job = stages.pop("process_job", 0.0)
    breakdown = {s: stages.get(s, 0.0) for s in STAGES}
    breakdown.update({k: v for k, v in stages.items() if k not in breakdown})
    in_process = ("handoff", "state", "result_write", "events") if children else STAGES
    breakdown["job_path_other"] = round(in_job - sum(stages.get(k, 0.0) for k in in_process), 2)
    breakdown["celery"] = round(threads.get("celery_consumer", 0.0) + threads.get("task_threads", 0.0) - in_job, 2)
    breakdown["model_thread"] = threads.get("model_thread", 0.0)
    breakdown["other_threads"] = threads.get("other", 0.0)
    commands = {k: round((cmds_after.get(k, 0) - cmds_before.get(k, 0)) / n, 2) for k in cmds_after}
    commands = {k: v for k, v in sorted(commands.items(), key=lambda kv: -kv[1]) if v}
    return {"jobs": n, "seconds": round(wall, 3), "jobs_per_s": round(n / wall, 2),
            "cpu_ms_per_job": round(model + children, 2), "model_process_cpu_ms_per_job": model,
            "preprocess_processes_cpu_ms_per_job": children, "stages_cpu_ms_per_job": breakdown,
            "threads_cpu_ms_per_job": threads, "redis_commands_per_job": round(sum(commands.values()), 1),
            "redis_commands_by_name": commands}


@contextmanager
def _redis_and_client(root: Path) -> Iterator[tuple[Any, Any, Any]]:
    import redis

    from api_client import JobClient
    from worker.ops.embedded import EmbeddedRedis

    server = EmbeddedRedis(root / "redis")
    client = JobClient(server.url)
    r = redis.Redis.from_url(server.url)
    try:
        yield server, client, r
    finally:
        client.close()
        r.close()
        server.stop()


def run_worker_mixes(redis_url: str, client: Any, r: Any, root: Path, *, model: str, instant: bool,
                     requests: dict[str, list[Any]], warmup: int, env: dict[str, str] | None = None,
                     progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with BenchWorker(redis_url, root, model, instant=instant, env=env) as worker:
        for mix, reqs in requests.items():
            progress(f"control plane: {'instant engine' if instant else model + ' model'}, {mix}, "
                     f"{len(reqs)} jobs at once")
            measure(worker, client, reqs[:warmup], r)  # first calls (lazy imports, connections) off the clock
            out[mix] = measure(worker, client, reqs, r)
    return out


def compare_side_by_side(root: Path, variants: dict[str, tuple[Path | None, dict[str, str]]], jobs: int,
                         rounds: int, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """one_tile with the instant engine on several workers, each with its own redis-server, all up at
    once and measured in turn, `rounds` times: variant name -> (code tree or None for this one, env).
    Each variant's best run by jobs/s is kept; load from elsewhere hits every variant alike."""
    from contextlib import ExitStack

    root = root.resolve()
    requests = build_requests(448, root / "store" / "media", {"one_tile": jobs})["one_tile"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with ExitStack() as stack:
        up = {}
        for name, (code_root, env) in variants.items():
            server, client, r = stack.enter_context(_redis_and_client(root / f"side-{name}"))
            progress(f"control plane, side by side: starting {name}")
            worker = stack.enter_context(BenchWorker(server.url, root, INSTANT_MODEL, instant=True, env=env,
                                                     code_root=code_root))
            measure(worker, client, requests[:8], r)
            up[name] = (worker, client, r)
        for i in range(rounds):
            for name, (worker, client, r) in up.items():
                progress(f"control plane, side by side: round {i + 1}/{rounds}, {name}, {jobs} one_tile jobs")
                runs[name].append(measure(worker, client, requests, r))
    best = {name: max(rs, key=lambda m: m["jobs_per_s"]) for name, rs in runs.items()}
    return {"jobs": jobs, "rounds": rounds, "best": best,
            "jobs_per_s_by_round": {name: [m["jobs_per_s"] for m in rs] for name, rs in runs.items()}}


def bench_control_plane(root: Path, plan: ControlPlanePlan,
                        progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    root = root.resolve()
    media = root / "store" / "media"
    results: dict[str, Any] = {"max_new_tokens": 1, "instant_model": plan.instant_model, "tiny_model": TINY_MODEL}
    with _redis_and_client(root) as (server, client, r):
        instant_reqs = build_requests(plan.instant_tile, media, plan.jobs)
        results["instant"] = run_worker_mixes(server.url, client, r, root, model=plan.instant_model, instant=True,
                                              requests=instant_reqs, warmup=plan.warmup_jobs, env=plan.extra_env,
                                              progress=progress)
        if plan.prep_workers and "one_tile" in instant_reqs:
            by_pool: dict[str, Any] = {}
            for count in plan.prep_workers:
                env = {**plan.extra_env, "IVQ_PREPROCESS_WORKERS": str(count)}
                by_pool[str(count)] = run_worker_mixes(
                    server.url, client, r, root, model=plan.instant_model, instant=True, env=env,
                    requests={"one_tile": instant_reqs["one_tile"]}, warmup=plan.warmup_jobs,
                    progress=progress)["one_tile"]
            results["instant_one_tile_by_preprocess_workers"] = by_pool
        tiny_reqs = build_requests(56, media, plan.tiny_jobs)  # the tiny model's own tile
        results["tiny"] = {} if not tiny_reqs else run_worker_mixes(
            server.url, client, r, root, model=TINY_MODEL, instant=False, requests=tiny_reqs,
            warmup=plan.warmup_jobs, env=plan.extra_env, progress=progress)
    one = results["instant"]["one_tile"]
    results["headline"] = {"instant_one_tile_jobs_per_s": one["jobs_per_s"],
                           "instant_one_tile_model_process_cpu_ms": one["model_process_cpu_ms_per_job"],
                           "instant_one_tile_cpu_ms": one["cpu_ms_per_job"],
                           "instant_one_tile_redis_commands": one["redis_commands_per_job"]}
    return results


def table(results: dict[str, Any]) -> str:
    """A markdown table: one row per engine and mix."""
    stages = (*STAGES, "job_path_other", "celery", "model_thread", "other_threads")
    head = ["engine", "mix", "jobs/s", "CPU ms/job (all)", "model process", "prep processes", *stages,
            "Redis cmds/job"]
    rows = []
    for engine in ("instant", "tiny"):
        for mix, m in results.get(engine, {}).items():
            s = m["stages_cpu_ms_per_job"]
            rows.append([engine, mix, m["jobs_per_s"], m["cpu_ms_per_job"], m["model_process_cpu_ms_per_job"],
                         m["preprocess_processes_cpu_ms_per_job"], *[s.get(k, 0.0) for k in stages],
                         m["redis_commands_per_job"]])
    for count, m in results.get("instant_one_tile_by_preprocess_workers", {}).items():
        s = m["stages_cpu_ms_per_job"]
        rows.append([f"instant, {count} prep", "one_tile", m["jobs_per_s"], m["cpu_ms_per_job"],
                     m["model_process_cpu_ms_per_job"], m["preprocess_processes_cpu_ms_per_job"],
                     *[s.get(k, 0.0) for k in stages], m["redis_commands_per_job"]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.control_plane")
    parser.add_argument("verb", nargs="?", default="bench", choices=("bench", "serve"))
    parser.add_argument("--instant", action="store_true", help="serve: swap in the instant engine")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prep", default="", help="bench: comma-separated preprocessing pool sizes to compare")
    parser.add_argument("--mixes", default=",".join(MIXES), help="bench: comma-separated mixes")
    parser.add_argument("--no-tiny", action="store_true", help="bench: the instant engine only")
    parser.add_argument("--side-by-side", default="", help="compare: NAME=TREE|-:PREP,... (one_tile, instant)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(".ivq-data") / "bench" / "control-plane")
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return serve(args.instant)
    if args.side_by_side:  # e.g. base=/tmp/basetree:,inthread=-:0,pool1=-:1,pool2=-:2
        variants: dict[str, tuple[Path | None, dict[str, str]]] = {}
        for spec in args.side_by_side.split(","):
            name, _, rest = spec.partition("=")
            tree, _, prep = rest.partition(":")
            variants[name] = (None if tree in ("", "-") else Path(tree),
                              {"IVQ_PREPROCESS_WORKERS": prep} if prep else {})
        out = compare_side_by_side(args.out, variants, args.jobs, args.rounds,
                                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "side_by_side.json").write_text(json.dumps(out, indent=2))
        print(json.dumps(out) if args.json else table({"instant": out["best"]}))
        print(json.dumps(out["jobs_per_s_by_round"]), file=sys.stderr)
        return 0
    plan = control_plane_plan(args.quick)
    if args.prep:
        plan.prep_workers = tuple(int(x) for x in args.prep.split(","))
    mixes = args.mixes.split(",")
    plan.jobs = {m: n for m, n in plan.jobs.items() if m in mixes}
    plan.tiny_jobs = {} if args.no_tiny else {m: n for m, n in plan.tiny_jobs.items() if m in mixes}
    results = bench_control_plane(args.out, plan, progress=lambda m: print(f"[bench] {m}", file=sys.stderr,
                                                                          flush=True))
    print(json.dumps(results, indent=None if args.json else 2) if args.json else table(results))
    if not args.json:
        print(json.dumps(results["headline"]))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
