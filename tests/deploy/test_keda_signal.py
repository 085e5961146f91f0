"""The ScaledObject's formula, evaluated against a real Redis holding batch backlogs.

Each redis trigger of the rendered ScaledObject is read the way KEDA reads it (its
length script: ZCARD for a sorted set, LLEN for a list), the prometheus trigger (jobs
in flight) is 0 since no worker runs, and the formula and the HPA's rule give the
replicas asked for. The same Redis read by the triggers the ScaledObject had before
(the four broker lists) shows what they missed: a tenant's batch reaches the lists
only one lane (`lane_jobs`) at a time.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
import time

import pytest
import yaml

from api_client import keys
from api_client.dispatch import Dispatcher, producer_app
from api_client.jobstate import JobStore
from api_client.lanes import Lanes
from tests.deploy.conftest import KUSTOMIZE_ROOT

# KEDA v2.17 pkg/scalers/redis_scaler.go: how the redis, redis-cluster and redis-sentinel
# scalers take a key's length, whatever its type.
KEDA_LENGTH_SCRIPT = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[listType], listName)
"""
REQUEST = '{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}'


def replicas_asked(spec: dict, client, in_flight: int = 0) -> tuple[int, int]:
    """(the composite metric, the replicas KEDA and the HPA ask for) from the triggers' values now."""
    values = {}
    for trig in spec["triggers"]:
        if trig["type"] in ("redis", "redis-sentinel"):
            values[trig["name"]] = int(client.eval(KEDA_LENGTH_SCRIPT, 1, trig["metadata"]["listName"]))
        else:
            assert trig["type"] == "prometheus"
            values[trig["name"]] = in_flight
    mods = spec["advanced"]["scalingModifiers"]
    names = re.findall(r"[A-Za-z_]\w*", mods["formula"])
    assert set(mods["formula"].replace(" ", "")) - set("abcdefghijklmnopqrstuvwxyz_0123456789") <= {"+"}
    total = sum(values[n] for n in names)
    if total <= float(mods["activationTarget"]):
        return total, spec["minReplicaCount"]
    wanted = math.ceil(total / float(mods["target"]))
    return total, min(spec["maxReplicaCount"], max(1, spec["minReplicaCount"], wanted))


def on_broker_lists(spec: dict) -> dict:
    """The ScaledObject as it was: one redis trigger per broker list, summed with the jobs in flight."""
    old = copy.deepcopy(spec)
    (redis_trigger,) = [t for t in old["triggers"] if t["type"].startswith("redis")]
    lists = []
    for i, name in enumerate(keys.infer_queue_lists()):
        trig = copy.deepcopy(redis_trigger)
        trig["name"], trig["metadata"]["listName"] = f"infer_{i}", name
        lists.append(trig)
    old["triggers"] = lists + [t for t in old["triggers"] if t is not redis_trigger]
    old["advanced"]["scalingModifiers"]["formula"] = " + ".join(t["name"] for t in old["triggers"])
    return old


def add_batch(jobs: JobStore, lanes: Lanes, tenant: str, lines: int) -> None:
    """The batch machinery's own steps (worker/http/batch_store.py): records in pipelined chunks,
    pushed onto the tenant's backlog, then the API's first release of a lane."""
    batch_id = f"batch_{tenant}"
    for start in range(0, lines, 2000):
        ids = [jobs.new_job_id(None) for _ in range(min(2000, lines - start))]
        jobs.create_many([(j, REQUEST) for j in ids], now=time.time(), priority=keys.BATCH_PRIORITY, tenant=tenant,
                         batch_id=batch_id)
        lanes.push(tenant, ids)
    lanes.release_once([tenant])


@pytest.fixture
def filled(redis_client, redis_url):
    """100 interactive jobs and a 2,000-line batch (the issue's measurement), with their messages."""
    app = producer_app(redis_url)
    dispatch = Dispatcher(app)
    jobs, lanes = JobStore(redis_client), Lanes(redis_client, dispatch, lane_jobs=16)
    for _ in range(100):
        job_id = jobs.new_job_id(None)
        jobs.create(job_id, REQUEST, now=time.time(), priority=0, deadline=None, idempotency_key=None)
        dispatch.run_job(job_id, 0)
    add_batch(jobs, lanes, "acme", 2000)
    yield jobs, lanes
    app.close()


def test_a_50000_line_batch_makes_the_formula_ask_for_max_replicas(rendered, redis_client, filled):
    jobs, lanes = filled
    overlays = {name: only_scaled_object(docs) for name, (_, docs) in rendered.items()}
    base = subprocess.run([shutil.which("kubectl") or "kubectl", "kustomize", str(KUSTOMIZE_ROOT / "base")],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    overlays["base"] = only_scaled_object([d for d in yaml.safe_load_all(base) if d])
    assert jobs.waiting() == 2100
    figures = {}
    for name, spec in overlays.items():
        figures[name] = [replicas_asked(on_broker_lists(spec), redis_client), replicas_asked(spec, redis_client)]
    for name, ((listed, _), (waiting, _)) in figures.items():
        assert (listed, waiting) == (116, 2100), name  # the lists: 100 + one lane of 16
    assert figures["base"][0][1] == 1 and overlays["base"]["maxReplicaCount"] == 4  # as measured: 1 of 4
    add_batch(jobs, lanes, "acme", 48_000)  # the same tenant's batch, 50,000 lines in all
    assert jobs.waiting() == 100 + 50_000
    for name, spec in overlays.items():
        before, after = replicas_asked(on_broker_lists(spec), redis_client), replicas_asked(spec, redis_client)
        print(f"\n{name}: 100 interactive + 2,000 batch lines: broker lists {figures[name][0]}, "
              f"ivq:waiting {figures[name][1]}; + 50,000 lines: broker lists {before}, ivq:waiting {after} "
              f"(metric, replicas; maxReplicaCount {spec['maxReplicaCount']})")
        assert before == figures[name][0], name  # the lists still show one lane, whatever the batch's size
        assert before[1] < spec["maxReplicaCount"], name
        assert after == (50_100, spec["maxReplicaCount"]), name


def only_scaled_object(docs: list[dict]) -> dict:
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    return so["spec"]
