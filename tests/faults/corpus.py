"""Hostile and broken inputs for the bad-input test: media bytes and request shapes.

Every builder here is deterministic and small (the "bomb" is ~50 KB on the
wire and would be 400 megapixels if decoded).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import uuid
import zlib
from pathlib import Path

from model_runtime.samples import make_sample_image, make_sample_video


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 MP at 20000): tiny compressed, huge decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_huge_header(width: int = 60_000, height: int = 60_000) -> bytes:
    """A JPEG whose start-of-frame claims a huge size (and carries no pixels)."""
    jpeg = make_sample_image(32, 32, seed=1)
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]


def truncated_jpeg() -> bytes:
    data = make_sample_image(320, 240, seed=2)
    return data[: len(data) // 3]


def not_an_image() -> bytes:
    return b"#!/bin/sh\necho this is a shell script named photo.jpg\n" * 20


def zero_frame_mp4() -> bytes:
    """An MP4 with a video stream and not one frame in it."""
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    return out.getvalue()


def corrupt_mp4() -> bytes:
    """A real MP4 whose sample data has been overwritten with noise."""
    data = bytearray(make_sample_video(seconds=1, fps=8, width=64, height=48))
    start = data.find(b"mdat") + 8
    for i in range(start, min(len(data), start + 4000)):
        data[i] = (i * 131) % 251
    return bytes(data)


def truncated_mp4() -> bytes:
    data = make_sample_video(seconds=1, fps=8, width=64, height=48)
    return data[:200]


def pickle_message(marker: Path) -> str:
    """A Celery-shaped message for ivq.infer whose body is a pickle that would create `marker`.

    If any worker unpickled it, the file would appear. Workers accept JSON only.
    """

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    body = pickle.dumps(((Evil(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    return raw_message(base64.b64encode(body).decode(), "application/x-python-serialize", "binary")


def raw_message(body_b64: str, content_type: str, encoding: str = "utf-8", task: str = "ivq.infer") -> str:
    """The JSON envelope kombu's Redis transport keeps in the queue list."""
    task_id = str(uuid.uuid4())
    return json.dumps({
        "body": body_b64, "content-encoding": encoding, "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                    "argsrepr": "", "kwargsrepr": "{}", "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "infer"}, "delivery_tag": task_id},
    })


def json_task_message(args: list) -> str:
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return raw_message(base64.b64encode(body.encode()).decode(), "application/json")


def user(*content: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(content)}], "generation": {"max_new_tokens": 4}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image", "url": url}


def video(url: str, **kw) -> dict:
    return {"type": "video", "url": url, **kw}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "case", "schema": schema}}


def format_cases() -> dict[str, tuple[dict, str]]:
    """response_formats that cannot be enforced: name -> (response_format, the code it is refused with)."""
    big_enum = [f"value-{i:05d}-" + "x" * 40 for i in range(800)]  # ~40 KB: over the schema size limit
    return {
        "schema: unknown type": (schema_format({"type": "bogus"}), "invalid_schema"),
        "schema: dangling $ref": (schema_format({"$ref": "#/$defs/missing"}), "invalid_schema"),
        "schema: pattern not a regex": (schema_format({"type": "string", "pattern": "a(("}), "invalid_schema"),
        "schema: uniqueItems": (schema_format({"type": "array", "uniqueItems": True}), "unsupported_schema_feature"),
        "schema: not": (schema_format({"not": {"type": "null"}}), "unsupported_schema_feature"),
        "schema: if/then/else": (schema_format({"if": {"type": "string"}, "then": {"maxLength": 3},
                                                "else": {"type": "number"}}), "unsupported_schema_feature"),
        "regex: unclosed group": ({"type": "regex", "pattern": "a(b"}, "invalid_regex"),
        "regex: bad repetition": ({"type": "regex", "pattern": "*a"}, "invalid_regex"),
        "choice: empty list": ({"type": "choice", "choices": []}, "empty_choices"),
        "choice: an empty string": ({"type": "choice", "choices": ["yes", ""]}, "empty_choices"),
        "schema: 40 KB enum": (schema_format({"enum": big_enum}), "schema_too_large"),
        "choice: 1000 choices": ({"type": "choice", "choices": [f"c{i}" for i in range(1000)]}, "schema_too_large"),
    }
