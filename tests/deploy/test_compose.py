"""docker/: compose.yaml and the Dockerfiles, checked structurally (no Docker engine here)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
CREDENTIAL = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|REDIS_URL|API_KEY\b", re.I)
# A credential may only be a ${VAR} reference whose fallback says it is a dev default.
DEV_DEFAULT = re.compile(r"\$\{[A-Z_]+:-(dev-only[\w-]*|\{\})\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_every_service_has_an_image_or_a_build(compose):
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker", "callbacks", "producer"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file(), name


def test_depends_on_targets_exist(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for target in deps if isinstance(deps, list) else deps.keys():
            assert target in services, f"{name} depends on missing {target}"
            assert target != name


def test_no_credential_literals_except_marked_dev_defaults(compose):
    checked = 0
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if CREDENTIAL.search(key) or CREDENTIAL.search(str(value)):
                checked += 1
                refs = re.findall(r"\$\{[^}]*\}\}?", str(value))
                assert refs and all(DEV_DEFAULT.fullmatch(r) for r in refs), f"{name}.{key}={value!r}"
        for arg in svc.get("command", []) if isinstance(svc.get("command"), list) else []:
            if arg.startswith("${"):
                assert DEV_DEFAULT.fullmatch(arg), f"{name} command literal {arg!r}"
    assert checked >= 5
    assert "DEV-ONLY" in (DOCKER / "compose.yaml").read_text()


def test_production_like_pieces(compose):
    s = compose["services"]
    assert "--appendonly" in s["redis"]["command"]
    assert s["redis"]["command"][s["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert "mc mb" in s["minio-init"]["command"][0]
    assert s["worker"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    (device,) = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert _env(s["worker"])["IVQ_QUEUES"] == "infer"
    assert _env(s["callbacks"])["IVQ_QUEUES"] == "callbacks"
    for name in ("worker", "callbacks", "api"):
        assert s[name]["read_only"] is True and s[name]["cap_drop"] == ["ALL"]
    assert (DOCKER / "samples" / "sample.png").read_bytes()[:4] == b"\x89PNG"


def test_api_service_serves_port_8000_from_the_client_image(compose):
    s = compose["services"]
    api = s["api"]
    assert api["image"] == s["callbacks"]["image"] != s["worker"]["image"], "CPU only: the client image"
    assert "build" not in api  # built once, by the callbacks service
    assert api["command"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert any(str(p).endswith(":8000:8000") or str(p) == "8000:8000" for p in api["ports"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8000/readyz" in " ".join(api["healthcheck"]["test"])
    env = _env(api)
    assert env["IVQ_REDIS_URL"] and env["IVQ_STORE_URL"]
    (config,) = api["configs"]
    assert config["target"] == env["IVQ_API_KEYS_FILE"]
    content = compose["configs"][config["source"]]["content"]
    dev_key = re.fullmatch(r"\$\{IVQ_API_KEY:-([\w-]+)\}", _env(s["producer"])["IVQ_API_KEY"]).group(1)
    keys = json.loads(re.sub(r"\$\{[A-Z0-9_]+:-([0-9a-f]{64})\}", r"\1", content))
    (tenant,) = keys["tenants"].values()
    assert tenant["keys"] == [{"sha256": hashlib.sha256(dev_key.encode()).hexdigest()}], "the dev key's hash"


def test_producers_talk_to_the_api_and_only_the_api_and_workers_reach_redis(compose):
    s = compose["services"]
    reach_redis = {name for name, svc in s.items() if "IVQ_REDIS_URL" in _env(svc)}
    assert reach_redis == {"api", "worker", "callbacks"}
    assert "ports" not in s["redis"]
    producer = s["producer"]
    assert _env(producer)["IVQ_API_URL"] == "http://api:8000"
    assert producer["depends_on"]["api"]["condition"] == "service_healthy"
    assert producer["entrypoint"] == ["python", "-c"]
    (script,) = producer["command"]
    compile(script, "producer", "exec")
    assert "HttpJobClient" in script and "internvl-queue submit" not in script


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.client"])
def test_dockerfiles_are_non_root_with_healthcheck_and_no_secrets(dockerfile):
    ins = _instructions(dockerfile)
    final_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and not users[-1].startswith(("0", "root")), dockerfile
    health = " ".join(arg for op, arg in final_stage if op == "HEALTHCHECK")
    assert "/healthz" in health and "9400" in health
    for op, arg in ins:
        if op in ("ENV", "ARG"):
            assert not CREDENTIAL.search(arg), f"{dockerfile}: {op} {arg}"
    assert any(op == "RUN" and "-c constraints.txt" in arg for op, arg in ins)
    assert (DOCKER / f"{dockerfile}.dockerignore").read_text().startswith("#")


def test_gpu_image_has_cuda_runtime_flash_attn_and_model_volume():
    ins = _instructions("Dockerfile")
    froms = [arg for op, arg in ins if op == "FROM"]
    assert froms[-1].startswith("nvidia/cuda:") and "runtime" in froms[-1]
    assert any("flash-attn" in arg for op, arg in ins if op == "RUN")
    assert any(op == "VOLUME" and "/models" in arg for op, arg in ins)
    client = " ".join(arg for op, arg in _instructions("Dockerfile.client") if op == "RUN")
    assert "torch" not in client.replace("'torch' not in", "") and ".[worker]" not in client
    assert '".[api]"' in client and "import api_client, worker.http.app" in client  # it runs `internvl-queue api`
