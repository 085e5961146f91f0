# make demo: the whole path on an embedded Redis with the tiny offline model.
# make e2e-containers: docker/e2e.sh, the CPU stack in containers (needs Docker; not in make test).
# make lint: ruff, mypy and the import boundaries (import-linter), as configured in pyproject.toml.
# make test: lint, then the whole suite (unit, integration, e2e, faults, deploy, bench smoke).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean e2e-containers

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[worker,api,dev]"
	touch $(STAMP)

# checkov (Kubernetes policy checks in tests/deploy) pins its own libraries,
# so it lives in a venv of its own.
TOOLS := .venv-tools/bin/checkov
$(TOOLS): deploy/tools-venv.sh
	PYTHON=$(PYTHON) bash deploy/tools-venv.sh

install: $(STAMP)

demo: install
	$(VENV)/bin/internvl-queue demo

# Every checker runs, even after one fails, so one run shows every finding.
lint: install
	@status=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "mypy"; $(VENV)/bin/mypy || status=1; \
	echo "lint-imports"; $(VENV)/bin/lint-imports --no-logo || status=1; \
	exit $$status

test: install $(TOOLS) lint
	$(PY) -m pytest -q

# The CPU stack in containers, end to end (needs Docker with Compose v2; not part of
# make test). E2E_LOCAL_BASE=1: no image registry (README, "Run it in containers").
e2e-containers:
	bash docker/e2e.sh

bench: install
	$(VENV)/bin/internvl-queue bench

clean:
	rm -rf .ivq-data .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
