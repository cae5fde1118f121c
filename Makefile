# Kestrel: the README's two commands are `make train` and `make test`.
# Each installs what is missing (a Python >= 3.12 venv in .venv) and then runs.
PY := .venv/bin/python
# On a machine with no TPU or GPU, keep JAX on the CPU (libtpu, installed for AOT
# compiles, otherwise prints warnings while it looks for a TPU).
ifeq ($(wildcard /dev/accel* /dev/vfio/* /dev/nvidia0),)
export JAX_PLATFORMS ?= cpu
endif
CONFIG ?= experiments/configs/base.py:default
WORKDIR ?= runs/default
PYTEST_ARGS ?=
# pytest-xdist workers (one per core here); each test file runs on one worker.
PYTEST_WORKERS ?= 2

.PHONY: install train test bench clean

install:
	@bash scripts/bootstrap.sh

train: install
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

clean:
	rm -rf runs .pytest_cache
