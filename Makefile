# Set-up and checks. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
STAMP := $(VENV)/.installed

.PHONY: env lint test test-fast demo bench lock descriptor container-check clean

# The environment is rebuilt whenever a lock file or the package metadata changes.
$(STAMP): requirements.lock requirements-dev.lock pyproject.toml version
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned environment into $(VENV) (log: $(VENV)/install.log)"
	@{ $(BIN)/python -m pip install --upgrade "pip>=24" && \
	   $(BIN)/python -m pip install -r requirements-dev.lock && \
	   $(BIN)/python -m pip install --no-deps -e . ; } > $(VENV)/install.log 2>&1 \
	   || { tail -n 40 $(VENV)/install.log; exit 1; }
	touch $(STAMP)

env: $(STAMP)

lint: env
	$(BIN)/ruff check bids_app tests benchmarks
	$(BIN)/ruff format --check bids_app tests benchmarks
	$(BIN)/mypy bids_app

# The full suite, slow realistic runs included: what CI runs.
test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: env
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

demo: env
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_DIR)

bench: env
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

# Re-pin: resolve the ranges of pyproject.toml in a clean venv and freeze them.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet "torch==2.13.0" ".[tracking]"
	(echo "# Exact pins of the runtime environment (the image installs these). Regenerate: make lock"; \
	 .lockenv/bin/pip freeze --all --exclude pip --exclude bids_app | sed 's/+cpu//') > requirements.lock
	.lockenv/bin/pip install --quiet ".[tracking,dev]"
	(echo "# Exact pins of the development environment: runtime + test/lint tools. Regenerate: make lock"; \
	 echo "-r requirements.lock"; \
	 .lockenv/bin/pip freeze --all --exclude pip --exclude bids_app | sed 's/+cpu//' | grep -vxFf requirements.lock) > requirements-dev.lock
	rm -rf .lockenv

# The boutiques descriptor follows the CLI parser.
descriptor: env
	$(BIN)/python scripts/boutiques_descriptor.py

# A real podman build and read-only run of the Dockerfile and Singularity.def (needs root and ../shared).
container-check:
	mkdir -p wheels && cp -n /opt/wheels/torch-2.13.0*.whl wheels/ 2>/dev/null || true
	bash ../shared/tools/container-check.sh .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(DEMO_DIR) build *.egg-info
