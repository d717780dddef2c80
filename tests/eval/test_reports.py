"""The table builder and its Markdown / JSON writers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from proxy.evaluation.reports import EvalReport, table_rows, to_markdown, write_report

CORRECT = [1, 1, 0, 0]
CONFIDENCE = [0.95, 0.6, 0.8, 0.1]


def _report() -> EvalReport:
    alone, proxy = table_rows(CORRECT, [0.0, 0.75], CONFIDENCE)
    return EvalReport("set", "m", "proxy", 4, (0.0, 0.75), alone, proxy, {"AUROC": 0.75})


def test_rows_follow_the_proxy_rule() -> None:
    alone, proxy = table_rows(CORRECT, [0.5, 0.75, 0.9], CONFIDENCE)
    assert proxy is not None
    assert all(r is not None and r.abstention_rate == 0.0 for r in alone)
    # t=.5 answers .95 .6 .8 (1 wrong); t=.75 answers .95 .8 (1 wrong); t=.9 only .95
    got = [(r.abstention_rate, r.accuracy, r.error_rate) for r in proxy if r is not None]
    assert got == [(0.25, 0.5, 0.25), (0.5, 0.25, 0.25), (0.75, 0.25, 0.0)]
    assert proxy[1] is not None and proxy[1].score == pytest.approx((1 - 3) / 4)


def test_withheld_answers_make_only_the_rows_that_need_them_unavailable() -> None:
    # The answer at confidence .6 was replaced by an abstention message upstream.
    withheld = [False, True, False, False]
    alone, proxy = table_rows(CORRECT, [0.5, 0.75], CONFIDENCE, withheld)
    assert alone == (None, None)
    assert proxy is not None and proxy[0] is None and proxy[1] is not None


def test_markdown_has_one_row_per_threshold_and_the_costs() -> None:
    md = to_markdown(_report())
    assert "| 0 | 0 | 0.0% | 50.0% | 50.0% | 50.0% | +0.500 |" in md
    assert "| 0.75 | 3 |" in md
    assert "| AUROC | 0.750 |" in md


def test_json_writes_nan_as_null(tmp_path: Path) -> None:
    report = EvalReport("set", "m", "proxy", 2, (0.9,), *table_rows([1, 0], [0.9], [0.1, 0.2]))
    md, js = write_report(report, tmp_path / "out")
    data = json.loads(js.read_text())
    row = data["table"][0]["proxy"]
    assert row["abstention_rate"] == 1.0 and row["wrong_of_answered"] is None
    assert data["table"][0]["wrong_costs"] == pytest.approx(9.0)
    assert md.read_text().count("\n| 0.9 |") == 1
    assert math.isclose(data["table"][0]["alone"]["penalised_score"], 0.5 - 0.5 * 9)


def test_charts_are_png(tmp_path: Path) -> None:
    from proxy.evaluation import plots

    a = plots.reliability_diagram(CONFIDENCE, CORRECT, tmp_path / "r.png", thresholds=[0.75])
    b = plots.risk_coverage_chart(CONFIDENCE, CORRECT, tmp_path / "c.png", thresholds=[0.75])
    for path in (a, b):
        assert path.read_bytes()[:4] == b"\x89PNG"
