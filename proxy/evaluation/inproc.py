"""The proxy, in-process, for ``abstain eval``: the real app, reached without a socket.

``abstain eval --policy FILE`` builds the proxy with :func:`proxy.app.create_app` from a
copy of the policy, runs its lifespan, and sends the questions through
``httpx.ASGITransport``: the same routes, pipeline, calibration and decision as
``abstain serve``, only without uvicorn in between. The copy differs from the file in
these ways, all so that one run yields the whole table:

* every ``action`` becomes ``annotate``, so the model's answer always comes back with
  the proxy's verdict; the table then applies the proxy's own rule (abstain iff
  P(correct) ≤ t) to the returned confidence at each threshold t;
* ``--calibration`` (when given) replaces the calibration for every rule, and relative
  calibration paths are made absolute (the copy lives in a temporary directory);
* ``--upstream-url`` (when given) replaces the ``base_url`` of the model's upstream;
* for a multi-claim question set, every rule judges ``granularity: sentence``: the
  report's rows are sentences, so each needs its own verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

_LAYERS = ("models", "tenants")


def _rule_layers(data: dict[str, Any]) -> list[dict[str, Any]]:
    layers = [data.setdefault("defaults", {})]
    for key in _LAYERS:
        layers += [v for v in (data.get(key) or {}).values() if isinstance(v, dict)]
    return layers


def derived_policy(
    policy: Path,
    *,
    model: str,
    calibration: Path | None = None,
    upstream_url: str | None = None,
    granularity: str | None = None,
) -> dict[str, Any]:
    """The policy data the in-process proxy runs with (see the module docstring)."""
    data = yaml.safe_load(policy.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{policy}: the policy must be a mapping")
    base = policy.resolve().parent
    for layer in _rule_layers(data):
        if "action" in layer or layer is data["defaults"]:
            layer["action"] = "annotate"
        if calibration is not None and (layer is data["defaults"] or "calibration" in layer):
            layer["calibration"] = str(calibration.resolve())
        elif layer.get("calibration"):
            layer["calibration"] = str((base / layer["calibration"]).resolve())
        if granularity is not None and (layer is data["defaults"] or "granularity" in layer):
            layer["granularity"] = granularity
    if upstream_url is not None:
        route = (data.get("models") or {}).get(model)
        if not isinstance(route, dict) or route.get("upstream") not in (
            data.get("upstreams") or {}
        ):
            raise ValueError(f"{policy}: no model {model!r} with an upstream to point elsewhere")
        data["upstreams"][route["upstream"]]["base_url"] = upstream_url
    return data


def policy_tag(data: dict[str, Any]) -> str:
    """A cache tag naming this policy and the content of every calibration it loads.

    Where an upstream is served (its ``base_url``) is left out, as it is for direct
    answers, which are keyed by the request naming the model: a model restarted on
    another port (``--upstream-url``) is the same model, and its answers stay cached.
    """
    upstreams = {
        name: {k: v for k, v in spec.items() if k != "base_url"} if isinstance(spec, dict) else spec
        for name, spec in (data.get("upstreams") or {}).items()
    }
    h = hashlib.sha256(yaml.safe_dump({**data, "upstreams": upstreams}, sort_keys=True).encode())
    for layer in _rule_layers(data):
        ref = layer.get("calibration")
        if ref and Path(ref).exists():
            h.update(Path(ref).read_bytes())
    return "proxy:" + h.hexdigest()[:16]


@contextlib.asynccontextmanager
async def proxy_transport(
    data: dict[str, Any], *, upstream_transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[httpx.AsyncBaseTransport]:
    """A transport into a running in-process proxy built from policy ``data``."""
    from prometheus_client import CollectorRegistry

    from proxy.app import create_app
    from proxy.settings import Settings

    with tempfile.TemporaryDirectory(prefix="abstain-eval-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        settings = Settings(policy=path, handle_signals=False, reload_interval_seconds=0)
        app = create_app(settings, transport=upstream_transport, registry=CollectorRegistry())
        async with app.router.lifespan_context(app):
            yield httpx.ASGITransport(app=app)
