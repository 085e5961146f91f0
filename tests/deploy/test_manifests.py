"""The rendered Kubernetes manifests: schema-valid, policy-clean (checkov) and hardened."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"  # oldest minor we support (sidecar-free, PSS restricted)
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}
CREDENTIAL_HINTS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "PRIVATE")


def looks_like_credential(name: str) -> bool:
    """A name with a credential hint; counts of model tokens (IVQ_*_TOKENS) are not credentials."""
    name = name.upper()
    if name.endswith("_TOKENS"):
        name = name[: -len("_TOKENS")]
    return any(h in name for h in CREDENTIAL_HINTS)


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, name):
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config_map(docs) -> dict[str, str]:
    maps = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("internvl-queue-config")]
    assert len(maps) == 1
    return maps[0]["data"]


def test_every_builtin_object_matches_the_kubernetes_schema(rendered):
    for overlay, (_, docs) in rendered.items():
        kinds = set()
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue  # checked against KEDA's/Prometheus Operator's fields in test_keda.py
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            kinds.add(doc["kind"])
        assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds, overlay


def test_the_schema_check_rejects_an_unknown_field():
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_checkov_kubernetes_checks_pass(rendered):
    if not CHECKOV.exists():
        pytest.fail(f"checkov not found at {CHECKOV.relative_to(REPO)}; run deploy/tools-venv.sh", pytrace=False)
    files = [str(path) for path, _ in rendered.values()]
    args = [str(CHECKOV), "--config-file", str(REPO / "deploy" / "checkov.yaml"), "-o", "json"]
    for f in files:
        args += ["-f", f]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100, summary  # it really looked at the Deployments


@pytest.mark.parametrize("deployment", ["internvl-queue-worker", "internvl-queue-callbacks"])
def test_pods_are_hardened_and_probed(rendered, deployment):
    for overlay, (_, docs) in rendered.items():
        dep = named(docs, "Deployment", deployment)
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (overlay, c["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], "writable /tmp must be an emptyDir"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] == "metrics", (overlay, probe)
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["lifecycle"]["preStop"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["metrics"] == int(config_map(docs)["IVQ_METRICS_PORT"])


def _effective_env(docs, container) -> dict[str, str]:
    # Explicit env entries win over envFrom, as in the kubelet.
    env = dict(config_map(docs))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _prestop_seconds(container) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_grace_period_outlasts_prestop_plus_drain(rendered):
    for overlay, (_, docs) in rendered.items():
        for dep in of_kind(docs, "Deployment"):
            pod = dep["spec"]["template"]["spec"]
            drain = max(_effective_env(docs, c)["IVQ_DRAIN_TIMEOUT_S"] for c in pod["containers"])
            drain = int(drain)
            prestop = max(_prestop_seconds(c) for c in pod["containers"])
            grace = pod["terminationGracePeriodSeconds"]
            assert grace > prestop + drain, (overlay, dep["metadata"]["name"], grace, prestop, drain)


def test_startup_probe_allows_for_model_load(rendered):
    minimum = {"cpu-tiny": 120, "gpu": 600}  # seconds before the kubelet gives up
    for overlay, (_, docs) in rendered.items():
        c = named(docs, "Deployment", "internvl-queue-worker")["spec"]["template"]["spec"]["containers"][0]
        probe = c["startupProbe"]
        assert probe["httpGet"]["path"] == "/readyz"  # ready = loaded + warmed up + broker reachable
        assert probe["periodSeconds"] * probe["failureThreshold"] >= minimum[overlay]


def test_every_container_has_requests_and_memory_limits(rendered):
    for overlay, (_, docs) in rendered.items():
        for dep in of_kind(docs, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                res = c["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]), (overlay, c["name"])
                assert "memory" in res["limits"], (overlay, c["name"])


def test_token_counts_are_not_credentials_but_tokens_are():
    assert not looks_like_credential("IVQ_PREFILL_CHUNK_TOKENS")
    assert looks_like_credential("API_TOKEN") and looks_like_credential("IVQ_TOKEN_SECRET")


def test_no_credentials_in_configmaps(rendered):
    for overlay, (_, docs) in rendered.items():
        for cm in of_kind(docs, "ConfigMap"):
            for key, value in cm.get("data", {}).items():
                assert not looks_like_credential(key), (overlay, key)
                assert "whsec_" not in value and "@" not in value, (overlay, key)
        for dep in of_kind(docs, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    if looks_like_credential(env["name"]) or env["name"] == "IVQ_REDIS_URL":
                        assert "secretKeyRef" in env.get("valueFrom", {}), (overlay, env["name"])
        assert not of_kind(docs, "Secret"), "Secrets are created out of band, never committed"


def test_secrets_referenced_are_documented(rendered):
    operations = (REPO / "deploy" / "OPERATIONS.md").read_text()
    for _, docs in rendered.values():
        for dep in of_kind(docs, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in operations and ref["key"] in operations, ref


def test_gpu_overlay_runs_one_gpu_per_pod_on_gpu_nodes(rendered):
    _, docs = rendered["gpu"]
    pod = named(docs, "Deployment", "internvl-queue-worker")["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert config_map(docs)["IVQ_MODEL"] == "OpenGVLab/InternVL3-1B-hf"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes["model-cache"]
    named(docs, "PersistentVolumeClaim", volumes["model-cache"]["persistentVolumeClaim"]["claimName"])
    callbacks = named(docs, "Deployment", "internvl-queue-callbacks")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in callbacks["containers"][0]["resources"].get("limits", {})


def test_cpu_tiny_overlay_has_no_gpu(rendered):
    _, docs = rendered["cpu-tiny"]
    assert config_map(docs)["IVQ_MODEL"] == "tiny"
    assert "nvidia.com/gpu" not in json.dumps(docs)


def test_queues_are_split_between_deployments(rendered):
    for _, docs in rendered.values():
        queues = {}
        for dep in of_kind(docs, "Deployment"):
            env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
            queues[dep["metadata"]["name"]] = env["IVQ_QUEUES"]
        assert queues == {"internvl-queue-worker": "infer", "internvl-queue-callbacks": "callbacks"}


def test_network_policies_limit_traffic(rendered):
    _, docs = rendered["gpu"]
    named(docs, "NetworkPolicy", "default-deny")
    worker = named(docs, "NetworkPolicy", "internvl-queue-worker")["spec"]
    egress_ports = {p["port"] for rule in worker["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 6379, 9000, 443}
    (ingress,) = worker["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [9400]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    for rule in worker["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]  # never the metadata service


def test_pdb_allows_drain_of_a_fleet_at_zero(rendered):
    _, docs = rendered["gpu"]
    pdb = named(docs, "PodDisruptionBudget", "internvl-queue-worker")["spec"]
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    dep = named(docs, "Deployment", "internvl-queue-worker")
    assert pdb["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert "replicas" not in dep["spec"], "KEDA owns the worker replica count"
