"""benchmarks/drift_action.py judges a stream as the pipeline does: at t until the
window of 200 answers reads drifted, at ood_threshold from then on."""

from __future__ import annotations

import numpy as np

from benchmarks.drift_action import stream
from proxy.confidence import drift
from proxy.confidence.calibration import Calibration, Platt

IN_DOMAIN = [-1.5 + i / 100 for i in range(100)]


def _calibration() -> Calibration:
    reference = drift.build_reference({"min_logprob": IN_DOMAIN}, ["min_logprob"])
    return Calibration("min_logprob", Platt("min_logprob", 2.0, 2.0), reference=reference)


def test_a_drifted_stream_is_judged_at_ood_threshold_from_its_200th_answer_on() -> None:
    scores = [{"min_logprob": -0.6}] * 300  # in range, all in the top decile
    p = np.full(300, 0.69)
    order = np.random.default_rng(0).permutation(300)
    at = stream(scores, p, _calibration(), order, 0.5, 0.75)
    assert set(at[order[:200]]) == {0.5} and set(at[order[200:]]) == {0.75}


def test_an_in_domain_stream_keeps_its_threshold() -> None:
    scores = [{"min_logprob": v} for v in IN_DOMAIN * 4]
    p = np.full(len(scores), 0.6)
    at = stream(scores, p, _calibration(), np.arange(len(scores)), 0.5, 0.75)
    assert set(at) == {0.5}
