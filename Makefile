# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: run hub test lint unit e2e bench clean deb

# The tests that run a second time with spacehub.server.speedups off: whatever goes
# through the patched hypercorn, wsproto and TLS reads.
NO_SPEEDUPS_TESTS := tests/unit/test_speedups.py tests/unit/test_http_drain.py tests/unit/test_cpm_api.py \
	tests/unit/test_link_session.py tests/unit/test_link_client.py tests/e2e/test_link_e2e.py

$(STAMP): pyproject.toml
	@echo "Installing Spacehub and its test tools into $(VENV) (about 20 s the first time, then only when pyproject.toml changes)"
	@test -x $(BIN)/python || { echo "  python -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "  pip install -e '.[test]'"
	@$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)
	@echo "Installed $(BIN)/sth, $(BIN)/cpm and $(BIN)/si (source $(BIN)/activate to have them on PATH)"

## run: install into .venv and start a local Space: a cpm on 127.0.0.1:9000 and
## one sth on 127.0.0.1:8000 joined to it (state in .local-space/)
run: $(STAMP)
	$(BIN)/python -m spacehub.localspace --exit-with-parent $(ARGS)

## hub: just a hub on 127.0.0.1:8000
hub: $(STAMP)
	$(BIN)/sth --end-instances-on-exit $(ARGS)

## test: install test dependencies, lint, type-check and run the whole suite
test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	@echo "The link and HTTP tests again, with every library patch off (SPACEHUB_SPEEDUPS=0):"
	SPACEHUB_SPEEDUPS=0 $(BIN)/python -m pytest -q $(NO_SPEEDUPS_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check agent cpm spacehub harness tests bench
	$(BIN)/ruff format --check agent cpm spacehub harness tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

## deb: build build/spacehub_<version>_all.deb (packaging/README.md)
deb: $(STAMP)
	PYTHON=$(BIN)/python bash packaging/build-deb.sh

## bench: every benchmark (bench/README.md); sizes by env, e.g. `BENCH_MB=64 BENCH_HUBS=50 make bench`;
## each also runs alone: `.venv/bin/python -m bench.link fleet`
bench: $(STAMP)
	$(BIN)/python -m bench.hub
	$(BIN)/python -m bench.link
	if [ -f bench/podman_start.py ]; then $(BIN)/python -m bench.podman_start; fi
	$(BIN)/python -m bench.manager_restart
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.readopt
	if [ -f bench/link_failure.py ] && [ "$$(id -u)" = 0 ]; then $(BIN)/python -m bench.link_failure; fi

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
