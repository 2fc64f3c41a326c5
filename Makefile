# switchyard: `make run` sets up and runs the demo, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run test setup bench lint-imports clean proto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[ml,dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m demo.run --policy demo/policy.yaml

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider

# Regenerate switchyard/ (the package generated from proto/) after editing a .proto (a test
# fails when it is stale).
proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) bench/extproc_overhead.py
	$(PY) bench/scorer.py
	$(PY) bench/quality.py
	$(PY) bench/decision.py
	$(PY) bench/soak.py
	$(PY) bench/failover.py
	$(PY) bench/label.py

clean:
	rm -rf $(VENV) .demo bench/results
