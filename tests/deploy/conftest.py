"""Fixtures for the deployment tests: render each kustomize overlay once per session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_ROOT = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu-tiny", "gpu", "gpu-sentinel")


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        # Fail, never skip: the manifests are shipped and must be checked.
        pytest.fail(
            "kubectl not found on PATH; it renders the kustomize overlays "
            "(install kubectl >= 1.27, which bundles kustomize v5)",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """overlay name -> (rendered YAML file, parsed objects)."""
    kubectl = _kubectl()
    out_dir = tmp_path_factory.mktemp("rendered")
    result = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(KUSTOMIZE_ROOT / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"kustomize {overlay} failed:\n{proc.stderr}"
        path = out_dir / f"{overlay}.yaml"
        path.write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert docs, f"overlay {overlay} rendered nothing"
        result[overlay] = (path, docs)
    return result

