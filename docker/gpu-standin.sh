#!/usr/bin/env bash
# The GPU image (docker/Dockerfile) built and run without a GPU or NVIDIA's base
# images: everything but the GPU itself. Builds it on the local Debian base
# (docker/local-base.sh) as internvl-queue-worker:0.1.0-standin, with flash-attn
# left out (FLASH_ATTN_WHEEL=none) and wheels from docker/wheelhouse/, then runs
# it as the worker of a running cpu stack (docker/e2e.sh with E2E_KEEP=1), in
# place of the CPU worker, on the tiny model, with the compose hardening
# (read-only root, no capabilities, /models volume): it must turn healthy, run
# as uid 10001, serve 10 jobs through the API and drain on `docker stop`.
#
#   E2E_LOCAL_BASE=1 E2E_KEEP=1 docker/e2e.sh && docker/gpu-standin.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=${E2E_PROJECT:-ivq-e2e}
COMPOSE=(docker compose -f docker/compose.yaml --profile cpu -p "$PROJECT")
IMAGE=internvl-queue-worker:0.1.0-standin
BASE=${STANDIN_BASE:-internvl-queue-base:bookworm}
work=$(mktemp -d); chmod 777 "$work"
trap 'docker rm -f ivq-gpu-standin >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

if [ "${STANDIN_BUILD:-1}" = 1 ]; then
  t=$(date +%s)
  # Through compose's build section (the build everyone runs), then renamed: a
  # stand-in build must not pass for the real internvl-queue-worker:0.1.0.
  CUDA_DEVEL_IMAGE="$BASE" CUDA_RUNTIME_IMAGE="$BASE" FLASH_ATTN_WHEEL=none PIP_NO_INDEX=1 \
    docker compose -f docker/compose.yaml --profile gpu -p ivq-gpu-standin build worker >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; exit 1; }
  docker tag internvl-queue-worker:0.1.0 "$IMAGE" && docker rmi internvl-queue-worker:0.1.0 >/dev/null
  echo "build: $(( $(date +%s) - t )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
fi

"${COMPOSE[@]}" stop worker-cpu >/dev/null
network="${PROJECT}_default"
docker run -d --name ivq-gpu-standin --network "$network" --read-only --tmpfs /tmp --cap-drop ALL \
  --security-opt no-new-privileges:true --stop-timeout 90 -v "${PROJECT}_gpu-standin-models:/models" \
  -e IVQ_REDIS_URL=redis://:dev-only-redis-password@redis:6379/0 -e IVQ_STORE_URL=s3://internvl-queue/local \
  -e IVQ_S3_ENDPOINT_URL=http://s3:9000 -e AWS_ACCESS_KEY_ID=dev-only-minio \
  -e AWS_SECRET_ACCESS_KEY=dev-only-minio-password -e AWS_DEFAULT_REGION=us-east-1 \
  -e IVQ_MODEL=tiny -e IVQ_DRAIN_TIMEOUT_S=60 "$IMAGE" >/dev/null
for _ in $(seq 90); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' ivq-gpu-standin)" = healthy ] && break
  sleep 2
done
health=$(docker inspect -f '{{.State.Health.Status}}' ivq-gpu-standin)
[ "$health" = healthy ] || { docker logs --tail 30 ivq-gpu-standin; echo "stand-in is $health" >&2; exit 1; }
echo "health: $health; uid $(docker exec ivq-gpu-standin id -u); entrypoint $(docker inspect -f '{{.Config.Entrypoint}} {{.Config.Cmd}}' ivq-gpu-standin)"
if docker exec ivq-gpu-standin sh -c 'touch /opt/venv/probe' 2>/dev/null; then echo "root is writable" >&2; exit 1; fi

driver() {
  "${COMPOSE[@]}" run --rm --no-deps -T -v "$PWD/docker/e2e:/e2e:ro" -v "$work:/out" \
    -e IVQ_S3_ENDPOINT_URL=http://s3:9000 -e AWS_ACCESS_KEY_ID=dev-only-minio \
    -e AWS_SECRET_ACCESS_KEY=dev-only-minio-password -e AWS_DEFAULT_REGION=us-east-1 \
    --entrypoint python producer /e2e/driver.py "$@"
}
driver submit /out/standin.ids 10
driver check /out/standin.ids | tee "$work/standin.json"
grep -q '"ok": true' "$work/standin.json"
t=$(date +%s.%N); docker stop ivq-gpu-standin >/dev/null
echo "docker stop: $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s, exit $(docker inspect -f '{{.State.ExitCode}}' ivq-gpu-standin)"
"${COMPOSE[@]}" start worker-cpu >/dev/null
echo "GPU STAND-IN PASSED"
