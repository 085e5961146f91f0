"""Response formats the structured-output tests decode under, and how each output is checked.

Every JSON schema closes its objects (`additionalProperties: false`, as OpenAI's strict
mode requires): an open object lets a random-weight model invent keys until the cap.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

PRODUCT = {
    "type": "object",
    "properties": {
        "category": {"enum": ["shoes", "bag", "shirt", "watch"]},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["category", "price", "tags"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "product (enum, number, array)": PRODUCT,
    "nested objects": {
        "type": "object",
        "properties": {"item": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10},
                           "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                                                                      "h": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
                                    "required": ["w", "h"], "additionalProperties": False}},
            "required": ["name", "size"], "additionalProperties": False}},
        "required": ["item"], "additionalProperties": False,
    },
    "array of objects (minItems 2, maxItems 4)": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False},
    },
    "enums, booleans, null": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "damaged": {"type": "boolean"},
                       "note": {"type": "null"}, "size": {"enum": [1, 2, 3, "xl"]}},
        "required": ["color", "damaged", "note", "size"], "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "object",
        "properties": {"count": {"type": "integer", "minimum": -5, "maximum": 5},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                       "score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["count", "ratio", "score"], "additionalProperties": False,
    },
    "strings with maxLength and pattern": {
        "type": "object",
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "title": {"type": "string", "maxLength": 12},
                       "code": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"}},
        "required": ["sku", "title", "code"], "additionalProperties": False,
    },
    "$ref to $defs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    },
    "anyOf": {
        "type": "object",
        "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                            {"type": "string", "maxLength": 5}, {"type": "null"}]},
                       "unit": {"anyOf": [{"enum": ["cm", "in"]}, {"type": "boolean"}]}},
        "required": ["answer", "unit"], "additionalProperties": False,
    },
}

REGEX = r"[A-Z]{2}-[0-9]{3}(-[a-z]{1,3})?"
CHOICES = ["yes", "no", "not sure"]


def response_formats() -> dict[str, dict[str, Any]]:
    """name -> response_format, every kind once or more."""
    formats = {name: {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
               for i, (name, schema) in enumerate(SCHEMAS.items())}
    formats["json_object"] = {"type": "json_object"}
    formats["regex"] = {"type": "regex", "pattern": REGEX}
    formats["choice"] = {"type": "choice", "choices": CHOICES}
    return formats


def check_output(response_format: dict[str, Any], text: str) -> None:
    """Raise unless `text` matches the format: JSON valid against its schema, the regex, or one choice."""
    kind = response_format["type"]
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), response_format["json_schema"]["schema"])
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(response_format["pattern"], text), text
    elif kind == "choice":
        assert text in response_format["choices"], text
