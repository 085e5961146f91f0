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


def worker_deployments(docs):
    """The Deployments that run `internvl-queue worker` (inference and callbacks), not the API."""
    return [d for d in of_kind(docs, "Deployment")
            if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"]


def matches(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


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
        assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Service",
                "HorizontalPodAutoscaler"} <= kinds, overlay


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
        api = named(docs, "Deployment", "internvl-queue-api")["spec"]["template"]["spec"]
        assert api["terminationGracePeriodSeconds"] > _prestop_seconds(api["containers"][0]) + 10, overlay
        for dep in worker_deployments(docs):
            pod = dep["spec"]["template"]["spec"]
            drain = max(_effective_env(docs, c)["IVQ_DRAIN_TIMEOUT_S"] for c in pod["containers"])
            drain = int(drain)
            prestop = max(_prestop_seconds(c) for c in pod["containers"])
            grace = pod["terminationGracePeriodSeconds"]
            assert grace > prestop + drain, (overlay, dep["metadata"]["name"], grace, prestop, drain)


def test_startup_probe_allows_for_model_load(rendered):
    minimum = {"cpu-tiny": 120, "gpu": 600, "gpu-sentinel": 600}  # seconds before the kubelet gives up
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
            for volume in dep["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in operations, volume
                    assert all(item["key"] in operations for item in volume["secret"]["items"]), volume
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
        for dep in worker_deployments(docs):
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


API = "internvl-queue-api"


def test_api_deployment_runs_the_api_hardened_probed_and_bounded(rendered):
    for overlay, (_, docs) in rendered.items():
        dep = named(docs, "Deployment", API)
        assert "replicas" not in dep["spec"], "the HPA owns the API replica count"
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        assert [c["command"][0], *c["args"]] == ["internvl-queue", "api", "--host", "0.0.0.0", "--port", "8000"]
        callbacks = named(docs, "Deployment", "internvl-queue-callbacks")["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == callbacks["image"] and "worker" not in c["image"], "CPU only: the client image"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, overlay
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, overlay
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), overlay
        assert {"configMapRef": {"name": config_map_name(docs)}} in c["envFrom"]
        env = {e["name"]: e for e in c["env"]}
        assert env["IVQ_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "internvl-queue-redis-api"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        keys_mount = mounts["/etc/internvl-queue"]
        assert keys_mount["readOnly"] is True and "subPath" not in keys_mount  # subPath never sees an update
        secret = volumes[keys_mount["name"]]["secret"]
        assert secret["secretName"] == "internvl-queue-api-keys"
        (item,) = secret["items"]
        assert env["IVQ_API_KEYS_FILE"]["value"] == f"/etc/internvl-queue/{item['path']}"


def config_map_name(docs) -> str:
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("internvl-queue-config")]
    return cm["metadata"]["name"]


def test_api_service_hpa_and_pdb_target_the_api_pods(rendered):
    for overlay, (_, docs) in rendered.items():
        template = named(docs, "Deployment", API)["spec"]["template"]
        labels = template["metadata"]["labels"]
        svc = named(docs, "Service", API)["spec"]
        assert svc["type"] == "ClusterIP" and svc["selector"].items() <= labels.items(), overlay
        (port,) = svc["ports"]
        assert port["port"] == 8000 and port["targetPort"] == "http"
        hpa = named(docs, "HorizontalPodAutoscaler", API)
        assert hpa["apiVersion"] == "autoscaling/v2"
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
        assert spec["minReplicas"] == 2 and spec["maxReplicas"] > spec["minReplicas"]
        ((metric),) = spec["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"  # of the request, which is set
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 120
        pdb = named(docs, "PodDisruptionBudget", API)["spec"]
        assert matches(pdb["selector"], labels)
        assert 1 <= pdb["minAvailable"] < spec["minReplicas"], "one pod may go, one always stays"


def test_every_object_is_in_the_service_namespace_but_the_redis_policy(rendered):
    for overlay, (_, docs) in rendered.items():
        for doc in docs:
            if doc["kind"] == "Namespace":
                continue
            expected = "redis" if doc["metadata"]["name"] == "internvl-queue-redis-clients" else "internvl-queue"
            assert doc["metadata"].get("namespace") == expected, (overlay, doc["kind"], doc["metadata"]["name"])


def _peers(rule: dict) -> list[dict]:
    return rule.get("from", rule.get("to", []))


def _ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_api_policy_admits_producers_and_monitoring_on_8000_only(rendered):
    _, docs = rendered["gpu"]
    api = named(docs, "NetworkPolicy", API)["spec"]
    assert matches(api["podSelector"], named(docs, "Deployment", API)["spec"]["template"]["metadata"]["labels"])
    assert all(_ports(rule) == {8000} for rule in api["ingress"])
    sources = [peer for rule in api["ingress"] for peer in _peers(rule)]
    assert sources == [{"namespaceSelector": {"matchLabels": {"internvl-queue/producer": "true"}}},
                       {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {port for rule in api["egress"] for port in _ports(rule)} == {53, 6379, 9000, 443}
    for rule in api["egress"]:
        for peer in _peers(rule):
            if "ipBlock" in peer:
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]


def test_redis_ingress_admits_exactly_the_api_worker_and_callbacks_pods(rendered):
    for overlay, (_, docs) in rendered.items():
        policy = named(docs, "NetworkPolicy", "internvl-queue-redis-clients")
        spec = policy["spec"]
        assert policy["metadata"]["namespace"] == "redis" and spec["policyTypes"] == ["Ingress"]
        # The same Redis pods the clients' egress rules name.
        egress_peers = [peer for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "internvl-queue"
                        for rule in p["spec"].get("egress", []) if 6379 in _ports(rule) for peer in _peers(rule)]
        assert egress_peers and all(peer["podSelector"] == spec["podSelector"] for peer in egress_peers)
        redis_rules = [rule for rule in spec["ingress"] if 6379 in _ports(rule)]
        # Redis, and behind Sentinel the sentinels too: the same ports out of our pods as into Redis's.
        ports = {6379, 26379} if overlay.endswith("-sentinel") else {6379}
        assert [_ports(rule) for rule in redis_rules] == [ports], overlay
        assert all(_ports(rule) == ports for p in of_kind(docs, "NetworkPolicy")
                   if p["metadata"]["namespace"] == "internvl-queue"
                   for rule in p["spec"].get("egress", []) if 6379 in _ports(rule)), overlay
        ours, keda = _peers(redis_rules[0])
        assert ours["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "internvl-queue"}
        admitted = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")
                    if matches(ours["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
        assert admitted == {API, "internvl-queue-worker", "internvl-queue-callbacks"}, overlay
        assert keda == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}}
        # The rest: Redis's own namespace (replicas, Sentinel) and the exporter from monitoring.
        others = [rule for rule in spec["ingress"] if 6379 not in _ports(rule)]
        assert others == [
            {"from": [{"podSelector": {}}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
             "ports": [{"port": 9121, "protocol": "TCP"}]},
        ], overlay
        # And only those Deployments may send to Redis from our namespace.
        senders = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")
                   if any(matches(p["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"])
                          and any(6379 in _ports(rule) for rule in p["spec"].get("egress", []))
                          for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["namespace"] == "internvl-queue")}
        assert senders == admitted
