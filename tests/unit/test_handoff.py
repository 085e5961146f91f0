"""Tensors through shared memory (worker/model/handoff.py): same values, no copy on read, nothing left behind."""

from __future__ import annotations

import os

import pytest
import torch

from worker.model.handoff import discard, handoff_name, read_tensors, remove_stale, shm_dir, write_tensors


def test_tensors_come_back_equal_as_views_of_one_mapping_and_the_file_is_gone() -> None:
    ids = torch.arange(17, dtype=torch.int64)
    pixels = torch.randn(3, 3, 8, 8)
    name = handoff_name(os.getpid(), os.getpid(), 1)
    layout = write_tensors(name, {"input_ids": ids, "pixel_values": pixels, "absent": None})
    assert set(layout["tensors"]) == {"input_ids", "pixel_values"}
    assert all(spec["offset"] % 64 == 0 for spec in layout["tensors"].values())
    out = read_tensors(layout)
    assert not (shm_dir() / name).exists()  # unlinked as soon as it was mapped
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["pixel_values"], pixels)
    assert out["pixel_values"].dtype == torch.float32 and out["input_ids"].shape == (17,)
    # Both are views of the one mapping (no copy was made).
    specs = layout["tensors"]
    gap = specs["pixel_values"]["offset"] - specs["input_ids"]["offset"]
    assert out["pixel_values"].data_ptr() - out["input_ids"].data_ptr() == gap
    out["input_ids"][0] = 5  # writable, as the engine may need
    assert int(out["input_ids"][0]) == 5


def test_empty_and_non_contiguous_tensors() -> None:
    name = handoff_name(os.getpid(), os.getpid(), 2)
    base = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    out = read_tensors(write_tensors(name, {"t": base.t(), "e": torch.empty(0, 3)}))
    assert torch.equal(out["t"], base.t()) and out["e"].shape == (0, 3)


def test_discard_and_remove_stale_clean_up_unread_files() -> None:
    mine = handoff_name(os.getpid(), 1, 3)
    write_tensors(mine, {"x": torch.ones(2)})
    discard(mine)
    assert not (shm_dir() / mine).exists()
    discard(mine)  # twice is fine
    dead_owner = 2**22 + 12345  # above the default pid_max: no live process has it
    orphan = handoff_name(dead_owner, 1, 1)
    write_tensors(orphan, {"x": torch.ones(2)})
    live = handoff_name(os.getpid(), 1, 4)
    write_tensors(live, {"x": torch.ones(2)})
    assert remove_stale() >= 1
    assert not (shm_dir() / orphan).exists() and (shm_dir() / live).exists()
    remove_stale(os.getpid())
    assert not (shm_dir() / live).exists()


def test_only_handoff_names_are_read() -> None:
    with pytest.raises(ValueError):
        read_tensors({"name": "../etc/passwd", "size": 1, "tensors": {}})
