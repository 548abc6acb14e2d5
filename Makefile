# The two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test assets bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/raft-diffusion train --config configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

assets: $(VENV)/.installed
	$(PY) scripts/build_demo_assets.py

bench: $(VENV)/.installed
	$(PY) scripts/bench.py --device cpu --quick

clean:
	rm -rf runs .pytest_cache
