# The two commands: `make demo` (the main job on an embedded default; FULL=1 for the longer version) and `make test`.
# Each creates .venv when it is missing and installs the package with what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint benchmark clean-venv

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,onnx]'
	# torchscale (reference implementation; tests and benchmarks only) pins an old timm: no deps.
	$(PY) -m pip install --quiet --no-deps torchscale==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tasks/demo.py $(if $(FULL),--profile full,)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(STAMP)
	$(PY) benchmarks/backbone.py

clean-venv:
	rm -rf $(VENV)
