"""Tensors from a preprocessing process to the model process through shared memory, never pickled.

The writer (a preprocessing process, worker/jobs/prep_child.py) puts every
tensor of one request into one file under /dev/shm (RAM-backed on Linux; the
temp directory elsewhere) and describes the layout in a small JSON-able dict.
The reader (the model process) maps the file, unlinks it at once (the mapping
outlives the name) and builds tensors that view the mapping without a copy;
the memory is freed when the last tensor over it is. A file whose reader never
came (its writer or reader died) is removed by `discard` or `remove_stale`.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PREFIX = "ivq-prep-"
ALIGN = 64  # every tensor starts on a cache line


def shm_dir() -> Path:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def handoff_name(owner_pid: int, writer_pid: int, seq: int) -> str:
    """A file name the owner (the model process) can find again if the writer dies before answering."""
    return f"{PREFIX}{owner_pid}-{writer_pid}-{seq}"


def write_tensors(name: str, tensors: dict[str, torch.Tensor | None]) -> dict[str, Any]:
    """Write the tensors (None ones are skipped) to shared memory; returns the layout for `read_tensors`."""
    specs: dict[str, dict[str, Any]] = {}
    parts: list[tuple[int, torch.Tensor]] = []
    size = 0
    for key, tensor in tensors.items():
        if tensor is None:
            continue
        flat = tensor.detach().contiguous().reshape(-1)
        specs[key] = {"offset": size, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        parts.append((size, flat))
        size += -(-flat.numel() * flat.element_size() // ALIGN) * ALIGN
    path = shm_dir() / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Plain writes, not a mapping: a full /dev/shm is an OSError (ENOSPC) here, never a SIGBUS,
        # and on this VM they cost a third less than fallocate + copy (benchmarks/BENCHMARKS.md).
        for offset, flat in parts:
            data = flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        os.ftruncate(fd, max(size, 1))  # the padding after the last tensor
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return {"name": name, "size": max(size, 1), "tensors": specs}


def read_tensors(layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map the file named in `layout`, unlink it, and view each tensor in place (no copy)."""
    path = _path_of(layout["name"])
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, int(layout["size"]))
    finally:
        os.close(fd)
        os.unlink(path)
    out: dict[str, torch.Tensor] = {}
    for key, spec in layout["tensors"].items():
        dtype, shape = getattr(torch, spec["dtype"]), [int(d) for d in spec["shape"]]
        count = math.prod(shape)
        # The tensor holds a reference to the mapping: it is unmapped when the last view goes.
        out[key] = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=int(spec["offset"])).view(shape)
                    if count else torch.empty(shape, dtype=dtype))
    return out


def discard(name: str) -> None:
    """Remove a handoff file nobody will read (its writer died, or its job ended first)."""
    try:
        os.unlink(_path_of(name))
    except FileNotFoundError:
        pass


def remove_stale(owner_pid: int | None = None) -> int:
    """Remove handoff files of owners that are gone (or, given `owner_pid`, all of that owner's)."""
    removed = 0
    for path in shm_dir().glob(f"{PREFIX}*"):
        owner = path.name[len(PREFIX):].split("-", 1)[0]
        if not owner.isdigit():
            continue
        if (owner_pid is not None and int(owner) == owner_pid) or (owner_pid is None and not _alive(int(owner))):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _path_of(name: str) -> Path:
    if not name.startswith(PREFIX) or "/" in name or name in (".", ".."):
        raise ValueError(f"not a handoff name: {name!r}")
    return shm_dir() / name
