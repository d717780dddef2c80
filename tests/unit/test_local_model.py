"""The local model server's command line, chat frame and build settings; and the
logprob shape llama-server answers with, read by the proxy's parser.

No model runs here: tests/e2e/test_real_model.py drives the real server.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest

from proxy import local_build, local_model
from proxy.confidence.logprobs import scores_from_choice, token_logprobs
from proxy.evaluation.prompts import get_template

ROOT = Path(__file__).resolve().parents[2]


def command(**kwargs: Any) -> list[str]:
    options: dict[str, Any] = {"binary": Path("/opt/llama-server"), "model": Path("/m.gguf")}
    return local_model.server_command(8081, **options, **kwargs)


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_server_command_serves_the_alias_on_all_cores_with_parallel_slots() -> None:
    cmd = command()
    assert cmd[0] == "/opt/llama-server"
    assert flag(cmd, "--model") == "/m.gguf"
    assert flag(cmd, "--alias") == local_model.MODEL_ALIAS
    assert flag(cmd, "--port") == "8081" and flag(cmd, "--host") == "127.0.0.1"
    assert flag(cmd, "--threads") == str(local_model.default_threads())
    assert flag(cmd, "--parallel") == str(local_model.DEFAULT_SLOTS)
    # The context is shared by the slots: each keeps DEFAULT_CONTEXT tokens.
    assert int(flag(cmd, "--ctx-size")) == local_model.DEFAULT_CONTEXT * local_model.DEFAULT_SLOTS
    assert Path(flag(cmd, "--chat-template-file")) == local_model.CHAT_TEMPLATE
    assert "--jinja" in cmd and "--no-webui" in cmd
    # The answer line ends the answer where the request names no stop of its own.
    assert flag(cmd, "--reverse-prompt") == "\n"
    # Nothing is fetched at run time.
    assert not any(a.startswith(("-hf", "--hf", "-mu", "--model-url")) for a in cmd)


def test_threads_slots_and_stops_are_settable() -> None:
    cmd = command(threads=3, slots=2, context=1024, stop_strings=())
    assert flag(cmd, "--threads") == "3" and flag(cmd, "--threads-batch") == "3"
    assert flag(cmd, "--parallel") == "2" and flag(cmd, "--ctx-size") == "2048"
    assert "--reverse-prompt" not in cmd


def test_up_and_local_model_take_the_model_flags() -> None:
    from proxy.cli import build_parser

    up = build_parser().parse_args(["up", "--threads", "2", "--slots", "6"])
    assert (up.threads, up.slots) == (2, 6)
    local = build_parser().parse_args(["local-model", "--slots", "1", "--context", "512"])
    assert (local.threads, local.slots, local.context) == (None, 1, 512)


def test_the_binary_is_found_beside_python_or_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("")
    monkeypatch.setenv(local_model.BINARY_ENV, str(binary))
    assert local_model.server_binary() == binary
    monkeypatch.setenv(local_model.BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(local_model.LocalModelError, match="not a file"):
        local_model.server_binary()


def test_a_missing_binary_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(local_model.BINARY_ENV, raising=False)
    monkeypatch.setattr(local_model.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(local_model.LocalModelError, match="make install"):
        local_model.server_binary()


# ---------------------------------------------------------------------- the chat frame


def render(messages: list[dict[str, object]]) -> str:
    env = jinja2.Environment(keep_trailing_newline=False)
    template = env.from_string(local_model.CHAT_TEMPLATE.read_text())
    return template.render(messages=messages, add_generation_prompt=True)


def test_a_chat_question_is_the_prompt_the_calibration_was_fitted_on() -> None:
    question = "What is the capital of Australia?"
    expected = get_template("qa-fewshot").prompt(question)
    assert render([{"role": "user", "content": question}]) == expected
    # A system message is not shown to a base model; surrounding blanks are trimmed.
    system = {"role": "system", "content": "You are a helpful assistant."}
    assert render([system, {"role": "user", "content": f"  {question}\n"}]) == expected


def test_earlier_turns_become_questions_and_answers_of_the_frame() -> None:
    prompt = render(
        [
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": " Rome"},
            {"role": "user", "content": [{"type": "text", "text": "And of France?"}]},
        ]
    )
    assert prompt.endswith("Q: What is the capital of Italy?\nA: Rome\nQ: And of France?\nA:")


def test_the_template_ships_as_package_data() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["package-data"]["proxy"]
    assert local_model.CHAT_TEMPLATE.name in data
    # llama-server replaces llama-cpp-python: nothing installs or imports it any more.
    assert not any(
        "llama-cpp-python" in d for d in project["project"]["optional-dependencies"]["local"]
    )
    sources = [p.read_text() for p in (ROOT / "proxy").rglob("*.py")]
    assert not any(re.search(r"^\s*(import|from) llama_cpp", s, re.M) for s in sources)


# ------------------------------------------------------------------------- the build


def test_the_build_uses_the_makefile_flags_and_downloads_nothing() -> None:
    makefile = (ROOT / "Makefile").read_text()
    flags = re.search(r"CMAKE_ARGS \?= (.+)", makefile)
    assert flags and flags.group(1).strip() == local_build.PORTABLE_X86_64
    args = local_build.cmake_args({"CMAKE_ARGS": flags.group(1)})
    assert "-DGGML_NATIVE=OFF" in args and "-DBUILD_SHARED_LIBS=OFF" in args
    # No web UI from a Hugging Face bucket, no HTTPS client.
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in args and "-DLLAMA_OPENSSL=OFF" in args
    assert "python -m proxy.local_build" in makefile.replace("$(PY) -m", "python -m")


def test_the_build_cache_is_keyed_by_version_and_flags(tmp_path: Path) -> None:
    a = local_build.cache_dir({"XDG_CACHE_HOME": str(tmp_path), "CMAKE_ARGS": "-DX=1"})
    b = local_build.cache_dir({"XDG_CACHE_HOME": str(tmp_path), "CMAKE_ARGS": "-DX=2"})
    assert a != b and a.parent == b.parent == tmp_path / "abstain-proxy"
    assert local_build.LLAMA_CPP_PYTHON_VERSION in a.name


# ---------------------------------------------------- llama-server's logprob shape


def _token(text: str, lp: float, alts: list[tuple[str, float]]) -> dict[str, object]:
    return {
        "id": 1,
        "token": text,
        "bytes": list(text.encode()),
        "logprob": lp,
        "top_logprobs": [
            {"id": 2, "token": t, "bytes": list(t.encode()), "logprob": v} for t, v in alts
        ],
    }


def test_llama_servers_completion_logprobs_read_like_openais() -> None:
    # llama-server answers /v1/completions with the chat shape ("content": per-token
    # objects, with ids and bytes) instead of OpenAI's tokens/token_logprobs lists.
    server = {
        "content": [
            _token(" Par", -0.25, [(" Par", -0.25), (" Lyon", -2.0)]),
            _token("is", -0.01, [("is", -0.01), ("ish", -5.0)]),
        ]
    }
    openai = {
        "tokens": [" Par", "is"],
        "token_logprobs": [-0.25, -0.01],
        "top_logprobs": [{" Par": -0.25, " Lyon": -2.0}, {"is": -0.01, "ish": -5.0}],
    }
    assert token_logprobs(server) == token_logprobs(openai)
    assert scores_from_choice(server) == scores_from_choice(openai)


def test_a_zero_probability_from_llama_server_is_a_very_negative_logprob() -> None:
    # It writes the lowest float instead of -inf (JSON has no infinity).
    lowest = -3.4028234663852886e38
    lps, tops = token_logprobs({"content": [_token("x", -0.5, [("x", -0.5), ("y", lowest)])]})
    assert lps == [-0.5] and tops == [[-0.5, lowest]]
