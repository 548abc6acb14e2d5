# The two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# test-min: the dependency floors (tests/min-versions.txt) in a venv of their own.
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python

.PHONY: demo demo-flow test test-min assets bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/raft-diffusion train --config configs/demo.yaml --overwrite

demo-flow: $(VENV)/.installed
	$(VENV)/bin/raft-diffusion train --config configs/demo_flow.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto  # one worker per core (pytest-xdist)

$(VENV_MIN)/.installed: pyproject.toml tests/min-versions.txt
	test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q -e ".[test]" -c tests/min-versions.txt
	touch $@

# The fast subset (`-m floor`) at the oldest releases pyproject.toml allows.
test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pytest -q -m floor

assets: $(VENV)/.installed
	$(PY) scripts/build_demo_assets.py

bench: $(VENV)/.installed
	$(PY) scripts/bench.py --device cpu --quick

clean:
	rm -rf runs .pytest_cache $(VENV_MIN)
