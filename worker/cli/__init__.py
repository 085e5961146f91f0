"""The `internvl-queue` command: the argument parser and the dispatch to a verb.

Client verbs (submit, status, wait, result, cancel, callbacks, batch; worker/cli/client.py)
import only api_client and what talks to Redis or the API, so they start fast; the
service verbs (worker, api, api-key, demo, make-tiny-model, bench, simulate-autoscale;
worker/cli/service.py) load the model stack only for worker, demo, bench and
make-tiny-model. Verbs build their Settings from the environment and pass them down;
the other entrypoint, `celery -A worker.celery_app`, builds its own in worker/celery_app.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from worker.cli.client import cmd_batch, cmd_callbacks, cmd_cancel, cmd_result, cmd_status, cmd_submit, cmd_wait
from worker.cli.service import (cmd_api, cmd_api_key, cmd_bench, cmd_demo, cmd_make_tiny_model,
                                cmd_simulate_autoscale, cmd_worker)


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
