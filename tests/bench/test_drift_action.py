"""benchmarks/drift_action.py asks the drift monitor as the pipeline does: a stream far
from the reference is judged drifted from the 30th answer on, an in-domain one never."""

from __future__ import annotations

import numpy as np

from benchmarks.drift_action import stream
from proxy.confidence import drift
from proxy.confidence.calibration import Calibration, Platt

IN_DOMAIN = [-1.5 + i / 100 for i in range(100)]


def _calibration() -> Calibration:
    reference = drift.build_reference({"min_logprob": IN_DOMAIN}, ["min_logprob"])
    return Calibration("min_logprob", Platt("min_logprob", 2.0, 2.0), reference=reference)


def test_a_drifted_stream_is_judged_drifted_from_its_30th_answer_on() -> None:
    scores = [{"min_logprob": -0.6}] * 300  # in range, all in the top decile
    p = np.full(300, 0.69)
    order = np.random.default_rng(0).permutation(300)
    drifted = stream(scores, p, _calibration(), order)
    assert not drifted[order[:30]].any() and drifted[order[30:]].all()


def test_an_in_domain_stream_keeps_its_threshold() -> None:
    scores = [{"min_logprob": v} for v in IN_DOMAIN * 4]
    p = np.full(len(scores), 0.6)
    order = np.random.default_rng(1).permutation(len(scores))
    assert not stream(scores, p, _calibration(), order).any()
    # The same answers sorted: every window of recent answers sits at one end of the
    # reference, which is drift.
    assert stream(scores, p, _calibration(), np.arange(len(scores))).any()
