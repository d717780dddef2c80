"""Every benchmark runs as the docs run it, ``.venv/bin/python benchmarks/NAME.py``: its
``--help`` exits 0 (a script that imports a sibling without the repository root on its
path fails here, not for the newcomer who copies the command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Modules that are not scripts: the package, and the ASGI app uvicorn imports.
NOT_SCRIPTS = {"__init__.py", "floor_proxy.py"}


def test_every_benchmark_script_starts() -> None:
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name not in NOT_SCRIPTS)
    assert len(scripts) >= 10
    # Started together: each mostly waits on its imports.
    runs = {
        p.name: subprocess.Popen(
            [sys.executable, str(p), "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for p in scripts
    }
    failed = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0 or b"usage" not in out.lower():
            failed[name] = err.decode(errors="replace")[-300:]
    assert not failed, failed


def test_the_sentence_hot_path_benchmark_runs_against_the_current_code() -> None:
    """Its micro part drives the proxy's sentence classes directly: it must follow them."""
    from benchmarks.sentence_latency import micro

    rows = micro(1)
    assert len(rows) == 2 and all(value.endswith("µs/answer") for _, value in rows)
