# Two commands on a fresh machine: `make demo` (set up + the main job on the tiny preset), `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c constraints.txt
GPU ?= h100
# TensorRT cannot be installed here: its code is type-checked against these PyPI wheels (stubs, and the bindings
# wheel's pure-Python tensorrt.plugin package), read by tests/test_tensorrt_static.py; nothing of theirs is committed.
TRT_WHEELS := .typecheck/wheels
TRT_WHEEL_PINS := tensorrt-stubs==10.13.0.35.1 tensorrt-cu12-bindings==11.4.0.106

.PHONY: demo test install typecheck clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[cpu]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[cpu,test]"
	touch $@

$(TRT_WHEELS)/.downloaded: $(VENV)/.installed Makefile
	$(BIN)/pip download --quiet --no-deps --python-version 3.11 --only-binary=:all: -d $(TRT_WHEELS) $(TRT_WHEEL_PINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dsa-export build --gpu $(GPU)

test: $(VENV)/.installed-test $(TRT_WHEELS)/.downloaded
	$(BIN)/python -m pytest

typecheck: $(VENV)/.installed-test $(TRT_WHEELS)/.downloaded
	$(BIN)/python scripts/tensorrt_typings.py $(TRT_WHEELS) .typecheck/typings
	$(BIN)/pyright -p pyrightconfig.json

clean:
	rm -rf $(VENV) build .typecheck
