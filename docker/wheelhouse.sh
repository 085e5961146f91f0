#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the images install, for builds whose
# RUN steps cannot reach a package index (no network in the build, or a proxy
# with its own CA). The Dockerfiles install from it when built with
#   --build-arg PIP_NO_INDEX=1
# and pip inside the build then never goes to the network.
#
#   docker/wheelhouse.sh            # client + worker wheels (torch, torchvision as constraints.txt pins them)
#   docker/wheelhouse.sh flash_attn-2.8.3+cu12torch2.14-cp311-cp311-linux_x86_64.whl   # extra wheels to add
#
# Run it with the Python of the image (3.11 on the python:3.11-slim and Debian
# bookworm bases): pip picks wheels for the interpreter that runs it.
# The folder is git-ignored; it is several GB with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docker/wheelhouse
PYTHON=${PYTHON:-python3}
mkdir -p "$out"
# pip, setuptools, wheel, packaging: what the builds upgrade or build the project with;
# moto[server]: the dev-only S3 image (Dockerfile.s3-dev). async-timeout: redis needs it
# on Python < 3.11.3 (Debian bookworm's 3.11.2), which a newer host Python skips.
"$PYTHON" -m pip wheel --quiet --wheel-dir "$out" -c constraints.txt ".[worker,api]" "moto[server,s3]" \
  pip "setuptools>=77" wheel packaging "async-timeout>=4.0.3" "$@"
rm -f "$out"/internvl_queue-*.whl  # the images build the project from the context, not from here
du -sh "$out"
