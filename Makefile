# Every target is a one-liner you could type yourself; `make help` lists them.
PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: help install fit debug test test-fast lint tensorboard clean

help:  ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## Create .venv and install the package with the tested versions (constraints.txt)
	python3 -m venv .venv && $(PIP) install -q -c constraints.txt -e ".[test]"

fit:  ## Train the default recipe on the embedded corpus (~3 min on 2 CPU cores)
	$(PYTHON) -m lm_lightning fit

debug:  ## Run the default recipe on a handful of batches
	$(PYTHON) -m lm_lightning fit -c configs/default.yaml -c configs/presets/debug.yaml

test:  ## Run the whole test suite (offline, CPU)
	$(PYTHON) -m pytest

test-fast:  ## Skip the slow end-to-end tests
	$(PYTHON) -m pytest -m "not slow"

lint:  ## ruff check
	$(PYTHON) -m ruff check .

tensorboard:  ## Open TensorBoard on lightning_logs/
	$(PYTHON) -m tensorboard.main --logdir lightning_logs

clean:  ## Remove run outputs (lightning_logs/) and Python caches; the token cache lives in ~/.cache/lm_lightning
	rm -rf lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
