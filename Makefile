# Entry points for developers and CI. Thin on purpose: each target calls the one tool or
# script that does the work (and documents itself), so `make -n TARGET` shows exactly what
# runs and nothing here needs keeping in sync with the scripts.
#
# `make help` lists the targets from the `## ` comments after each of them.

PYTHON ?= python3
IMAGE ?= datapin:dev

.DEFAULT_GOAL := help
.PHONY: help test lint image kind-e2e kind-down

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

test: ## run the whole test suite (what needs root, DVC, weed, a cluster skips with a reason)
	$(PYTHON) -m pytest

lint: ## ruff (lint and format check) and mypy --strict
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

image: ## build the datapin image (IMAGE=datapin:dev by default)
	docker build -t $(IMAGE) .

kind-e2e: ## end-to-end test on a kind cluster (root, Docker, kind, kubectl, helm): scripts/kind-e2e
	bash scripts/kind-e2e

kind-down: ## delete the kind cluster, its XFS node volumes and the e2e images
	bash scripts/kind-e2e down
