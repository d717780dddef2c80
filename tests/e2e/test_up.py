"""`abstain up`, the command behind `make run`: model + proxy, ready banner, clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from proxy import local_model
from tests.e2e.procs import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_starts_both_prints_the_base_url_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    port, model_port = free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    default = (ROOT / "policies" / "default.yaml").read_text()
    policy.write_text(default.replace("127.0.0.1:8081", f"127.0.0.1:{model_port}"))
    # The default policy may point at a calibration file next to it.
    for cal in (ROOT / "policies").glob("calibration"):
        (tmp_path / "calibration").symlink_to(cal)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "up", "--policy", str(policy),
         "--port", str(port), "--model-port", str(model_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    banner = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(banner)
        assert f"http://127.0.0.1:{port}/v1" in text, text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(
            model=local_model.MODEL_ALIAS,
            prompt="Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of France?\nA:",
            max_tokens=8, stop=["\n"], temperature=0,
        )  # fmt: skip
        assert "Paris" in r.choices[0].text
        assert r.model_extra["abstention"]["decision"] == "answer"
        # The README's first request: a question the model cannot know is abstained.
        r = client.completions.create(
            model=local_model.MODEL_ALIAS, max_tokens=16, stop=["\n"], temperature=0,
            prompt="Q: What is the capital of Italy?\nA: Rome\nQ: Who discovered hafnium?\nA:",
        )  # fmt: skip
        assert r.choices[0].text == "I don't know."
        assert r.model_extra["abstention"]["decision"] == "abstain"
        # A chat question gets the base model's answer, judged.
        chat = client.chat.completions.create(
            model=local_model.MODEL_ALIAS, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )  # fmt: skip
        assert "Paris" in (chat.choices[0].message.content or "")
        assert chat.model_extra["abstention"]["confidence"] is not None
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not port_open(port)
    assert not port_open(model_port)
