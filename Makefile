# beeldportaal — the two commands that matter: `make up` (run it) and `make test` (prove it).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: help install up down demo status test test-unit lint bench-bus bench-ingest bench-decide bench-deliver bench-timeline clean

help:
	@echo "make up        install what is missing, start the platform (Kafka, S3, PostgreSQL, Prometheus) and the services"
	@echo "make down      stop exactly what 'make up' and 'make demo' started"
	@echo "make demo      on top of 'make up': two demo hospitals send a study each to an Orthanc; prints the journeys and the timeline"
	@echo "make status    health of each platform component"
	@echo "make test      install, start the platform, run every test tier, stop what it started"
	@echo "make test-unit the unit tier only (no platform needed)"
	@echo "make lint      ruff"
	@echo "make bench-bus round-trip 100,000 events through Kafka; prints JSON"
	@echo "make bench-ingest 2,000 instances over STOW-RS into beeldportaal and Orthanc; prints JSON"
	@echo "make bench-decide 50,000 studies through consent and routing, registry of 100,000; JSON"
	@echo "make bench-deliver 200 studies STOW-RS -> ingest -> ... -> notify -> Orthanc, end to end; JSON"
	@echo "make bench-timeline timeline search p50/p99 on 1,000,000 entries, 8 clients; projection replay rate; JSON"

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "beeldportaal needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing beeldportaal into $(VENV)" >&2
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' >&2
	@rm -f $(VENV)/.installed-* && touch $@

up: install
	$(BIN)/beeldportaal platform up
	$(BIN)/beeldportaal services up

down:
	@if [ -x $(BIN)/beeldportaal ]; then $(BIN)/beeldportaal services down; \
		$(BIN)/beeldportaal platform down; else echo "nothing to stop (not installed)"; fi

demo: install
	$(BIN)/beeldportaal demo

status: install
	$(BIN)/beeldportaal platform status; $(BIN)/beeldportaal services status

test: install
	deploy/local/run-tests.sh $(BIN)

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check shared services deploy tests benchmarks
	$(BIN)/ruff format --check shared services deploy tests benchmarks

bench-bus: install
	@deploy/local/with-platform.sh $(BIN) $(BIN)/python -m benchmarks.bus

bench-ingest: install
	@deploy/local/with-platform.sh $(BIN) $(BIN)/python -m benchmarks.ingest

bench-decide: install
	@deploy/local/with-platform.sh $(BIN) $(BIN)/python -m benchmarks.decide

bench-deliver: install
	@deploy/local/with-platform.sh $(BIN) $(BIN)/python -m benchmarks.deliver $(ARGS)

bench-timeline: install
	@deploy/local/with-platform.sh $(BIN) $(BIN)/python -m benchmarks.timeline $(ARGS)

clean:
	@if [ -x $(BIN)/beeldportaal ]; then $(BIN)/beeldportaal platform purge; fi
	rm -rf .state $(VENV)
