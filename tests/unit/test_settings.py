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
    config = _uvicorn_config(object(), "127.0.0.1", 0, "info", 7)
    assert config.timeout_graceful_shutdown == 7
    assert config.access_log is False  # request lines could carry tenant traffic details
