"""Process settings come from ABSTAIN_* variables and reach uvicorn."""

from __future__ import annotations

import pytest

from proxy.cli import _uvicorn_config
from proxy.settings import Settings


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSTAIN_GRACEFUL_SHUTDOWN_SECONDS", "40")
    monkeypatch.setenv("ABSTAIN_MAX_BODY_BYTES", "65536")
    settings = Settings()
    assert settings.graceful_shutdown_seconds == 40
    assert settings.max_body_bytes == 65536


def test_unknown_or_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSTAIN_PORT", "99999")
    with pytest.raises(ValueError):
        Settings()


def test_the_drain_time_reaches_uvicorn() -> None:
    config = _uvicorn_config(object(), Settings(graceful_shutdown_seconds=7))
    assert config.timeout_graceful_shutdown == 7
    assert config.access_log is False  # request lines could carry tenant traffic details


def test_client_bounds_reach_uvicorn() -> None:
    settings = Settings(client_header_timeout_seconds=3, max_connections=50)
    config = _uvicorn_config(object(), settings)
    assert config.limit_concurrency == 50
    assert config.client_header_timeout == 3
    assert getattr(config.http, "__name__", "") == "HeaderTimeoutProtocol"
