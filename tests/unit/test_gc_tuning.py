"""The serving process's garbage-collector tuning, run in a child process: the test
process keeps Python's defaults."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, sys
from proxy.gc_tuning import tune_for_serving
before = gc.get_threshold()
tune_for_serving(int(sys.argv[1]))
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count()}))
"""


def probe(threshold: int) -> dict[str, list[int] | int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True
    )
    result: dict[str, list[int] | int] = json.loads(out.stdout)
    return result


def test_serving_freezes_what_exists_and_scans_the_young_less_often() -> None:
    got = probe(10_000)
    assert got["after"] == [10_000, *got["before"][1:]]  # type: ignore[index,misc]
    assert isinstance(got["frozen"], int) and got["frozen"] > 1_000


def test_zero_leaves_pythons_defaults() -> None:
    got = probe(0)
    assert got["after"] == got["before"]
    assert got["frozen"] == 0
