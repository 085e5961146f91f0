#!/usr/bin/env bash
# A local Debian base image for hosts that cannot pull from an image registry.
#
#   sudo docker/local-base.sh [TAG]      # default TAG: internvl-queue-base:bookworm
#
# debootstrap (Debian package `debootstrap`) lays out a minimal Debian bookworm
# (Python 3.11, venv, CA certificates, libgomp for CPU torch) and `docker import`
# turns it into an image. Use it for every base the Dockerfiles take as ARGs:
#
#   docker build --build-arg PYTHON_IMAGE=internvl-queue-base:bookworm -f docker/Dockerfile.client .
#   docker build --build-arg PYTHON_IMAGE=internvl-queue-base:bookworm -f docker/Dockerfile.cpu .
#
# and, as a stand-in for the CUDA bases (everything but the GPU itself):
#
#   docker build --build-arg CUDA_DEVEL_IMAGE=internvl-queue-base:bookworm \
#                --build-arg CUDA_RUNTIME_IMAGE=internvl-queue-base:bookworm -f docker/Dockerfile .
#
# Needs root (debootstrap chroots) and a Debian mirror: debootstrap's default one,
# or DEBIAN_MIRROR=URL. Takes a few minutes; the image is about 150 MB.
set -euo pipefail

TAG=${1:-internvl-queue-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,libgomp1

if [ "$(id -u)" != 0 ]; then
  echo "local-base.sh: run as root (debootstrap needs it)" >&2
  exit 2
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "local-base.sh: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 2; }
done

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

# shellcheck disable=SC2086  # DEBIAN_MIRROR is one word or none
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" ${DEBIAN_MIRROR:-}

# What a registry's slim image also leaves out: apt's caches, docs, man pages.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/var/log/*.log "$rootfs"/tmp/*

tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
docker image inspect --format '{{.RepoTags}} {{.Size}} bytes' "$TAG"
