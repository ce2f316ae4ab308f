# Quick start on a fresh machine:  `make train` (the main job)  and  `make test` (the tests).
# Both create ./.venv on first use: the pinned torch, the test/training requirements, and this
# package built with its C++ and CUDA kernels. `make wheel` builds dist/cnnlstm_ext-*.whl against
# the venv's torch (install it where the same torch is installed).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml requirements-dev.txt $(shell find csrc cnnlstm_ext -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py')

.PHONY: train test bench wheel clean
train: $(VENV)/.installed
	$(VENV)/bin/cnnlstm-ext train

test: $(VENV)/.installed
	$(VENV)/bin/pytest python_tests

bench: $(VENV)/.installed
	$(VENV)/bin/pytest benchmarks -k cpu --benchmark-json=benchmarks/cpu.json

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -r requirements-dev.txt
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation .
	touch $@

wheel: $(VENV)/.installed
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf build dist *.egg-info $(VENV) cnnlstm_ext/_C*.so
