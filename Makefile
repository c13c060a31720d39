# Quick start: `make serve` and `make test` each bootstrap .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 resolves to the local CPU build; the project's range accepts it.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/msem serve

test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --dist loadscope --no-loadscope-reorder tests

bench: $(STAMP)
	$(PY) benchmarks/engine_vs_hf.py

clean:
	rm -rf $(VENV)
