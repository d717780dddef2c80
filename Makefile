# Two commands for a newcomer:  `make run`  and  `make test`.
# Both create .venv and install everything they need on first use.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
PYTHON  ?= python3
TORCH_VERSION ?= 2.13.0

# llama.cpp's llama-server (the local model's server) is compiled on install, from the
# sources vendored in llama-cpp-python's sdist (MIT), by proxy/local_build.py; the binary
# goes into $(VENV)/bin and a cache under ~/.cache/abstain-proxy, so a second install on
# the same machine copies it. A native build uses AMX tile instructions that fault on
# some virtual machines (this project's CI among them), so build for x86-64-v3
# (AVX2/FMA) instead: portable, and fast enough for a 270M model.
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

.PHONY: install run test lint system-deps bench bench-model clean

$(VENV)/.installed: pyproject.toml proxy/local_build.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A CPU build of PyTorch for the embedding matcher: 2.13.0 is the CPU wheel this
	# platform provides; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[local,eval,embedding,dev]'
	$(PY) -m proxy.local_build
	touch $@

install: $(VENV)/.installed

## The proxy in front of the local reference model on http://127.0.0.1:8080/v1
run: install
	$(VENV)/bin/abstain up --policy policies/default.yaml

## Debian packages the test suite drives for real (Prometheus, promtool, redis-server).
system-deps:
	@{ command -v promtool && command -v redis-server; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus redis-server >/dev/null) \
	      || echo "warning: could not install prometheus/redis-server; their tests will be skipped"; \
	  else echo "warning: not root, prometheus/redis-server not installed; their tests will be skipped"; fi; }

lint: install
	$(VENV)/bin/ruff check proxy tests benchmarks
	$(VENV)/bin/ruff format --check proxy tests benchmarks
	$(VENV)/bin/mypy proxy

## Lint, types, then the whole suite (unit, proxy, end-to-end, real model, Prometheus).
test: install system-deps lint
	$(VENV)/bin/pytest -q

bench: install
	$(PY) benchmarks/overhead.py

## The local model's speed: logprobs, streaming through the proxy, parallel slots, eval.
bench-model: install
	$(PY) benchmarks/local_model_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
