"""KEDA and Prometheus Operator objects against their documented fields.

kubernetes-validate has no schema for custom resources, so the allowed fields
are written out here from KEDA's ScaledObject/TriggerAuthentication reference
and its Redis Lists and Redis Lists (Sentinel) scaler pages (v2.15+), and from
the PodMonitor API.
"""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from api_client.keys import WAITING

REQ, OPT = "required", "optional"
SCALED_OBJECT_SPEC = {
    "scaleTargetRef": (REQ, {"name": REQ, "apiVersion": OPT, "kind": OPT, "envSourceContainerName": OPT}),
    "pollingInterval": (OPT, None),
    "cooldownPeriod": (OPT, None),
    "initialCooldownPeriod": (OPT, None),
    "idleReplicaCount": (OPT, None),
    "minReplicaCount": (OPT, None),
    "maxReplicaCount": (OPT, None),
    "fallback": (OPT, {"failureThreshold": REQ, "replicas": REQ}),
    "advanced": (OPT, {"restoreToOriginalReplicaCount": OPT, "horizontalPodAutoscalerConfig": OPT,
                       "scalingModifiers": OPT}),
    "triggers": (REQ, None),
}
HPA_CONFIG = {"name": OPT, "behavior": OPT}
SCALING_MODIFIERS = {"formula": REQ, "target": REQ, "activationTarget": OPT, "metricType": OPT}
TRIGGER = {
    "type": REQ, "metadata": REQ, "name": OPT, "useCachedMetrics": OPT, "authenticationRef": OPT, "metricType": OPT,
}
AUTH_REF = {"name": REQ, "kind": OPT}
REDIS_METADATA = {
    "listName": REQ, "listLength": REQ, "activationListLength": OPT,
    "address": OPT, "host": OPT, "port": OPT, "addressFromEnv": OPT, "hostFromEnv": OPT, "portFromEnv": OPT,
    "usernameFromEnv": OPT, "passwordFromEnv": OPT, "enableTLS": OPT, "unsafeSsl": OPT, "databaseIndex": OPT,
}  # fmt: skip
REDIS_SENTINEL_METADATA = {
    "listName": REQ, "listLength": REQ, "activationListLength": OPT,
    "addresses": OPT, "hosts": OPT, "ports": OPT, "addressesFromEnv": OPT, "hostsFromEnv": OPT, "portsFromEnv": OPT,
    "sentinelMaster": OPT, "sentinelMasterFromEnv": OPT, "usernameFromEnv": OPT, "passwordFromEnv": OPT,
    "sentinelUsernameFromEnv": OPT, "sentinelPasswordFromEnv": OPT, "enableTLS": OPT, "unsafeSsl": OPT,
    "databaseIndex": OPT,
}  # fmt: skip
REDIS_TRIGGERS = {"redis": REDIS_METADATA, "redis-sentinel": REDIS_SENTINEL_METADATA}
PROMETHEUS_METADATA = {
    "serverAddress": REQ, "query": REQ, "threshold": REQ, "activationThreshold": OPT, "queryParameters": OPT,
    "namespace": OPT, "customHeaders": OPT, "ignoreNullValues": OPT, "unsafeSsl": OPT, "authModes": OPT,
}  # fmt: skip
REDIS_AUTH_PARAMETERS = {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key", "keyPassword",
                         "addresses", "hosts", "ports", "sentinelMaster", "sentinelUsername", "sentinelPassword"}
TRIGGER_AUTH_SPEC = {
    "podIdentity", "secretTargetRef", "env", "hashiCorpVault", "azureKeyVault", "awsSecretManager", "gcpSecretManager",
}
SECRET_TARGET_REF = {"parameter": REQ, "name": REQ, "key": REQ}
POD_MONITOR_SPEC = {
    "selector": REQ, "podMetricsEndpoints": REQ, "namespaceSelector": OPT, "jobLabel": OPT, "podTargetLabels": OPT,
    "sampleLimit": OPT,
}
POD_METRICS_ENDPOINT = {
    "port": OPT, "path": OPT, "interval": OPT, "scrapeTimeout": OPT, "scheme": OPT, "honorLabels": OPT,
    "relabelings": OPT, "metricRelabelings": OPT,
}


def check_fields(obj: dict, allowed: dict, where: str) -> None:
    unknown = set(obj) - set(allowed)
    assert not unknown, f"{where}: fields not in the documented spec: {sorted(unknown)}"
    for field, rule in allowed.items():
        rule = rule[0] if isinstance(rule, tuple) else rule
        if rule == REQ:
            assert field in obj, f"{where}: required field {field} missing"


def scaled_objects(docs):
    return [d for d in docs if d["kind"] == "ScaledObject"]


def only(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_check_fields_rejects_a_misspelt_field():
    with pytest.raises(AssertionError, match="listLenght"):
        check_fields({"listName": "x", "listLength": "1", "listLenght": "1"}, REDIS_METADATA, "t")


def test_scaled_object_uses_only_documented_fields(rendered):
    for overlay, (_, docs) in rendered.items():
        so = only(docs, "ScaledObject")
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        check_fields(spec, SCALED_OBJECT_SPEC, f"{overlay} spec")
        check_fields(spec["scaleTargetRef"], SCALED_OBJECT_SPEC["scaleTargetRef"][1], "scaleTargetRef")
        check_fields(spec["advanced"], SCALED_OBJECT_SPEC["advanced"][1], "advanced")
        check_fields(spec["advanced"]["horizontalPodAutoscalerConfig"], HPA_CONFIG, "hpaConfig")
        check_fields(spec["advanced"]["scalingModifiers"], SCALING_MODIFIERS, "scalingModifiers")
        for trig in spec["triggers"]:
            check_fields(trig, TRIGGER, f"trigger {trig.get('name')}")
            meta = trig["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
            if trig["type"] == "prometheus":
                check_fields(meta, PROMETHEUS_METADATA, f"prometheus {trig['name']}")
                continue
            assert trig["type"] in REDIS_TRIGGERS, trig["type"]
            check_fields(meta, REDIS_TRIGGERS[trig["type"]], f"{trig['type']} {trig['name']}")
            check_fields(trig["authenticationRef"], AUTH_REF, "authenticationRef")
            assert {"address", "host", "addressFromEnv", "hostFromEnv", "addresses", "hosts", "addressesFromEnv",
                    "hostsFromEnv"} & set(meta), "no Redis address"
            if trig["type"] == "redis-sentinel":
                assert {"sentinelMaster", "sentinelMasterFromEnv"} & set(meta), "no Sentinel master name"


def test_hpa_behavior_is_a_valid_autoscaling_v2_behavior(rendered):
    for _, docs in rendered.values():
        behavior = only(docs, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "probe"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"}, "maxReplicas": 2,
                     "behavior": behavior},
        }
        kubernetes_validate.validate(hpa, "1.30.0", strict=True)
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 120  # no flapping pod kills mid-burst
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


def test_the_waiting_set_and_the_jobs_in_flight_are_summed(rendered):
    for overlay, (_, docs) in rendered.items():
        spec = only(docs, "ScaledObject")["spec"]
        redis = [t for t in spec["triggers"] if t["type"] in REDIS_TRIGGERS]
        assert [t["metadata"]["listName"] for t in redis] == [WAITING], overlay  # one key: every job that waits
        kind = "redis-sentinel" if overlay.endswith("-sentinel") else "redis"
        assert [t["type"] for t in redis] == [kind], overlay
        (in_flight,) = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        assert "ivq_jobs_in_flight" in in_flight["metadata"]["query"]
        formula = spec["advanced"]["scalingModifiers"]["formula"]
        assert set(re.findall(r"[A-Za-z_]\w*", formula)) == {t["name"] for t in spec["triggers"]}
        assert set(formula.replace(" ", "")) - set("abcdefghijklmnopqrstuvwxyz_0123456789") == {"+"}  # a sum
        target = spec["advanced"]["scalingModifiers"]["target"]
        assert all(t["metadata"]["listLength"] == target for t in redis)
        assert in_flight["metadata"]["threshold"] == target
        assert float(target) >= 1


def test_scale_to_zero_settings(rendered):
    for _, docs in rendered.values():
        spec = only(docs, "ScaledObject")["spec"]
        assert spec["minReplicaCount"] == 0
        assert spec["maxReplicaCount"] >= 1
        # A backlog at or below the activation value would wait with no pod at all.
        assert spec["advanced"]["scalingModifiers"]["activationTarget"] == "0"
        for t in spec["triggers"]:
            assert t["metadata"].get("activationListLength", t["metadata"].get("activationThreshold")) == "0"
        assert spec["cooldownPeriod"] >= spec["pollingInterval"]


def test_scaler_wiring_resolves(rendered):
    for overlay, (_, docs) in rendered.items():
        spec = only(docs, "ScaledObject")["spec"]
        deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        target = deployments[spec["scaleTargetRef"]["name"]]
        containers = {c["name"]: c for c in target["spec"]["template"]["spec"]["containers"]}
        container = containers[spec["scaleTargetRef"]["envSourceContainerName"]]
        config = next(d for d in docs if d["kind"] == "ConfigMap")
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
        for trig in (t for t in spec["triggers"] if t["type"] in REDIS_TRIGGERS):
            from_env = [v for k, v in trig["metadata"].items() if k.endswith("FromEnv")]
            assert from_env and all(name in config["data"] for name in from_env), overlay
            auth_name = trig["authenticationRef"]["name"]
            auth = [d for d in docs if d["kind"] == "TriggerAuthentication" and d["metadata"]["name"] == auth_name]
            assert len(auth) == 1, overlay


def test_trigger_authentication_reads_the_password_from_a_secret(rendered):
    for _, docs in rendered.values():
        auth = only(docs, "TriggerAuthentication")
        assert set(auth["spec"]) <= TRIGGER_AUTH_SPEC
        refs = auth["spec"]["secretTargetRef"]
        for ref in refs:
            check_fields(ref, SECRET_TARGET_REF, "secretTargetRef")
            assert ref["parameter"] in REDIS_AUTH_PARAMETERS
        # Its own Redis user (ivq-keda): with the default user off, a password alone is refused.
        assert {"username", "password"} <= {r["parameter"] for r in refs}
        assert {r["name"] for r in refs} == {"internvl-queue-redis"}


def test_pod_monitor_scrapes_every_deployment(rendered):
    for _, docs in rendered.values():
        pm = only(docs, "PodMonitor")
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        check_fields(pm["spec"], POD_MONITOR_SPEC, "PodMonitor")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            check_fields(ep, POD_METRICS_ENDPOINT, "podMetricsEndpoint")
            assert ep["path"] == "/metrics"
        selector = pm["spec"]["selector"]["matchLabels"]
        endpoint_ports = {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]}
        exposed = set()
        for dep in (d for d in docs if d["kind"] == "Deployment"):
            template = dep["spec"]["template"]
            assert selector.items() <= template["metadata"]["labels"].items(), dep["metadata"]["name"]
            port_names = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
            # Workers serve /metrics on "metrics", the API on "http"; each pod on one of them.
            assert port_names & endpoint_ports, dep["metadata"]["name"]
            exposed |= port_names & endpoint_ports
        assert exposed == endpoint_ports, "an endpoint no Deployment serves"
