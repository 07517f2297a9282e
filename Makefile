# make install: create .venv/ and install everything (torch, VISSL with modern deps, this package).
# make demo:    install if needed, then run the embedded digits demo (DATA=path for your own folder).
# make test:    install if needed, then run the test suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
# pip compiles every installed file to bytecode one at a time (about 60 s of the
# install on 2 cores); --no-compile, then compileall on every core (about 30 s).
# Without bytecode each new process would compile what it imports (here
# PYTHONDONTWRITEBYTECODE=1 would keep it from being saved: 10 s per VISSL process).
INSTALL := $(PIP) install --no-compile -c constraints.txt
DEMO_OUT ?= demo_output

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) setuptools wheel
	$(INSTALL) torch torchvision
	# VISSL 0.1.6 then ClassyVision 0.7.0 (which replaces the copy inside the VISSL wheel),
	# without their 2021 pins; their modern needs are the package's `vissl` extra below.
	$(INSTALL) --no-deps vissl==0.1.6
	$(INSTALL) --no-deps classy_vision==0.7.0
	$(INSTALL) -e ".[vissl,analysis,test]"
	@# files written for other Python versions do not compile (pip skips them too)
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: install
	$(PY) -m convit_ssl.cli demo --out $(DEMO_OUT) $(if $(DATA),--data $(DATA))

# Two pytest workers, a test file each at a time (module fixtures are not run
# twice), one intra-op thread per process: most tests start VISSL processes
# whose imports and start-up are single-threaded, so two side by side nearly
# halve the suite's time on 2 cores. Files go out in collection order, which
# tests/conftest.py starts with the longest (xdist would sort by test count).
TEST_WORKERS ?= 2

# ruff first (a second; configured in pyproject.toml): lint, then the formatter's check.
test: install
	$(PY) -m ruff check convit_ssl tools tests
	$(PY) -m ruff format --check convit_ssl tools tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
