"""One name per image: what the build produces is what compose runs and Kubernetes deploys.

The build is docker/compose.yaml's `build:` sections (docker/e2e.sh and the README
build through them); each gives the image a name and tag. Every image compose
runs that is ours must be one of those, every container in the rendered
kustomize overlays must be one of those under the one registry prefix, and the
tag is the project's version. No Docker engine needed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
OURS = "internvl-queue-"
DEV_ONLY = {"internvl-queue-s3-dev"}  # compose only, never deployed


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def built(compose) -> dict[str, str]:
    """image name:tag -> the Dockerfile that builds it."""
    out: dict[str, str] = {}
    for svc in compose["services"].values():
        if "build" in svc:
            assert svc["image"] not in out, f"{svc['image']} built twice"
            out[svc["image"]] = Path(svc["build"]["dockerfile"]).name
    return out


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_each_dockerfile_builds_one_image_tagged_with_the_project_version(built):
    assert sorted(built.values()) == ["Dockerfile", "Dockerfile.client", "Dockerfile.cpu", "Dockerfile.s3-dev"]
    for image, dockerfile in built.items():
        name, tag = image.rsplit(":", 1)
        assert name.startswith(OURS) and tag == version(), image
        # The build command in the Dockerfile's own header names the same image.
        header = (DOCKER / dockerfile).read_text()
        assert f"-t {image}" in header, f"{dockerfile} documents another name than {image}"


def test_every_image_of_ours_that_compose_runs_is_built_by_it(compose, built):
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if image.startswith(OURS):
            assert image in built, f"service {name} runs {image}, which nothing builds"


def _containers(docs):
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield doc["metadata"]["name"], c


def test_kubernetes_deploys_the_images_the_build_produces(rendered, built):
    deployable = {image for image in built if image.rsplit(":", 1)[0] not in DEV_ONLY}
    for overlay, (_, docs) in rendered.items():
        prefixes = set()
        used = {}
        for deployment, container in _containers(docs):
            image = container["image"]
            prefix, _, local = image.rpartition("/")
            assert local in deployable, f"{overlay}: {deployment} runs {image}; the build makes {sorted(deployable)}"
            prefixes.add(prefix)
            used[deployment] = local
        assert len(prefixes) == 1, f"{overlay}: one registry for every image, got {prefixes}"
        worker = {"gpu": "internvl-queue-worker", "gpu-sentinel": "internvl-queue-worker",
                  "cpu-tiny": "internvl-queue-worker-cpu"}[overlay]
        assert used["internvl-queue-worker"] == f"{worker}:{version()}"
        assert used["internvl-queue-api"] == used["internvl-queue-callbacks"] == f"internvl-queue-client:{version()}"


def test_compose_and_kubernetes_pick_the_same_worker_image_per_accelerator(compose):
    s = compose["services"]
    assert s["worker"]["image"].startswith("internvl-queue-worker:") and "gpu" in s["worker"]["profiles"]
    assert s["worker-cpu"]["image"].startswith("internvl-queue-worker-cpu:") and "cpu" in s["worker-cpu"]["profiles"]
    overlay = (REPO / "deploy" / "kubernetes" / "overlays" / "cpu-tiny" / "worker-cpu.yaml").read_text()
    assert re.search(r"image: internvl-queue-worker-cpu\b", overlay)
