"""`python -m benchmarks.gpu_check --tiny` runs every section on a CPU and reports each figure.

The GPU check is run for real only on a CUDA machine (../shared/GPU.md); here
the tiny dimensions prove the script works before that machine's short time
is spent on it. The values are not checked, only that each one is produced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_the_gpu_check_runs_on_a_cpu_with_tiny_dimensions_and_reports_every_section(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--json", "--host-jobs-per-s", "40",
                           "--out", str(tmp_path / "gpu.json")],
                          cwd=root, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert json.loads((tmp_path / "gpu.json").read_text()) == result

    equality = result["equality"]
    assert equality["sdpa"]["float32"]["share"] == 1.0 and equality["eager"]["float32"]["share"] == 1.0
    assert "flash_attention_2" in equality
    for batch in ("1", "8", "32", "64"):
        step = result["decode_step"][batch]
        assert step["ms"] > 0 and step["floor_ms"] > 0
    assert result["vision"]["tiles_per_s"] > 0
    for regime in ("fixed_16", "per_job"):
        row = result["engine"][regime]
        assert row["sequential_jobs_per_s"] > 0
        assert {"continuous_cap_4", "continuous_cap_8"} <= set(row)
    for mix in ("shared_x4", "distinct"):
        reuse = result["vision_reuse"][mix]
        assert reuse["on"]["jobs_per_s"] > 0 and reuse["off"]["jobs_per_s"] > 0 and reuse["on_over_off"] > 0
        assert 0 < reuse["off"]["vision_share"] < 1
    assert result["vision_reuse"]["shared_x4"]["on"]["tiles"] < result["vision_reuse"]["shared_x4"]["off"]["tiles"]
    assert result["host"]["bound"] in ("gpu", "host") and result["host"]["host_jobs_per_s"] == 40
    assert result["meta"]["dims"] == "tiny"


def test_its_job_lengths_are_the_benchmarks() -> None:
    from benchmarks.gpu_measure import job_lengths as gpu_lengths
    from benchmarks.mixes import job_lengths

    assert gpu_lengths(0, "one_tile", 50) == job_lengths(0, "one_tile", 50)
