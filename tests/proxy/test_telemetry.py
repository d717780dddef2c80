"""FastAPI's native OpenTelemetry is off unless the settings turn it on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from opentelemetry import metrics, trace

from tests.conftest import auth

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count FastAPI's lookups of the global OpenTelemetry providers."""
    seen: list[str] = []
    real_tracer, real_meter = trace.get_tracer_provider, metrics.get_meter_provider

    def tracer() -> trace.TracerProvider:
        seen.append("tracer")
        return real_tracer()

    def meter() -> metrics.MeterProvider:
        seen.append("meter")
        return real_meter()

    monkeypatch.setattr(trace, "get_tracer_provider", tracer)
    monkeypatch.setattr(metrics, "get_meter_provider", meter)
    return seen


def test_off_by_default_no_provider_is_looked_up_per_request(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    seen = lookups(monkeypatch)
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert r.status_code == 200
    assert seen == []


def test_turned_on_fastapi_looks_for_the_providers(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(opentelemetry=True)
    seen = lookups(monkeypatch)
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert r.status_code == 200
    assert "tracer" in seen
