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
    assert {"redis", "minio", "minio-init", "api", "worker", "callbacks", "producer",
            "s3-dev", "s3-dev-init", "worker-cpu"} <= set(services)
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
            # A service outside a profile may only wait on a profile's service if it is optional.
            if not svc.get("profiles") and services[target].get("profiles"):
                assert deps[target].get("required") is False, f"{name} needs {target} in every profile"


def test_profiles_cpu_and_gpu_each_run_the_whole_path(compose):
    services = compose["services"]
    common = {n for n, svc in services.items() if not svc.get("profiles")}
    assert common == {"redis", "api", "callbacks", "producer"}
    by_profile = {p: common | {n for n, svc in services.items() if p in svc.get("profiles", [])}
                  for p in ("cpu", "gpu")}
    assert by_profile["gpu"] - common == {"minio", "minio-init", "worker"}
    assert by_profile["cpu"] - common == {"s3-dev", "s3-dev-init", "worker-cpu"}
    for profile, names in by_profile.items():
        # Exactly one S3 answers as "s3", the endpoint every service is given.
        s3 = [n for n in names if "s3" in services[n].get("networks", {}).get("default", {}).get("aliases", [])]
        assert len(s3) == 1, (profile, s3)
        workers = [n for n in names if _env(services[n]).get("IVQ_QUEUES") == "infer"]
        assert len(workers) == 1, (profile, workers)
    for name in ("api", "callbacks", "worker", "worker-cpu"):
        assert _env(services[name])["IVQ_S3_ENDPOINT_URL"] == "http://s3:9000"
    assert "DEV-ONLY" in (DOCKER / "Dockerfile.s3-dev").read_text()


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, duration
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_stop_grace_period_fits_the_drain(compose, name):
    svc = compose["services"][name]
    drain = int(_env(svc)["IVQ_DRAIN_TIMEOUT_S"])
    # The drain, the worker's own 5 s watchdog past it, and time for the final writes.
    assert _seconds(svc["stop_grace_period"]) >= drain + 10


def test_cpu_worker_serves_the_tiny_model_without_a_gpu(compose):
    svc = compose["services"]["worker-cpu"]
    assert "deploy" not in svc
    assert _env(svc)["IVQ_MODEL"] == "${IVQ_MODEL:-tiny}"
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu"


def test_no_credential_literals_except_marked_dev_defaults(compose):
    checked = 0
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if CREDENTIAL.search(key) or CREDENTIAL.search(str(value)):
                checked += 1
                refs = re.findall(r"\$\{[^}]*\}\}?", str(value))
                # Every credential is a dev default; a host or a scheme around it may be any variable.
                assert any(DEV_DEFAULT.fullmatch(r) for r in refs), f"{name}.{key}={value!r}"
                assert all(DEV_DEFAULT.fullmatch(r) or not _is_secret(r) for r in refs), f"{name}.{key}={value!r}"
        for arg in svc.get("command", []) if isinstance(svc.get("command"), list) else []:
            if arg.startswith("${") and _is_secret(arg):
                assert DEV_DEFAULT.fullmatch(arg), f"{name} command literal {arg!r}"
    assert checked >= 5
    assert "DEV-ONLY" in (DOCKER / "compose.yaml").read_text()


def _is_secret(ref: str) -> bool:
    """A ${VAR...} reference to a credential (a password, a key; not a host or a scheme)."""
    return bool(CREDENTIAL.search(ref.split(":-")[0]))


def test_profile_failover_runs_a_primary_a_replica_and_three_sentinels(compose):
    from api_client.redis_conn import broker_url, parse_url

    s = compose["services"]
    failover = {n for n, svc in s.items() if "failover" in svc.get("profiles", [])}
    assert failover == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = s["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:replica.index("--replicaof") + 3] == ["redis", "6379"]
    for node in ("redis", "redis-replica"):  # either may be the primary after a failover
        cmd = s[node]["command"]
        for flag in ("--masterauth", "--requirepass", "--min-replicas-to-write", "--appendonly"):
            assert flag in cmd, (node, flag)
    sentinels = [s[f"sentinel-{i}"]["command"][0] for i in (1, 2, 3)]
    assert all(c == sentinels[0] for c in sentinels)
    assert "'sentinel monitor ivq redis 6379 2'" in sentinels[0] and "--sentinel" in sentinels[0]
    assert "sentinel auth-pass ivq" in sentinels[0] and "requirepass" in sentinels[0]
    # The URL every service gets, with the variables the header documents for this profile.
    url = _env(s["api"])["IVQ_REDIS_URL"]
    sentinels = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/ivq/0"
    filled = (url.replace("${IVQ_REDIS_SCHEME:-redis}", "redis+sentinel")
              .replace("${REDIS_PASSWORD:-dev-only-redis-password}", "pw")
              .replace("${IVQ_REDIS_ADDRESS:-redis:6379/0}", sentinels))
    target = parse_url(filled)
    assert (target.service, target.password, len(target.sentinels)) == ("ivq", "pw", 3)
    assert broker_url(filled).count("sentinel://:pw@") == 3
    assert "IVQ_REDIS_SCHEME=redis+sentinel IVQ_REDIS_ADDRESS=sentinel-1:26379" in (DOCKER / "compose.yaml").read_text()
    plain = (url.replace("${IVQ_REDIS_SCHEME:-redis}", "redis")
             .replace("${REDIS_PASSWORD:-dev-only-redis-password}", "pw")
             .replace("${IVQ_REDIS_ADDRESS:-redis:6379/0}", "redis:6379/0"))
    assert plain == "redis://:pw@redis:6379/0"  # without the variables: the single Redis, as before


def test_production_like_pieces(compose):
    s = compose["services"]
    assert "--appendonly" in s["redis"]["command"]
    assert s["redis"]["command"][s["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert "mc mb" in s["minio-init"]["command"][0]
    assert "create_bucket" in s["s3-dev-init"]["command"][0]
    assert s["worker"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert s["worker-cpu"]["depends_on"]["s3-dev-init"]["condition"] == "service_completed_successfully"
    (device,) = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert _env(s["worker"])["IVQ_QUEUES"] == "infer"
    assert _env(s["callbacks"])["IVQ_QUEUES"] == "callbacks"
    for name in ("worker", "worker-cpu", "callbacks", "api", "s3-dev", "producer"):
        assert s[name]["read_only"] is True and s[name]["cap_drop"] == ["ALL"], name
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
    # A file, not `content:`: Compose cannot copy content into a read-only root.
    keys_file = re.fullmatch(r"\$\{IVQ_API_KEYS_JSON:-(\S+)\}", compose["configs"][config["source"]]["file"]).group(1)
    dev_key = re.fullmatch(r"\$\{IVQ_API_KEY:-([\w-]+)\}", _env(s["producer"])["IVQ_API_KEY"]).group(1)
    keys = json.loads((DOCKER / keys_file).read_text())
    (tenant,) = keys["tenants"].values()
    assert tenant["keys"] == [{"sha256": hashlib.sha256(dev_key.encode()).hexdigest()}], "the dev key's hash"


def test_producers_talk_to_the_api_and_only_the_api_and_workers_reach_redis(compose):
    s = compose["services"]
    reach_redis = {name for name, svc in s.items() if "IVQ_REDIS_URL" in _env(svc)}
    assert reach_redis == {"api", "worker", "worker-cpu", "callbacks"}
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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu", "Dockerfile.client"])
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
    args = dict(arg.split("=", 1) for op, arg in ins if op == "ARG" and "=" in arg)
    froms = [arg for op, arg in ins if op == "FROM"]
    assert froms[-1] == "${CUDA_RUNTIME_IMAGE} AS runtime"
    assert args["CUDA_RUNTIME_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_RUNTIME_IMAGE"]
    assert args["CUDA_DEVEL_IMAGE"].startswith("nvidia/cuda:") and "devel" in args["CUDA_DEVEL_IMAGE"]
    flash = " ".join(arg for op, arg in ins if op == "RUN" and "FLASH_ATTN_WHEEL" in arg)
    assert "pip wheel" in flash and "flash-attn==" in flash, "compiling stays the fallback"
    assert "https://*" in flash and "/wheelhouse/" in flash and "none)" in flash, "a prebuilt wheel: URL or file"
    assert any(op == "VOLUME" and "/models" in arg for op, arg in ins)
    client = " ".join(arg for op, arg in _instructions("Dockerfile.client") if op == "RUN")
    assert "torch" not in client.replace("'torch' not in", "") and ".[worker]" not in client
    assert '".[api]"' in client and "import api_client, worker.http.app" in client  # it runs `internvl-queue api`


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu", "Dockerfile.client", "Dockerfile.s3-dev"])
def test_base_images_are_build_arguments_defaulting_to_public_images(dockerfile):
    ins = _instructions(dockerfile)
    args = dict(arg.split("=", 1) for op, arg in ins if op == "ARG" and "=" in arg)
    for op, arg in ins:
        if op == "FROM":
            base = arg.split()[0]
            if base == "build":  # a stage of this file
                continue
            m = re.fullmatch(r"\$\{(\w+)\}", base)
            assert m, f"{dockerfile}: FROM {base} is not a build argument"
            default = args[m.group(1)]
            assert "/" in default or ":" in default, f"{dockerfile}: {m.group(1)} has no public default"
    if dockerfile != "Dockerfile":
        assert args["PYTHON_IMAGE"] == "python:3.11-slim"


def _final_stage(dockerfile: str) -> list[tuple[str, str]]:
    ins = _instructions(dockerfile)
    return ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]


def test_cpu_and_gpu_worker_images_are_run_alike():
    """Entrypoint, command, user, health check command, stop signal, volume, port: the same."""
    def run_shape(dockerfile: str) -> dict[str, object]:
        stage = _final_stage(dockerfile)
        health = next(arg for op, arg in stage if op == "HEALTHCHECK")
        env = " ".join(arg for op, arg in stage if op == "ENV")
        return {
            "entrypoint": [arg for op, arg in stage if op == "ENTRYPOINT"],
            "cmd": [arg for op, arg in stage if op == "CMD"],
            "user": [arg for op, arg in stage if op == "USER"],
            "stopsignal": [arg for op, arg in stage if op == "STOPSIGNAL"],
            "volume": [arg for op, arg in stage if op == "VOLUME"],
            "expose": [arg for op, arg in stage if op == "EXPOSE"],
            "health_cmd": health[health.index("CMD") :],
            "env": sorted(set(re.findall(r"(\w+)=", env)) - {"DEBIAN_FRONTEND"}),  # build-time only
        }

    gpu, cpu = run_shape("Dockerfile"), run_shape("Dockerfile.cpu")
    assert cpu["env"] == sorted({*gpu["env"], "IVQ_MODEL"})  # the CPU image names its default model
    for key in gpu:
        if key != "env":
            assert cpu[key] == gpu[key], key
    cpu_ins = _instructions("Dockerfile.cpu")
    assert any(op == "RUN" and "ensure_tiny('/models')" in arg for op, arg in cpu_ins), "the tiny model built in"
    assert any(op == "ARG" and arg.startswith("TORCH_INDEX_URL=") and arg.endswith("/cpu") for op, arg in cpu_ins)
