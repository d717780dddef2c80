# syntax=docker/dockerfile:1
#
# abstain-proxy container images.
#
#   docker build -t abstain-proxy:0.1.0 .                         # the proxy (default target)
#   docker build --target demo -t abstain-proxy:0.1.0-demo .      # + the local reference model
#
# The install steps are the project's tested ones (Makefile): `pip install` of the
# package; for the demo image the [local] extra and llama-server compiled by
# `python -m proxy.local_build` with the same CMAKE_ARGS.
# tests/deploy/test_manifests.py checks that they stay the same.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A virtualenv is one directory to copy into the runtime image, without pip's caches.
RUN python -m venv /opt/abstain
ENV PATH=/opt/abstain/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir .

# ---------------------------------------------------------------- build (demo model)
FROM build AS build-demo
# A compiler for llama.cpp's llama-server; it stays in this stage and never reaches an image.
# Debian's versions are pinned by the base image's release, hence no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
# A native build uses AMX tile instructions that fault on some virtual machines: build
# for AVX2/FMA instead (the Makefile's flags).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# The project itself with an extra, not a registry package: its pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[local]"
# llama-server from the llama.cpp sources in llama-cpp-python's sdist (MIT), static, into
# the virtualenv's bin; the layer is the build cache. A step of its own, so that the
# install line stays the tested one (tests/deploy/test_manifests.py).
# hadolint ignore=DL3059
RUN python -m proxy.local_build --prefix /opt/abstain/bin --no-cache

# -------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 abstain \
 && useradd --system --uid 10001 --gid abstain --home-dir /home/abstain \
      --create-home --shell /usr/sbin/nologin abstain
COPY --from=build /opt/abstain /opt/abstain
# Policies are baked in as examples; deployments mount their own over /etc/abstain
# (a directory, not a single file, so that the proxy sees updates and reloads).
COPY policies/ /etc/abstain/
COPY policies/default.yaml /etc/abstain/policy.yaml
# `abstain serve` reads ABSTAIN_* (see proxy/settings.py) and WEB_CONCURRENCY (workers).
ENV PATH=/opt/abstain/bin:$PATH \
    HOME=/home/abstain \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ABSTAIN_POLICY=/etc/abstain/policy.yaml \
    ABSTAIN_HOST=0.0.0.0 \
    ABSTAIN_PORT=8080 \
    WEB_CONCURRENCY=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/abstain
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ABSTAIN_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["abstain", "serve"]

# ----------------------------------------------------------------------------- demo
# The proxy plus Gemma 3 270M served by llama.cpp's llama-server: `docker run -p 8080:8080`
# starts both (`abstain up`), and the compose file runs the model alone from it.
FROM runtime AS demo
USER 0
# llama-server's OpenMP runtime (the rest of it is linked in statically).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-demo /opt/abstain /opt/abstain
USER 10001:10001
# Assemble the GGUF from the package's chunks at build time, not at every start.
RUN python -c "from proxy.local_model import model_path; print(model_path())"
EXPOSE 8081
ENTRYPOINT ["abstain"]
CMD ["up", "--host", "0.0.0.0", "--policy", "/etc/abstain/policy.yaml"]
