#!/usr/bin/env bash
# Build .venv-tools: a separate virtualenv for checkov, the Kubernetes policy
# scanner. checkov pins its own boto3/botocore, pydantic-free stack and many
# parser libraries; installing it into the service's .venv would move those
# pins, so it lives apart and the manifest test calls it by path.
#
# Usage: deploy/tools-venv.sh            (idempotent; re-run after a version bump)
#        PYTHON=python3.11 deploy/tools-venv.sh
set -euo pipefail

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
PYTHON="${PYTHON:-python3}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv-tools"

if [[ -x "${venv}/bin/checkov" ]] && \
   [[ "$("${venv}/bin/python" -m pip show checkov 2>/dev/null | awk '/^Version:/{print $2}')" == "${CHECKOV_VERSION}" ]]; then
  echo "checkov ${CHECKOV_VERSION} already in ${venv}"
  exit 0
fi

"${PYTHON}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install --quiet "checkov==${CHECKOV_VERSION}"
"${venv}/bin/checkov" --version
