"""Unit tests of proxy.multiprocess, and of policy reload under a ConfigMap's symlink swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy import multiprocess
from proxy.policy.loading import PolicyStore
from proxy.settings import Settings


def test_prepare_directory_empties_db_files_only(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_4242.db").write_bytes(b"stale")
    (directory / "gauge_liveall_4242.db").write_bytes(b"stale")
    (directory / "notes.txt").write_text("not ours")
    env = {multiprocess.MULTIPROC_ENV: str(directory)}

    assert multiprocess.prepare_directory(env) == directory

    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
    assert env[multiprocess.MULTIPROC_ENV] == str(directory)


def test_prepare_directory_creates_one_when_unset_or_missing(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    created = multiprocess.prepare_directory(env)
    try:
        assert created.is_dir() and env[multiprocess.MULTIPROC_ENV] == str(created)
    finally:
        created.rmdir()

    missing = tmp_path / "a" / "b"
    multiprocess.prepare_directory({multiprocess.MULTIPROC_ENV: str(missing)})
    assert missing.is_dir()


def test_settings_travel_to_workers_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = Settings(
        policy=Path("/etc/abstain/policy.yaml"),
        host="0.0.0.0",
        port=9123,
        reload_interval_seconds=0,
        handle_signals=False,
        log_level="warning",
        decision_log=Path("/var/log/abstain/decisions.jsonl"),
    )
    for name, value in multiprocess.settings_environment(given).items():
        monkeypatch.setenv(name, value)
    assert Settings() == given


def test_worker_factory_refuses_to_run_without_a_metrics_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(multiprocess.MULTIPROC_ENV, raising=False)
    with pytest.raises(RuntimeError, match="--workers"):
        multiprocess.app_from_environment()


POLICY = "upstreams: {{u: {{base_url: 'http://127.0.0.1:9/v1'}}}}\nmodels: {{m: {{upstream: u}}}}\n"
POLICY += "defaults: {{threshold: {threshold}}}\n"
POLICY += "auth: {{unknown_keys: default, default_tenant: t}}\ntenants: {{t: {{}}}}\n"


def _kubelet_write(volume: Path, version: int, text: str) -> None:
    """Update ``volume`` the way the kubelet updates a ConfigMap volume (atomic writer).

    Files live in a timestamped directory; ``..data`` links to it and each key is a link
    through ``..data``. An update writes a new directory, swaps ``..data`` with a rename
    (atomic), then deletes the old directory.
    """
    new = volume / f"..2026_11_24_00_00_0{version}.{version:09d}"
    new.mkdir()
    (new / "policy.yaml").write_text(text)
    old = (volume / "..data").resolve() if (volume / "..data").exists() else None
    (volume / "..data_tmp").symlink_to(new.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    if not (volume / "policy.yaml").is_symlink():
        (volume / "policy.yaml").symlink_to("..data/policy.yaml")
    if old is not None:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def test_policy_reload_sees_a_configmap_update(tmp_path: Path) -> None:
    volume = tmp_path / "etc-abstain"
    volume.mkdir()
    _kubelet_write(volume, 1, POLICY.format(threshold=0.5))
    store = PolicyStore(volume / "policy.yaml")
    assert not store.changed()

    # Same bytes, same size: only the inode tells the files apart.
    _kubelet_write(volume, 2, POLICY.format(threshold=0.5))
    assert store.changed()
    assert store.reload()
    assert not store.changed()

    _kubelet_write(volume, 3, POLICY.format(threshold=0.9))
    assert store.changed()
    assert store.reload()
    assert store.current.rule("t", "m").threshold == 0.9
