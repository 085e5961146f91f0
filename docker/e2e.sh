#!/usr/bin/env bash
# The CPU stack in containers, end to end (needs a Docker engine with Compose v2;
# not part of `make test`, which runs without Docker).
#
#   docker/e2e.sh                 # public base images (python:3.11-slim, redis:7.4-alpine)
#   E2E_LOCAL_BASE=1 docker/e2e.sh  # no image registry: Debian bases from docker/local-base.sh,
#                                 # a Debian Redis (Dockerfile.redis-dev), wheels from
#                                 # docker/wheelhouse.sh (pip never reaches an index in a build)
#
# Builds the images (cold: --no-cache, then cached; E2E_COLD=0 skips the cold one),
# starts the cpu profile, and checks through the HTTP API and the S3 endpoint:
#   - the first job done after `up` (timed);
#   - 50 mixed jobs: all succeed, each result in S3 as exactly one object version;
#   - `docker stop` of the worker with jobs in flight: it drains inside its grace
#     period and exits 0; after a start, 0 jobs lost;
#   - `docker kill` of the worker with jobs in flight, then a start: 0 lost, one result each;
#   - a Redis restart with jobs queued: 0 lost;
#   - health checks healthy; non-root users and read-only root filesystems hold.
# Ends with the figures (jobs, lost, image sizes, build times, up to first job).
# E2E_KEEP=1 leaves the stack up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${E2E_PROJECT:-ivq-e2e}
COMPOSE=(docker compose -f docker/compose.yaml --profile cpu -p "$PROJECT")
JOBS=${E2E_JOBS:-50}
IMAGES=(internvl-queue-client:0.1.0 internvl-queue-worker-cpu:0.1.0 internvl-queue-s3-dev:0.1.0)
work=$(mktemp -d)
chmod 777 "$work"  # the driver runs as uid 10001
declare -A FIG

log() { printf '\n== %s\n' "$*"; }
fail() { printf '\nE2E FAILED: %s\n' "$*" >&2; "${COMPOSE[@]}" logs --tail 40 worker-cpu api >&2 || true; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
cid() { "${COMPOSE[@]}" ps -a -q "$1"; }
cleanup() {
  if [ "${E2E_KEEP:-0}" != 1 ]; then "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The driver (docker/e2e/driver.py) in the client image, on the stack's network: API and S3 only.
driver() {
  "${COMPOSE[@]}" run --rm --no-deps -T -v "$PWD/docker/e2e:/e2e:ro" -v "$work:/out" \
    -e IVQ_S3_ENDPOINT_URL=http://s3:9000 -e AWS_ACCESS_KEY_ID=dev-only-minio \
    -e AWS_SECRET_ACCESS_KEY=dev-only-minio-password -e AWS_DEFAULT_REGION=us-east-1 \
    --entrypoint python producer /e2e/driver.py "$@"
}
# `check` prints one JSON line; pull a field out of it.
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

if [ "${E2E_LOCAL_BASE:-0}" = 1 ]; then
  log "local bases (no image registry)"
  docker image inspect internvl-queue-base:bookworm >/dev/null 2>&1 || docker/local-base.sh internvl-queue-base:bookworm
  ls docker/wheelhouse/torch-*.whl >/dev/null 2>&1 || docker/wheelhouse.sh
  export PYTHON_IMAGE=internvl-queue-base:bookworm PIP_NO_INDEX=1 REDIS_IMAGE=internvl-queue-redis-dev:0.1.0
  docker build -q --build-arg DEBIAN_IMAGE=internvl-queue-base:bookworm -t "$REDIS_IMAGE" - < docker/Dockerfile.redis-dev
fi

log "build"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
if [ "${E2E_COLD:-1}" = 1 ]; then
  t=$(now); "${COMPOSE[@]}" build --no-cache >"$work/build-cold.log" 2>&1 || { tail -30 "$work/build-cold.log"; fail "cold build"; }
  FIG[build_cold_s]=$(since "$t"); echo "cold build: ${FIG[build_cold_s]} s"
fi
t=$(now); "${COMPOSE[@]}" build >"$work/build-cached.log" 2>&1 || { tail -30 "$work/build-cached.log"; fail "build"; }
FIG[build_cached_s]=$(since "$t"); echo "cached build: ${FIG[build_cached_s]} s"
for image in "${IMAGES[@]}"; do
  FIG["size_$image"]=$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')
done

log "grace period fits the drain"
"${COMPOSE[@]}" config --format json > "$work/config.json"
python3 - "$work/config.json" <<'PY' || fail "stop_grace_period does not fit IVQ_DRAIN_TIMEOUT_S"
import json, re, sys
svc = json.load(open(sys.argv[1]))["services"]["worker-cpu"]
grace = svc["stop_grace_period"]
m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", grace)
grace_s = int(m.group(1) or 0) * 60 + int(m.group(2) or 0)
drain = int(svc["environment"]["IVQ_DRAIN_TIMEOUT_S"])
print(f"stop_grace_period {grace_s} s, IVQ_DRAIN_TIMEOUT_S {drain} s (+5 s watchdog)")
assert grace_s >= drain + 10, (grace_s, drain)
PY

log "up, and the first job done"
t_up=$(now)
"${COMPOSE[@]}" up -d redis s3-dev s3-dev-init api callbacks worker-cpu
driver submit /out/first.ids 1 >/dev/null || fail "first submit"
driver check /out/first.ids > "$work/first.json" || true
grep -q '"ok": true' "$work/first.json" || fail "first job: $(cat "$work/first.json")"
FIG[up_to_first_job_s]=$(since "$t_up")

log "$JOBS mixed jobs"
t=$(now)
driver submit /out/mixed.ids "$JOBS"
driver check /out/mixed.ids | tee "$work/mixed.json" || true
grep -q '"ok": true' "$work/mixed.json" || fail "mixed jobs"
FIG[mixed_jobs]="$(field succeeded < "$work/mixed.json")/$JOBS succeeded, $(field lost < "$work/mixed.json") lost, $(field results_with_one_version < "$work/mixed.json") results in S3 (one version each), $(since "$t") s"

worker=$(cid worker-cpu)
log "docker stop with jobs in flight"
driver submit /out/stop.ids 12 --long
driver running /out/stop.ids 2
t=$(now); docker stop "$worker" >/dev/null; stop_s=$(since "$t")
grace=$(docker inspect -f '{{.Config.StopTimeout}}' "$worker")
code=$(docker inspect -f '{{.State.ExitCode}}' "$worker")
# (to a file first: grep -q closing the pipe early would fail the pipeline under pipefail)
docker logs "$worker" > "$work/worker-stop.log" 2>&1
grep -q worker.draining "$work/worker-stop.log" || fail "no drain in the worker's log"
[ "$code" = 0 ] || fail "worker exited $code on docker stop (137: killed at the end of the grace period)"
awk -v s="$stop_s" -v g="$grace" 'BEGIN { exit !(s < g) }' || fail "stop took $stop_s s, grace $grace s"
"${COMPOSE[@]}" start worker-cpu
driver check /out/stop.ids | tee "$work/stop.json" || true
grep -q '"ok": true' "$work/stop.json" || fail "jobs lost or duplicated over docker stop"
FIG[docker_stop]="drained in $stop_s s (grace $grace s), exit $code; 12 jobs, $(field lost < "$work/stop.json") lost, $(field succeeded < "$work/stop.json") succeeded"

log "docker kill with jobs in flight, then start"
driver submit /out/kill.ids 12 --long
driver running /out/kill.ids 2
docker kill "$worker" >/dev/null
t=$(now)
"${COMPOSE[@]}" start worker-cpu
driver check /out/kill.ids | tee "$work/kill.json" || true
grep -q '"ok": true' "$work/kill.json" || fail "jobs lost or duplicated over docker kill"
FIG[docker_kill]="12 jobs, $(field lost < "$work/kill.json") lost, $(field results_with_one_version < "$work/kill.json") with exactly one result, max attempts $(field max_attempts < "$work/kill.json"), all done $(since "$t") s after the start"

log "Redis restart with jobs queued"
driver submit /out/redis.ids 12
sleep 2  # AOF fsyncs every second
docker restart "$(cid redis)" >/dev/null
driver check /out/redis.ids | tee "$work/redis.json" || true
grep -q '"ok": true' "$work/redis.json" || fail "jobs lost over a Redis restart"
FIG[redis_restart]="12 jobs, $(field lost < "$work/redis.json") lost, $(field succeeded < "$work/redis.json") succeeded"

log "health, users, read-only roots"
for svc in redis s3-dev api callbacks worker-cpu; do
  c=$(cid "$svc")
  for _ in $(seq 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" = healthy ] && break
    sleep 2
  done
  status=$(docker inspect -f '{{.State.Health.Status}}' "$c")
  [ "$status" = healthy ] || fail "$svc is $status"
  echo "$svc: healthy"
done
for svc in api callbacks worker-cpu s3-dev; do
  c=$(cid "$svc")
  uid=$(docker exec "$c" id -u)
  ro=$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$c")
  [ "$uid" != 0 ] || fail "$svc runs as root"
  [ "$ro" = true ] || fail "$svc root filesystem is writable"
  if docker exec "$c" sh -c 'touch /opt/venv/probe' 2>/dev/null; then fail "$svc wrote to its root filesystem"; fi
  echo "$svc: uid $uid, read-only root (a write to /opt/venv fails)"
done
FIG[health]="redis, s3-dev, api, callbacks, worker-cpu healthy; api, callbacks, worker-cpu, s3-dev non-root on a read-only root"

log "figures"
for k in $(printf '%s\n' "${!FIG[@]}" | sort); do printf '%-45s %s\n' "$k" "${FIG[$k]}"; done
echo "E2E PASSED"
