# Two commands for a newcomer:  `make run`  and  `make test`.
# Both create .venv and install everything they need on first use.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
PYTHON  ?= python3
TORCH_VERSION ?= 2.13.0

# llama.cpp is compiled on install. A native build uses AMX tile instructions that
# fault on some virtual machines (this project's CI among them), so build for
# x86-64-v3 (AVX2/FMA) instead: portable, and fast enough for a 270M model.
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

.PHONY: install run test lint system-deps bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A CPU build of PyTorch for the embedding matcher: 2.13.0 is the CPU wheel this
	# platform provides; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[local,eval,embedding,dev]'
	touch $@

install: $(VENV)/.installed

## The proxy in front of the local reference model on http://127.0.0.1:8080/v1
run: install
	$(VENV)/bin/abstain up --policy policies/default.yaml

## Debian packages the test suite drives for real (Prometheus and promtool).
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	      || echo "warning: could not install prometheus; its tests will be skipped"; \
	  else echo "warning: not root, prometheus not installed; its tests will be skipped"; fi; }

lint: install
	$(VENV)/bin/ruff check proxy tests benchmarks
	$(VENV)/bin/ruff format --check proxy tests benchmarks
	$(VENV)/bin/mypy proxy

## Lint, types, then the whole suite (unit, proxy, end-to-end, real model, Prometheus).
test: install system-deps lint
	$(VENV)/bin/pytest -q

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
