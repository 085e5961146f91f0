"""`response_format`: what shape a job's output must have, and its check at submit time.

The shapes users know from the OpenAI API (and its Batch API lines):

    {"type": "text"}                                   the default: free text
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}
    {"type": "regex", "pattern": "..."}                the whole output matches the regex
    {"type": "choice", "choices": ["a", "b", ...]}     the output is exactly one of these

`compile_format` turns one into an llguidance grammar (no tokenizer, no model:
`LLMatcher.validate_grammar` takes none) and refuses what cannot be enforced,
with a stable code: `invalid_schema`, `unsupported_schema_feature` (llguidance's
"Unimplemented keys"), `invalid_regex`, `empty_choices`, `schema_too_large`
(over a size limit, or not compiled within COMPILE_TIMEOUT_S). JSON is compiled
without flexible whitespace, so a model cannot pad the output with endless blanks.
Importing this module imports llguidance (a small wheel, no dependencies), never torch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, Field

MAX_SCHEMA_BYTES = 32 * 1024  # the schema (or pattern, or choices) as compact JSON
MAX_CHOICES = 512
MAX_CHOICE_CHARS = 512
COMPILE_TIMEOUT_S = 2.0
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class FormatRejected(ValueError):
    """The format cannot be enforced; `code` is the stable wire code (api_client.ErrorCode)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Format(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextFormat(_Format):
    type: Literal["text"] = "text"


class JsonObjectFormat(_Format):
    type: Literal["json_object"] = "json_object"


class JsonSchemaSpec(_Format):
    # `schema` would shadow a BaseModel attribute: the field is schema_, "schema" on the wire.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=1024)
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema (draft 2020-12 keywords)")
    strict: bool | None = Field(default=None, description="accepted for OpenAI compatibility: always enforced")


class JsonSchemaFormat(_Format):
    type: Literal["json_schema"] = "json_schema"
    json_schema: JsonSchemaSpec


class RegexFormat(_Format):
    type: Literal["regex"] = "regex"
    pattern: str = Field(description="the whole output matches it (Rust regex syntax, anchored)")


class ChoiceFormat(_Format):
    type: Literal["choice"] = "choice"
    choices: list[str] = Field(description="the output is exactly one of these strings")


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat | RegexFormat | ChoiceFormat, Field(discriminator="type")
]


@dataclass(frozen=True)
class CompiledFormat:
    """A format as the worker enforces it: an llguidance grammar, and whether the output is JSON."""

    grammar: str
    is_json: bool


def is_constrained(fmt: Any) -> bool:
    return fmt is not None and not isinstance(fmt, TextFormat)


def compile_format(fmt: Any, *, timeout_s: float = COMPILE_TIMEOUT_S) -> CompiledFormat | None:
    """The grammar of a constrained format (None for text); raises FormatRejected."""
    if not is_constrained(fmt):
        return None
    if isinstance(fmt, JsonObjectFormat):
        grammar = _json_grammar(json.dumps({"type": "object"}))
        return CompiledFormat(_checked(grammar, "invalid_schema", timeout_s), True)
    if isinstance(fmt, JsonSchemaFormat):
        text = json.dumps(fmt.json_schema.schema_, separators=(",", ":"))  # key order kept: it is the output's
        _size(text, "schema")
        return CompiledFormat(_checked(_json_grammar(text), "invalid_schema", timeout_s), True)
    if isinstance(fmt, RegexFormat):
        _size(fmt.pattern, "pattern")
        return CompiledFormat(_checked(LLMatcher.grammar_from_regex(fmt.pattern), "invalid_regex", timeout_s), False)
    if isinstance(fmt, ChoiceFormat):
        return CompiledFormat(_checked(_choice_grammar(tuple(fmt.choices)), "invalid_schema", timeout_s), False)
    raise FormatRejected("invalid_schema", f"unknown response_format {type(fmt).__name__}")


def _size(text: str, what: str) -> None:
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise FormatRejected("schema_too_large", f"the {what} is over {MAX_SCHEMA_BYTES} bytes")


def _json_grammar(schema_text: str) -> str:
    try:
        return LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise FormatRejected("invalid_schema", f"not a JSON Schema: {exc}") from None


def _choice_grammar(choices: tuple[str, ...]) -> str:
    if not choices:  # llguidance accepts an empty alternative list: refuse it here
        raise FormatRejected("empty_choices", "choices must hold at least one string")
    if len(choices) > MAX_CHOICES or any(len(c) > MAX_CHOICE_CHARS for c in choices):
        raise FormatRejected("schema_too_large",
                             f"at most {MAX_CHOICES} choices of at most {MAX_CHOICE_CHARS} characters")
    if any(not c for c in choices):
        raise FormatRejected("empty_choices", "a choice must not be the empty string")
    _size(json.dumps(choices), "choice list")
    # Lark string literals take JSON's escapes.
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


# Threads run the compiles so that a submit can stop waiting for one; llguidance's own
# limits (fuel, grammar size) bound how long the thread itself can be kept.
_COMPILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="format-compile")


def _checked(grammar: str, code: str, timeout_s: float) -> str:
    error = _validate_within_timeout(grammar, timeout_s)
    if error is None:
        return grammar
    if error.startswith("Unimplemented keys"):
        raise FormatRejected("unsupported_schema_feature", f"llguidance cannot enforce these keywords: {error}")
    if "too large" in error.lower() or "limit" in error.lower() or "fuel" in error.lower():
        raise FormatRejected("schema_too_large", f"the format is too complex to compile: {error[:500]}")
    raise FormatRejected(code, error[:1000])


def _validate_within_timeout(grammar: str, timeout_s: float) -> str | None:
    future = _COMPILER.submit(_validate, grammar)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise FormatRejected("schema_too_large", f"the format did not compile within {timeout_s}s") from None


@lru_cache(maxsize=256)
def _validate(grammar: str) -> str | None:
    """None if llguidance can enforce the grammar, else its first error (cached: producers repeat formats)."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return messages[0] if messages else "invalid grammar"
    unimplemented = [m for m in messages if "Unimplemented keys" in m]
    return unimplemented[0] if unimplemented else None
