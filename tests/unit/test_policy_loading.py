"""Bounded policy parsing and a reload that survives every kind of failure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from proxy.policy import loading
from proxy.policy.loading import (
    MAX_DEPTH,
    MAX_POLICY_BYTES,
    PolicyError,
    PolicyStore,
    load_policy,
    parse_policy,
)

GOOD = """
upstreams:
  up: {base_url: "http://127.0.0.1:9/v1"}
models:
  m: {upstream: up}
defaults: {threshold: 0.5, action: abstain}
"""


def alias_bomb(levels: int = 9) -> str:
    """A classic "billion laughs": ~1 KB of YAML that expands to 9**levels strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    bomb = "\n".join("      " + line for line in lines)
    return f"""
upstreams:
  up:
    litellm_model: "openai/x"
    litellm_params:
{bomb}
models:
  m: {{upstream: up}}
"""


def deep(levels: int) -> str:
    return GOOD + "extra: " + "[" * levels + "]" * levels + "\n"


def problems(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return str(info.value)


def test_an_alias_bomb_under_litellm_params_is_refused() -> None:
    assert len(alias_bomb()) < 1500
    message = problems(alias_bomb())
    assert "refused" in message
    assert "once aliases are expanded" in message


def test_modest_aliases_are_still_allowed() -> None:
    text = GOOD.replace(
        "  m: {upstream: up}", "  m: &shared {upstream: up, threshold: 0.6}\n  n: *shared"
    )
    policy = parse_policy(text)
    assert policy.rule(None, "n").threshold == 0.6
    assert policy.route("n") is not None


def test_a_recursive_alias_is_refused() -> None:
    text = GOOD.replace('up: {base_url: "http://127.0.0.1:9/v1"}', "up: &u {litellm_params: *u}")
    assert "contains it" in problems(text)


def test_deep_nesting_is_refused_before_the_recursion_limit() -> None:
    message = problems(deep(100_000))
    assert f"nested more than {MAX_DEPTH} levels deep" in message
    assert "line 7" in message  # where the nesting goes too deep


def test_nesting_within_the_limit_reaches_validation() -> None:
    # 10 levels are parsed fine; the unknown key is then what is reported.
    assert "extra" in problems(deep(10))


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "#" * MAX_POLICY_BYTES + "\n")
    with pytest.raises(PolicyError, match="larger than the limit"):
        load_policy(path)


def test_invalid_utf8_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    with pytest.raises(PolicyError, match="not valid UTF-8"):
        load_policy(path)


@pytest.fixture
def store(tmp_path: Path) -> tuple[PolicyStore, list[str]]:
    results: list[str] = []
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    return PolicyStore(path, on_reload=results.append), results


def _break_with_recursion(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    def boom(text: str, *args: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(loading, "parse_policy", boom)


def _break_unexpectedly(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    def boom(text: str, *args: object) -> object:
        raise RuntimeError("something nobody thought of")

    monkeypatch.setattr(loading, "parse_policy", boom)


BREAKAGES = {
    "invalid utf-8": lambda mp, p: p.write_bytes(b"\xff\xfe" + GOOD.encode()),
    "unreadable (a directory)": lambda mp, p: (p.unlink(), p.mkdir()),
    "missing": lambda mp, p: p.unlink(),
    "yaml syntax": lambda mp, p: p.write_text("upstreams: [unclosed\n"),
    "validation": lambda mp, p: p.write_text(GOOD + "unexpected_key: 1\n"),
    "calibration file": lambda mp, p: p.write_text(
        GOOD.replace("threshold: 0.5", "calibration: missing.json")
    ),
    "alias bomb": lambda mp, p: p.write_text(alias_bomb()),
    "too deep": lambda mp, p: p.write_text(deep(100_000)),
    "too large": lambda mp, p: p.write_text(GOOD + "#" * MAX_POLICY_BYTES),
    "recursion error": _break_with_recursion,
    "unexpected exception": _break_unexpectedly,
}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_every_failure_is_counted_and_keeps_the_old_policy(
    kind: str, store: tuple[PolicyStore, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, results = store
    old = s.current
    BREAKAGES[kind](monkeypatch, s.path)
    assert s.changed() or kind in {"recursion error", "unexpected exception"}
    assert s.reload() is False
    assert results == ["failure"]
    assert s.current is old
    assert s.last_error and str(s.path) in s.last_error
    assert not s.changed()  # the broken file is not retried until it changes again


def test_after_a_failure_the_next_valid_file_is_loaded(
    store: tuple[PolicyStore, list[str]],
) -> None:
    s, results = store
    s.path.write_bytes(b"\xff\xfe")
    assert s.reload() is False
    s.path.write_text(GOOD.replace("threshold: 0.5", "threshold: 0.8"))
    assert s.changed()
    assert s.reload() is True
    assert results == ["failure", "success"]
    assert s.current.rule(None, "m").threshold == 0.8
    assert s.last_error is None


def test_reload_async_parses_in_a_worker_thread(
    store: tuple[PolicyStore, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, results = store
    threads: list[int] = []
    real = loading.load_policy

    def spy(path: str | Path) -> object:
        threads.append(threading.get_ident())
        return real(path)

    monkeypatch.setattr(loading, "load_policy", spy)
    s.path.write_text(GOOD.replace("threshold: 0.5", "threshold: 0.8"))

    async def run() -> tuple[bool, int]:
        return await s.reload_async(), threading.get_ident()

    ok, loop_thread = asyncio.run(run())
    assert ok and results == ["success"]
    assert threads and threads[0] != loop_thread
    assert s.current.rule(None, "m").threshold == 0.8
