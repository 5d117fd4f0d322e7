# The two commands: `make demo` (the main job on an embedded default; FULL=1 for the longer version) and `make test`.
# Each creates .venv when it is missing and installs the package with what it needs, at the versions of
# requirements/lock.txt: the set the suite and the demo's figures were produced with, so a clone gives the same
# environment on any later day. setup.cfg keeps ranges for library users; the lock is for these two commands.
#
# The newest releases are tried on purpose, in an environment of their own:
#   make test-latest   installs the newest versions setup.cfg allows into .venv-latest and runs the suite there
#   make lock          does the same and, when the suite passes, writes requirements/lock.txt from .venv-latest
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
LOCK := requirements/lock.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint benchmark test-latest lock clean-venv

# $(1): the environment's folder; $(2): pip's version options (the lock's constraints, or --upgrade for the newest).
# torchscale (reference implementation; tests and benchmarks only) pins an old timm: it is installed without deps.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(2) pip
	$(1)/bin/python -m pip install --quiet $(2) -e '.[dev,onnx,captioning]'
	$(1)/bin/python -m pip install --quiet $(2) --no-deps torchscale==0.3.0
endef

# ruff, then the suite in the environment $(1): the fast tier first, so that a broken import or unit test is
# reported in minutes and stops make there, then the end-to-end tier (the e2e marker, tests/conftest.py).
define run_suite
	$(1)/bin/ruff check .
	$(1)/bin/ruff format --check .
	$(1)/bin/python -m pytest -q -m "not e2e" --durations=10
	$(1)/bin/python -m pytest -q -m e2e --durations=10
endef

# The lock's releases are built for Python 3.11 and newer (numpy 2.4 needs 3.11), while setup.cfg admits 3.10.
LOCK_PYTHON := import sys; sys.exit(sys.version_info < (3, 11) and "$(LOCK) pins releases for Python 3.11 and newer; \
  this environment has Python %d.%d. Run PYTHON=python3.11 make ... (or newer; rm -r $(VENV) first if it exists), \
  or make test-latest, which installs what setup.cfg allows on this Python." % sys.version_info[:2])

$(STAMP): setup.cfg pyproject.toml Makefile $(LOCK)
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -c '$(LOCK_PYTHON)'
	$(call install,$(VENV),--constraint $(LOCK))
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tasks/demo.py $(if $(FULL),--profile full,)

test: $(STAMP)
	$(call run_suite,$(VENV))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(STAMP)
	$(PY) benchmarks/backbone.py

test-latest:
	$(call install,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LATEST_VENV)/versions.txt
	$(call run_suite,$(LATEST_VENV))

# Written only after a green suite, through a temporary file: an interrupted refresh leaves the old lock whole.
lock: test-latest
	{ echo "# The versions \`make test\` and \`make demo\` install (pip --constraint): written by \`make lock\` from an"; \
	  echo "# environment that passed the suite on $$(date -u +%F), Python $$($(LATEST_VENV)/bin/python -c \
	    'import platform; print(platform.python_version(), platform.system(), platform.machine())')."; \
	  cat $(LATEST_VENV)/versions.txt; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean-venv:
	rm -rf $(VENV) $(LATEST_VENV)
