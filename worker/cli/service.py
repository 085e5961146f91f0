"""The service verbs of `internvl-queue`: worker, api, api-key, demo, make-tiny-model, and the
pass-through bench and simulate-autoscale.

They build their Settings from the environment and pass them down; the model stack
loads inside the verbs that need it (worker, demo, bench, make-tiny-model), when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.settings import Settings

    return serve_worker(Settings())


def serve_worker(settings: Any, *, on_started: Callable[[Any], None] | None = None) -> int:
    """Run one worker until it is told to stop. `on_started(runtime)` runs after the
    model is loaded and warmed up, before the first message is taken."""
    from worker.celery_app import create_app, install_shutdown_hooks, start_runtime
    from worker.ops.logs import configure_logging

    configure_logging(settings.log_level, static={"worker": settings.resolved_worker_id})
    embedded = None
    if not settings.redis_url:
        from worker.ops.embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings.data_dir / "redis", appendonly=True)
        settings = settings.model_copy(update={"redis_url": embedded.url})
        print(f"embedded redis at {embedded.url} (set IVQ_REDIS_URL to use your own)", file=sys.stderr)
    app = create_app(settings)
    install_shutdown_hooks(app)
    runtime = start_runtime(app)  # load + warm up before taking any message
    if on_started is not None:
        on_started(runtime)
    worker = app.Worker(
        hostname=f"{settings.resolved_worker_id}@%h", pool="threads",
        concurrency=settings.resolved_concurrency, queues=settings.queues,
        loglevel=settings.log_level, optimization="fair",
    )
    try:
        worker.start()
    finally:
        runtime.stop()
        if embedded:
            embedded.stop()
    return worker.exitcode or 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from worker.http.app import create_api
    from worker.http.batch_routes import BatchRoutes
    from worker.ops.logs import configure_logging
    from worker.io.results_store import open_store
    from worker.settings import Settings
    from worker.http.tenants import TenantRegistry, default_limits, redis_memory_bytes

    settings = Settings()
    configure_logging(settings.log_level, static={"component": "api"})
    if not settings.redis_url:
        sys.exit("error: set IVQ_REDIS_URL (the API has no embedded Redis)")
    if settings.api_keys_file is None:
        sys.exit("error: set IVQ_API_KEYS_FILE (tenants and the hashes of their keys; see `api-key`)")
    store = open_store(settings.resolved_store_url, s3_endpoint_url=settings.s3_endpoint_url,
                       s3_allowed_buckets=settings.s3_allowed_buckets)  # batch results; it reads no media
    batches = BatchRoutes(store, max_body_bytes=settings.api_max_batch_bytes,
                          allowed_buckets=tuple(settings.s3_allowed_buckets))
    from api_client.redis_conn import sync_client

    with sync_client(settings.redis_url) as probe:
        memory = redis_memory_bytes(probe, settings.api_redis_memory_bytes)
    defaults = default_limits(memory, settings.api_tenant_redis_share)
    app = create_api(settings.redis_url, TenantRegistry(settings.api_keys_file, defaults=defaults), batches=batches,
                     redis_connections=settings.api_redis_connections, served_model=settings.model,
                     durability=settings.durability())
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, proxy_headers=True)
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    from worker.http.tenants import key_entry, new_key

    key = new_key()
    print(f"key (give it to the tenant; it is not stored anywhere): {key}", file=sys.stderr)
    print(key_entry(args.tenant, key))
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from model_runtime.tiny import build_tiny

    print(build_tiny(args.dir, size=args.size))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.ops.demo import run_demo

    return run_demo(jobs=args.jobs)


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmarks are their own entry point (`python -m benchmarks.run`), in a process of their own:
    benchmarks import worker, so worker must not import benchmarks (an import-linter contract)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args.rest], check=False).returncode


def cmd_simulate_autoscale(args: argparse.Namespace) -> int:
    from worker.ops.autoscale_sim import main as simulate_main

    return simulate_main(args.rest)
