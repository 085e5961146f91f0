"""The client verbs of `internvl-queue`: submit, status, wait, result, cancel and callbacks talk
to Redis (api_client's JobClient), batch to the HTTP API (HttpJobClient).

Each imports what it needs when it runs, and nothing here imports the model stack,
so these verbs start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    from api_client.dispatch import Dispatcher, producer_app
    from api_client.redis_conn import sync_client
    from worker.jobs.callbacks import list_dead, take_dead

    url = args.redis_url or os.environ.get("IVQ_REDIS_URL")
    if not url:
        sys.exit("error: pass --redis-url or set IVQ_REDIS_URL")
    r = sync_client(url)
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
