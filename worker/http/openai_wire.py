"""The OpenAI wire format on this service's terms (the routes: openai_chat.py, openai_files.py,
openai_batches.py).

- Errors: `{"error": {"message", "type", "param", "code"}}`, with the status codes the
  `openai` SDK maps to its exceptions. `code` carries this service's stable ErrorCode.
  429 has `Retry-After` (at most 120 s, what the SDK honours); a 409 that retrying
  cannot fix has `x-should-retry: false`.
- A chat completion request becomes `n` JobRequests (`to_jobs`): one row per choice,
  choice i seeded `seed + i`. `data:` URLs are stored under the tenant (`MediaSink`) and
  referenced, since jobs reference media by URL; `s3://` URLs pass as they are.
- A JobResult becomes a `chat.completion` (`completion`), or stream chunks (`chunk`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from api_client.errors import QuotaExceeded, RateLimited, ServiceError
from api_client.schema import MAX_STOP_STRINGS, ErrorCode, JobResult
from worker.http.wire import UNAVAILABLE_RETRY_AFTER_S

OPENAI_PREFIXES = ("/v1/chat/", "/v1/models", "/v1/files", "/v1/batches")
MAX_BODY_BYTES = 24 * 1024 * 1024  # a chat completion request, data: URLs included
MAX_DATA_URL_BYTES = 16 * 1024 * 1024  # one decoded data: URL (the worker's own media limits apply after)
DEFAULT_MAX_TOKENS = 1024  # when the request names neither max_completion_tokens nor max_tokens
MAX_N = 8
MAX_RETRY_AFTER_S = 120  # the SDK does not retry past this
DATA_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
              "image/bmp": "bmp", "video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov"}

# Accepted and ignored: they change nothing this service does.
_IGNORED = {"user", "metadata", "store", "parallel_tool_calls", "service_tier", "modalities", "prompt_cache_key",
            "safety_identifier", "reasoning_effort"}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
          "response_format", "stream", "stream_options", "frequency_penalty", "presence_penalty", "logprobs",
          "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
          "min_tokens"} | _IGNORED  # min_tokens: vLLM's extension (extra_body), no end before that many tokens

STATUS_OF: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400, ErrorCode.media_not_found: 400, ErrorCode.invalid_media: 400,
    ErrorCode.media_too_large: 400, ErrorCode.prompt_too_long: 400, ErrorCode.too_large_for_gpu: 400,
    ErrorCode.forbidden_url: 403, ErrorCode.unauthorized: 401, ErrorCode.not_found: 404, ErrorCode.conflict: 409,
    ErrorCode.cancelled: 409, ErrorCode.invalid_schema: 422, ErrorCode.unsupported_schema_feature: 422,
    ErrorCode.invalid_regex: 422, ErrorCode.empty_choices: 422, ErrorCode.schema_too_large: 422,
    ErrorCode.rate_limited: 429, ErrorCode.quota_exceeded: 429, ErrorCode.broker_unavailable: 503,
    ErrorCode.storage_unavailable: 503, ErrorCode.timeout: 504, ErrorCode.expired: 504,
    ErrorCode.poison: 500, ErrorCode.preprocess_crashed: 500, ErrorCode.internal_error: 500,
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


class OpenAIError(ServiceError):
    """A refusal of the OpenAI routes themselves: its own status, `param` and `code` (a string)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str = ErrorCode.invalid_request.value, retry: bool | None = None):
        super().__init__(message, code=ErrorCode.invalid_request)
        self.status, self.param, self.openai_code, self.retry = status, param, code, retry


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def status_of(code: ErrorCode) -> int:
    return STATUS_OF.get(code, 500)


def error_body(message: str, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ServiceError, *, status: int | None = None) -> JSONResponse:
    """Any ServiceError in OpenAI's shape. `status` overrides the code's (413 for a body over the cap)."""
    headers: dict[str, str] = {}
    if isinstance(exc, OpenAIError):
        status, param, code = status or exc.status, exc.param, exc.openai_code
        if exc.retry is not None:
            headers["x-should-retry"] = "true" if exc.retry else "false"
    else:
        status, param, code = status or status_of(exc.code), None, exc.code.value
    if status == 409 and "x-should-retry" not in headers:
        headers["x-should-retry"] = "false"  # a state conflict: asking again changes nothing
    if isinstance(exc, (RateLimited, QuotaExceeded)):
        headers["Retry-After"] = str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(exc.retry_after_s))))
    elif exc.retryable:  # Redis or the store unreachable (a failover takes seconds): try again soon
        headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.message, status, code, param), status, headers=headers)


# ---- requests -------------------------------------------------------------
MediaSink = Callable[[bytes, str], str]  # (bytes, file extension) -> a URL the workers read


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, param=param)


def resolve_url(url: Any, param: str, sink: MediaSink | None) -> str:
    """An image_url/video_url's URL as a job's media URL: data: URLs stored through `sink`."""
    if not isinstance(url, str) or not url:
        raise _bad("url must be a non-empty string", param)
    if not url.startswith("data:"):
        return url  # https (the workers' SSRF guard), s3:// (this service's extension); the schema checks it
    header, sep, payload = url[len("data:"):].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise _bad("a data: URL must be data:<type>;base64,<data>", param)
    ext = DATA_TYPES.get(media_type.lower())
    if ext is None:
        raise _bad(f"data: URL type {media_type!r} is not one of {', '.join(DATA_TYPES)}", param)
    if len(payload) > math.ceil(MAX_DATA_URL_BYTES / 3) * 4 + 4:
        raise OpenAIError(f"a data: URL holds at most {MAX_DATA_URL_BYTES} bytes", param=param,
                          code=ErrorCode.media_too_large.value)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data: URL is not valid base64", param) from None
    if len(data) > MAX_DATA_URL_BYTES:
        raise OpenAIError(f"a data: URL holds at most {MAX_DATA_URL_BYTES} bytes", param=param,
                          code=ErrorCode.media_too_large.value)
    if sink is None:
        raise _bad("data: URLs are not accepted here (the service has no object store configured)", param)
    return sink(data, ext)


def media_key(tenant: str, data: bytes, ext: str) -> str:
    """Content-addressed: the same image sent twice is stored once."""
    return f"uploads/{tenant}/{hashlib.sha256(data).hexdigest()}.{ext}"


def _content(content: Any, where: str, sink: MediaSink | None) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise _bad("content must be a string or a non-empty list of parts", where)
    items: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            spec = part.get(kind)
            if not isinstance(spec, dict):
                raise _bad(f"{kind} must be an object {{\"url\": ...}}", f"{at}.{kind}")
            url = resolve_url(spec.get("url"), f"{at}.{kind}.url", sink)
            items.append({"type": "image" if kind == "image_url" else "video", "url": url})
        else:
            raise _bad("a content part is text, image_url or video_url", at)
    return items


def _messages(messages: Any, sink: MediaSink | None) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _bad("role must be system, developer, user or assistant", f"{where}.role")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content", sink)})
    return out


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"{name} must be a number in [{low}, {high}]", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}]", name)
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in body:
        if name not in _KNOWN:
            raise _bad(f"unknown parameter {name!r}", name)
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise _bad(f"{name} is not supported by this service", name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise _bad(f"{name} is not supported by this service", name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported by this service", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported by this service (only 0)", name)


def to_jobs(body: Any, served_model: str, sink: MediaSink | None, *, max_n: int = MAX_N) -> list[dict[str, Any]]:
    """One JobRequest (as a dict, checked by JobClient.submit) per choice."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object (a chat completion request)")
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model is required", "model")
    if model != served_model:
        raise OpenAIError(f"The model {model!r} does not exist; this service serves {served_model!r}",
                          status=404, param="model", code="model_not_found")
    limit = _integer(body, "max_completion_tokens", 1, 4096)
    limit = limit if limit is not None else _integer(body, "max_tokens", 1, 4096)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", 0, 2**31 - 1 - max_n)
    n = _integer(body, "n", 1, max_n) or 1
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stops):
        raise _bad(f"stop is a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    generation: dict[str, Any] = {"max_new_tokens": limit or DEFAULT_MAX_TOKENS, "stop": stops}
    min_tokens = _integer(body, "min_tokens", 0, generation["max_new_tokens"])
    if min_tokens:
        generation["min_new_tokens"] = min_tokens
    if temperature != 0.0:  # OpenAI samples unless the temperature is 0
        generation.update(do_sample=True, temperature=temperature or 1.0)
        if top_p is not None and top_p > 0:
            generation["top_p"] = top_p
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") not in ("text", "json_object", "json_schema")):
        raise _bad("response_format.type is text, json_object or json_schema", "response_format")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    request: dict[str, Any] = {"messages": _messages(body.get("messages"), sink), "generation": generation}
    if response_format is not None:
        request["response_format"] = response_format
    return [{**request, "generation": {**generation, **({"seed": seed + i} if seed is not None else {})}}
            for i in range(n)]


# ---- responses ------------------------------------------------------------
def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + hashlib.sha256(f"{time.time_ns()}{id(object())}".encode()).hexdigest()[:24]


def usage(results: list[JobResult]) -> dict[str, int]:
    """The prompt once (every choice has the same), the completions summed."""
    return usage_of(results[0].usage.prompt_tokens if results else 0, sum(r.usage.completion_tokens for r in results))


def usage_of(prompt: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def completion(chat_id: str, model: str, choices: list[tuple[str, str]], used: dict[str, int],
               created: int | None = None) -> dict[str, Any]:
    """A `chat.completion` of (text, finish_reason) choices (the batch routes' output lines too)."""
    return {
        "id": chat_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": reason, "logprobs": None} for i, (text, reason) in enumerate(choices)],
        "usage": used, "system_fingerprint": None,
    }


def of_results(chat_id: str, model: str, results: list[JobResult]) -> dict[str, Any]:
    return completion(chat_id, model, [(r.output_text, r.finish_reason) for r in results], usage(results))


def chunk(chat_id: str, model: str, created: int, index: int, delta: dict[str, Any],
          finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            "usage": None}


def usage_chunk(chat_id: str, model: str, created: int, results: list[JobResult]) -> dict[str, Any]:
    return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(results)}
