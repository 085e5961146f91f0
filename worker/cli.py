"""The `internvl-queue` command.

Client verbs (submit, status, wait, result, cancel) import only api_client,
so they start fast; the model stack loads only for worker, demo, bench and
make-tiny-model. Verbs build their Settings from the environment here and pass
them down; the other entrypoint, `celery -A worker.celery_app`, builds its own
in worker/celery_app.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def _client(args: argparse.Namespace):
    from api_client import JobClient

    url = args.redis_url or os.environ.get("IVQ_REDIS_URL")
    if not url:
        sys.exit("error: no Redis to talk to: pass --redis-url or set IVQ_REDIS_URL")
    return JobClient(url)


def _print_status(status: Any, as_json: bool, extra: dict | None = None) -> None:
    data = status.model_dump(mode="json", exclude_none=True)
    data.update(extra or {})
    if as_json:
        print(json.dumps(data))
        return
    line = f"{status.job_id}  {status.state.value}"
    if status.error:
        line += f"  error={status.error.code.value}: {status.error.message}"
    if status.output_preview:
        line += f"\n  output: {status.output_preview}"
    print(line)


def cmd_submit(args: argparse.Namespace) -> int:
    from api_client import RequestRejected

    content = [{"type": "image", "url": u} for u in args.image]
    content += [{"type": "video", "url": u} for u in args.video]
    content.append({"type": "text", "text": args.prompt})
    request: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
               "generation": {"max_new_tokens": args.max_new_tokens}}
    if args.callback_url:
        request["callback"] = {"url": args.callback_url}
        if args.callback_event:
            request["callback"]["events"] = args.callback_event
    if args.idempotency_key:
        request["idempotency_key"] = args.idempotency_key
    if args.priority:
        request["priority"] = args.priority
    if (response_format := _response_format(args)) is not None:
        request["response_format"] = response_format
    client = _client(args)
    try:
        job_id = client.submit(request)
    except RequestRejected as exc:
        if args.json:
            error = {"code": exc.code.value, "message": exc.message}
            print(json.dumps({"job_id": None, "state": "rejected", "error": error}))
        else:
            print(f"rejected: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 2
    if args.wait:
        return _finish(client.wait(job_id, timeout=args.timeout), args.json)
    if args.json:
        print(json.dumps({"job_id": job_id, "state": client.status(job_id).state.value}))
    else:
        print(job_id)
    return 0


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """--json-schema FILE, --choice a,b,c or --regex P (at most one) as a response_format."""
    if args.json_schema:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
        name = os.path.splitext(os.path.basename(args.json_schema))[0]
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if args.choice is not None:
        return {"type": "choice", "choices": [c for c in args.choice.split(",") if c] if args.choice else []}
    if args.regex is not None:
        return {"type": "regex", "pattern": args.regex}
    return None


def _finish(status: Any, as_json: bool) -> int:
    _print_status(status, as_json)
    return 0 if status.state.value == "succeeded" else 1


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(_client(args).status(args.job_id), args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from api_client import WaitTimeout

    try:
        client = _client(args)
        if args.follow:  # the text as it grows (on stderr with --json: stdout stays one object)
            out = sys.stderr if args.json else sys.stdout
            for piece in client.stream(args.job_id, timeout=args.timeout):
                out.write(piece)
                out.flush()
            out.write("\n")
        return _finish(client.wait(args.job_id, timeout=args.timeout), args.json)
    except WaitTimeout as exc:
        print(json.dumps({"job_id": args.job_id, "state": "waiting", "error": {"code": "timeout", "message": str(exc)}})
              if args.json else f"timeout: {exc}")
        return 3


def cmd_result(args: argparse.Namespace) -> int:
    client = _client(args)
    status = client.status(args.job_id)
    result = client.result(args.job_id)
    if args.json:
        data = {"job_id": args.job_id, "state": status.state.value}
        if result:
            data["result"] = result.model_dump(mode="json")
        if status.error:
            data["error"] = status.error.model_dump(mode="json")
        print(json.dumps(data))
    elif result:
        print(result.output_text)
    else:
        _print_status(status, False)
    return 0 if result else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    _print_status(_client(args).cancel(args.job_id), args.json)
    return 0


def cmd_callbacks(args: argparse.Namespace) -> int:
    import redis

    from api_client.dispatch import Dispatcher, producer_app
    from worker.jobs.callbacks import list_dead, take_dead

    url = args.redis_url or os.environ.get("IVQ_REDIS_URL")
    if not url:
        sys.exit("error: pass --redis-url or set IVQ_REDIS_URL")
    r = redis.Redis.from_url(url)
    if args.action == "dead":
        entries = list_dead(r, limit=args.limit)
        for e in entries:
            print(json.dumps(e) if args.json else
                  f"{e['delivery']['webhook_id']}  job={e['delivery'].get('job_id')}  "
                  f"event={e['delivery']['event']}  reason={e['reason']}")
        return 0
    dispatch = Dispatcher(producer_app(url))
    replayed = take_dead(r, args.webhook_id)
    for delivery in replayed:
        dispatch.deliver(delivery)
    print(f"replayed {len(replayed)} deliveries")
    return 0


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
    import redis

    with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5) as probe:
        memory = redis_memory_bytes(probe, settings.api_redis_memory_bytes)
    defaults = default_limits(memory, settings.api_tenant_redis_share)
    app = create_api(settings.redis_url, TenantRegistry(settings.api_keys_file, defaults=defaults), batches=batches,
                     redis_connections=settings.api_redis_connections)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, proxy_headers=True)
    return 0


def _http_client(args: argparse.Namespace):
    from api_client import HttpJobClient

    url, key = args.api_url or os.environ.get("IVQ_API_URL"), args.api_key or os.environ.get("IVQ_API_KEY")
    if not url or not key:
        sys.exit("error: pass --api-url and --api-key, or set IVQ_API_URL and IVQ_API_KEY")
    return HttpJobClient(url, key)


def cmd_batch(args: argparse.Namespace) -> int:
    """batch submit FILE.jsonl [--wait] | batch status ID | batch results ID [-o out.jsonl]."""
    import time

    with _http_client(args) as client:
        if args.action == "submit":
            with open(args.target, "rb") as f:  # streamed to the API
                accepted = client.submit_batch(f, partial=args.partial)
            print(json.dumps(accepted) if args.json else f"batch {accepted['batch_id']}: "
                  f"{accepted['accepted']} jobs accepted, {len(accepted['rejected'])} lines rejected")
            if not args.wait:
                return 0
            batch_id = accepted["batch_id"]
            from tqdm import tqdm

            started = time.monotonic()
            with tqdm(total=accepted["accepted"], unit="job", file=sys.stderr) as bar:
                while (status := client.batch(batch_id))["state"] != "completed":
                    ended = sum(status["counts"][s] for s in ("succeeded", "failed", "cancelled"))
                    bar.update(ended - bar.n)
                    rate = ended / max(1e-9, time.monotonic() - started)
                    bar.set_postfix(done=status["counts"]["succeeded"], failed=status["counts"]["failed"],
                                    jobs_s=f"{rate:.1f}")
                    time.sleep(1.0)
                bar.update(bar.total - bar.n)
            print(json.dumps(status) if args.json else f"batch {batch_id} completed: {status['counts']}")
            return 0
        if args.action == "status":
            print(json.dumps(client.batch(args.target)))
            return 0
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for row in client.batch_results(args.target):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
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
    from benchmarks.run import main as bench_main

    return bench_main(args.rest)


def cmd_simulate_autoscale(args: argparse.Namespace) -> int:
    from worker.ops.autoscale_sim import main as simulate_main

    return simulate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internvl-queue", description="Queued, micro-batched InternVL inference")
    sub = p.add_subparsers(dest="verb", required=True)

    def client_verb(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--redis-url", help="default: $IVQ_REDIS_URL")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(fn=fn)
        return sp

    sp = client_verb("submit", cmd_submit, "submit one job")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--image", action="append", default=[], help="s3://bucket/key or file:// URL (repeatable)")
    sp.add_argument("--video", action="append", default=[])
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--callback-url")
    sp.add_argument("--callback-event", action="append", choices=["running", "succeeded", "failed", "cancelled"])
    sp.add_argument("--idempotency-key")
    sp.add_argument("--priority", type=int, default=0)
    shape = sp.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this JSON Schema file")
    shape.add_argument("--choice", metavar="A,B,C", help="the output is exactly one of these")
    shape.add_argument("--regex", metavar="P", help="the whole output matches this regex")
    sp.add_argument("--wait", action="store_true")
    sp.add_argument("--timeout", type=float, default=None)
    for name, fn, help_ in (("status", cmd_status, "show a job's state"), ("result", cmd_result, "print a result"),
                            ("cancel", cmd_cancel, "cancel a queued or running job")):
        client_verb(name, fn, help_).add_argument("job_id")
    sp = client_verb("wait", cmd_wait, "block until a job ends")
    sp.add_argument("job_id")
    sp.add_argument("--timeout", type=float, default=None)
    sp.add_argument("--follow", action="store_true", help="print the output text as it grows, then the status")

    sp = client_verb("callbacks", cmd_callbacks, "list or replay dead callback deliveries")
    sp.add_argument("action", choices=["dead", "replay"])
    sp.add_argument("--webhook-id", default=None, help="replay only this one")
    sp.add_argument("--limit", type=int, default=100)

    sub.add_parser("worker", help="run a worker (settings from IVQ_* variables)").set_defaults(fn=cmd_worker)
    sp = sub.add_parser("api", help="serve the HTTP API (settings from IVQ_* variables)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.set_defaults(fn=cmd_api)
    sp = sub.add_parser("batch", help="submit a JSONL batch file through the HTTP API, follow it, get its results")
    sp.add_argument("action", choices=["submit", "status", "results"])
    sp.add_argument("target", help="FILE.jsonl (submit) or a batch id")
    sp.add_argument("--wait", action="store_true", help="submit: show progress until the batch completes")
    sp.add_argument("--partial", action="store_true", help="submit: accept the good lines of a file with bad ones")
    sp.add_argument("-o", "--output", help="results: write the JSONL here (default: stdout)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--api-url", default=None, help="default: $IVQ_API_URL")
    sp.add_argument("--api-key", default=None, help="default: $IVQ_API_KEY")
    sp.set_defaults(fn=cmd_batch)
    sp = sub.add_parser("api-key", help="make an API key for a tenant and print its keys-file entry")
    sp.add_argument("tenant")
    sp.set_defaults(fn=cmd_api_key)
    sp = sub.add_parser("demo", help="the whole path on an embedded Redis with the tiny model")
    sp.add_argument("--jobs", type=int, default=30)
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("make-tiny-model", help="build the tiny random-weight checkpoint")
    sp.add_argument("dir")
    sp.add_argument("--size", choices=["tiny", "small"], default="tiny")
    sp.set_defaults(fn=cmd_make_tiny_model)
    for name in ("bench", "simulate-autoscale"):  # dispatched by main() before parsing; listed for --help
        sub.add_parser(name, help=f"{name} (see --help after the verb)", add_help=False)
    return p


_PASS_THROUGH = {"bench": cmd_bench, "simulate-autoscale": cmd_simulate_autoscale}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _PASS_THROUGH:  # these verbs parse their own options
        return _PASS_THROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:  # one clear line for client errors, not a traceback
        from api_client.errors import ServiceError

        if isinstance(exc, ServiceError):
            print(json.dumps({"error": {"code": exc.code.value, "message": exc.message}}), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
