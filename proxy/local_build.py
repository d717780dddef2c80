"""Build llama.cpp's ``llama-server`` for the embedded reference model, at install time.

::

    python -m proxy.local_build [--prefix DIR] [--force]

The sources are llama.cpp as vendored in llama-cpp-python's source distribution (MIT),
fetched from the package registry with ``pip download``, at the pinned version below.
The build is static (one binary, linked only against the C/C++ runtime and OpenMP) and
for a portable x86-64 level: ``CMAKE_ARGS`` from the environment (the Makefile and the
Dockerfile set AVX2/FMA without native tuning) or, when unset, the same flags here. The
web UI is not built and nothing is downloaded by CMake.

The binary lands in ``DIR`` (default: the ``bin`` directory of this interpreter, i.e. the
virtualenv) and in a cache keyed by version and flags (``~/.cache/abstain-proxy``), so a
fresh virtualenv on the same machine copies it instead of compiling for ten minutes.
Nothing here runs when the model is served: :mod:`proxy.local_model` only looks for the
binary.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

#: llama-cpp-python's release whose vendored llama.cpp is built (llama.cpp 0c1e570).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BINARY = "llama-server"

#: What the Makefile exports on x86-64: AVX2/FMA, no native tuning (AMX faulted on CI).
PORTABLE_X86_64 = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)

#: Only the server, statically linked, no tests/examples/web UI/HTTPS, no downloads.
BASE_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


class BuildError(RuntimeError):
    """llama-server could not be fetched or compiled."""


def flag_args(environ: Mapping[str, str] | None = None) -> list[str]:
    """The CPU flags: ``$CMAKE_ARGS`` when set, else portable x86-64 (or the compiler's
    defaults on other machines)."""
    env = os.environ if environ is None else environ
    if env.get("CMAKE_ARGS", "").strip():
        return shlex.split(env["CMAKE_ARGS"])
    if platform.machine().lower() in ("x86_64", "amd64"):
        return PORTABLE_X86_64.split()
    return ["-DGGML_NATIVE=OFF"]


def cmake_args(environ: Mapping[str, str] | None = None) -> list[str]:
    return [*BASE_CMAKE_ARGS, *flag_args(environ)]


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where built binaries are kept, one directory per version and set of flags."""
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(" ".join(cmake_args(env)).encode()).hexdigest()[:12]
    return base / "abstain-proxy" / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{key}"


def default_prefix() -> Path:
    return Path(sys.executable).parent


def _run(cmd: list[str], **kwargs: object) -> None:
    print("+", shlex.join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"{cmd[0]} failed: {exc}") from exc


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def _build_tools() -> tuple[str, str | None]:
    """cmake (installed from the registry into this environment if missing) and ninja."""
    if _tool("cmake") is None:
        _run([sys.executable, "-m", "pip", "install", "-q", "cmake>=3.21", "ninja"])
    cmake = _tool("cmake")
    if cmake is None:
        raise BuildError(
            "cmake not found; install it (apt-get install cmake, or pip install cmake)"
        )
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise BuildError("no C++ compiler found; install one (apt-get install build-essential)")
    return cmake, _tool("ninja")


def fetch_sources(workdir: Path) -> Path:
    """llama.cpp's source tree, from llama-cpp-python's sdist on the package registry."""
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    # The sdist only (its build dependencies, needed to read its metadata, may be wheels).
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
         "--no-binary", "llama-cpp-python", "--dest", str(workdir), spec]
    )  # fmt: skip
    archives = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip download {spec} produced no source archive")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(workdir, filter="data")
    trees = sorted(workdir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not trees or not (trees[0] / "CMakeLists.txt").exists():
        raise BuildError("the sdist does not contain vendor/llama.cpp")
    return trees[0]


def compile_server(source: Path, build: Path, jobs: int | None = None) -> Path:
    cmake, ninja = _build_tools()
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    _run([cmake, "-S", str(source), "-B", str(build), *generator, *cmake_args()])
    jobs = jobs or os.cpu_count() or 1
    _run([cmake, "--build", str(build), "--target", BINARY, "-j", str(jobs)])
    binary = build / "bin" / BINARY
    if not binary.exists():
        raise BuildError(f"the build finished without {binary}")
    return binary


def works(binary: Path) -> bool:
    """The binary runs on this machine (``--version`` exits 0)."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _install(binary: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(binary, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, target)


def ensure(prefix: Path | None = None, *, force: bool = False, use_cache: bool = True) -> Path:
    """``prefix/llama-server``: kept if it is this build, else copied from the cache, else
    compiled (and cached)."""
    target = (prefix or default_prefix()) / BINARY
    stamp = target.with_name(BINARY + ".build")
    wanted = f"{LLAMA_CPP_PYTHON_VERSION} {' '.join(cmake_args())}\n"
    current = target.exists() and stamp.exists() and stamp.read_text() == wanted
    if not force and current and works(target):
        print(f"{target}: up to date")
        return target
    cached = cache_dir() / BINARY
    if use_cache and not force and cached.exists() and works(cached):
        print(f"{target}: from the build cache {cached}")
        _install(cached, target)
    else:
        started = time.monotonic()
        print(f"compiling {BINARY} (llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
        with tempfile.TemporaryDirectory(prefix="abstain-llama-") as tmp:
            work = Path(tmp)
            built = compile_server(fetch_sources(work), work / "build")
            if not works(built):
                raise BuildError(f"{built} does not run on this machine")
            if use_cache:
                _install(built, cached)
            _install(built, target)
        print(f"{target}: built in {time.monotonic() - started:.0f} s")
    stamp.write_text(wanted)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.local_build", description=__doc__)
    parser.add_argument("--prefix", type=Path, help=f"default: {default_prefix()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor fill the cache")
    args = parser.parse_args(argv)
    try:
        path = ensure(args.prefix, force=args.force, use_cache=not args.no_cache)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
