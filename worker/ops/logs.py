"""JSON logs: structlog lines with the bound context, and the redaction step.

Every line carries the bound context (job_id, batch_id, attempt, worker) and
goes through `redact_processor`, so secrets and presigned URLs never reach
the log pipeline. Stdlib loggers (celery, botocore) are routed the same way.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"
_SECRET_KEY_RE = re.compile(
    r"secret|passw|signature|authorization|api[_-]?key|credential|cookie"
    r"|(^|_)(access|auth|bearer|refresh|session|security|id)?_?token$",  # not "completion_tokens"
    re.I,
)
# A URL whose query carries a signature (S3/GCS presigned, Azure SAS): drop the whole query.
_SIGNED_URL_RE = re.compile(
    r"""(?P<base>[a-z][a-z0-9+.-]*://[^\s?#"'<>]+)\?(?P<query>[^\s"'<>]*)""", re.I
)
_SIGNED_QUERY_RE = re.compile(
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|(^|&)sig=|(^|&)signature=",
    re.I,
)
_URL_PASSWORD_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@", re.I)


def redact_text(text: str) -> str:
    """Strip signed query strings and URL passwords from free text."""

    def _strip(match: re.Match) -> str:
        if _SIGNED_QUERY_RE.search(match.group("query")):
            return match.group("base")
        return match.group(0)

    if "://" not in text:
        return text
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _SIGNED_URL_RE.sub(_strip, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > 6:  # a deeply nested value is not worth walking; it is still shown
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY_RE.search(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v, depth + 1) for v in value)
    return value


def redact_processor(logger: Any, method_name: str, event_dict: dict) -> dict:
    """structlog processor: secret-named keys are masked, signed URLs lose their query."""
    return _redact_value(event_dict)


def configure_logging(
    level: str = "INFO", *, json: bool = True, stream: TextIO | None = None, static: dict[str, Any] | None = None
) -> None:
    """JSON lines to stdout (or `stream`); stdlib loggers (celery, botocore) go the same way.

    `static` fields (e.g. worker=...) go on every line: contextvars do not
    reach threads started later (task threads, the model thread), these do.
    """
    level_no = logging.getLevelNamesMapping().get(level.upper())
    if level_no is None:
        raise ValueError(f"unknown log level {level!r}")
    stream = stream or sys.stdout
    fixed = dict(static or {})

    def add_static(logger: Any, method_name: str, event_dict: dict) -> dict:
        for key, value in fixed.items():
            event_dict.setdefault(key, value)
        return event_dict

    shared: list = [
        structlog.contextvars.merge_contextvars,
        add_static,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    tail: list = [structlog.processors.format_exc_info, redact_processor]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        # One write per line (PrintLogger writes the line and its newline apart): the stdlib handler below
        # shares the stream from other threads, and its line must not land between the two.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_no)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))
