"""A target_error threshold chosen from the tenant's feedback labels (proxy.feedback_risk)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from proxy.confidence.recalibration import Recalibration, RecalibrationRule
from proxy.confidence.risk_control import choose_threshold
from proxy.feedback_risk import FeedbackRisk
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.recalibration_store import Label, MemoryStore

POLICY = """
upstreams: {up: {base_url: "http://127.0.0.1:9/v1"}}
models: {plain: {upstream: up}}
"""

#: What the calibration's validation labels chose (rules.py puts it in ``risk``).
FROM_CALIBRATION = {"target_error": 0.2, "confidence": 0.9, "threshold": 0.6,
                    "error_bound": 0.18, "coverage": 0.3, "labels": 500,
                    "source": "facts-extra"}  # fmt: skip


def target_rule(min_labels: int = 50, refit_every: int = 20, window: int = 2000) -> Rule:
    base = parse_policy(POLICY).rule(None, "plain")
    return dataclasses.replace(
        base,
        threshold=0.6,
        risk=FROM_CALIBRATION,
        recalibrate=RecalibrationRule(min_labels=min_labels, refit_every=refit_every,
                                      window=window),
    )  # fmt: skip


def labelled(n: int, seed: int = 0) -> list[Label]:
    """Calibrated-looking labels: P spread over (0, 1), right with probability P."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, n)
    return [Label(float(q), bool(rng.uniform() < q)) for q in p]


async def fill(store: MemoryStore, labels: list[Label]) -> None:
    for label in labels:
        await store.add_label("clinic", "m", label)


async def chosen(labels: list[Label]) -> tuple[FeedbackRisk, MemoryStore, Rule]:
    """A FeedbackRisk over a store holding ``labels``, its first choice for the rule made."""
    store = MemoryStore()
    await fill(store, labels)
    risk = FeedbackRisk(store)
    rule = target_rule()
    risk.rule_for(rule, "clinic", "m", None)
    await risk.idle()
    return risk, store, rule


def test_fewer_labels_than_the_minimum_leave_the_calibrations_choice() -> None:
    async def main() -> None:
        store = MemoryStore()
        await fill(store, labelled(49))
        risk = FeedbackRisk(store)
        rule = target_rule()
        assert risk.rule_for(rule, "clinic", "m", None) is rule
        assert risk.choice("clinic", "m", rule) is None

    asyncio.run(main())


def test_with_enough_labels_the_threshold_is_chosen_from_them() -> None:
    async def main() -> None:
        store = MemoryStore()
        labels = labelled(600)
        await fill(store, labels)
        risk = FeedbackRisk(store)
        rule = target_rule()
        # The first request after the count is reached waits for nothing: refused, saying why.
        pending = risk.rule_for(rule, "clinic", "m", None)
        assert pending.threshold == 1.0
        assert pending.risk is not None and "being chosen" in str(pending.risk["reason"])
        await risk.idle()
        judged = risk.rule_for(rule, "clinic", "m", None)
        expected = choose_threshold([x.base for x in labels], [x.correct for x in labels],
                                    target_error=0.2, target_confidence=0.9)  # fmt: skip
        assert expected.threshold is not None  # 600 calibrated labels support 20 %
        assert judged.threshold == expected.threshold != rule.threshold
        assert judged.risk is not None
        assert judged.risk["labels"] == 600
        assert judged.risk["error_bound"] == pytest.approx(expected.bound, abs=1e-4)
        assert "feedback" in str(judged.risk["source"])
        assert risk.rule_for(rule, "clinic", "m", None) is judged  # reused while unchanged

    asyncio.run(main())


def test_on_the_recalibrated_scale_the_decisions_are_those_on_the_shipped_p() -> None:
    async def main() -> None:
        risk, _, rule = await chosen(labelled(600))
        recal = Recalibration(0.6, -0.8)
        judged = risk.rule_for(rule, "clinic", "m", recal)
        assert judged.risk is not None
        shipped_t = float(judged.risk["shipped_threshold"])  # type: ignore[arg-type]
        assert judged.threshold == pytest.approx(recal(shipped_t))
        for p in np.linspace(0.01, 0.99, 197):
            assert (recal(float(p)) > judged.threshold) == (p > shipped_t)

    asyncio.run(main())


def test_labels_that_support_no_threshold_refuse_every_answer() -> None:
    async def main() -> None:
        # Confident and wrong half of the time: no threshold keeps 20 %.
        risk, _, rule = await chosen([Label(0.97, i % 2 == 0) for i in range(200)])
        judged = risk.rule_for(rule, "clinic", "m", None)
        assert judged.threshold == 1.0  # though the calibration's labels allowed 0.6
        assert judged.risk is not None and judged.risk["threshold"] is None
        assert "no threshold keeps the error" in str(judged.risk["reason"])

    asyncio.run(main())


def test_a_choice_is_recomputed_after_every_refit_every_labels_from_the_window() -> None:
    async def main() -> None:
        store = MemoryStore()
        await fill(store, labelled(100, seed=1))
        risk = FeedbackRisk(store)
        rule = target_rule(min_labels=50, refit_every=20, window=100)
        risk.choice("clinic", "m", rule)
        await risk.idle()
        first = risk.choice("clinic", "m", rule)
        assert first is not None and first.labels == 100
        # 19 new labels: not yet recomputed.
        wrong = [Label(0.99, False) for _ in range(19)]
        await fill(store, wrong)
        assert risk.choice("clinic", "m", rule) is first
        await risk.idle()
        assert risk.choice("clinic", "m", rule) is first
        # The 20th: recomputed on the newest 100 labels only, 20 of them confident errors.
        await fill(store, [Label(0.99, False)])
        assert risk.choice("clinic", "m", rule) is first  # the old one answers meanwhile
        await risk.idle()
        second = risk.choice("clinic", "m", rule)
        assert second is not None and second is not first
        assert second.labels == 100
        newest = (await store.labels("clinic", "m"))[-100:]
        expected = choose_threshold([x.base for x in newest], [x.correct for x in newest],
                                    target_error=0.2, target_confidence=0.9)  # fmt: skip
        assert second.threshold == expected.threshold

    asyncio.run(main())


def test_a_rule_without_a_target_or_without_recalibration_is_left_alone() -> None:
    async def main() -> None:
        store = MemoryStore()
        await fill(store, labelled(600))
        risk = FeedbackRisk(store)
        plain = dataclasses.replace(target_rule(), risk=None)
        assert risk.rule_for(plain, "clinic", "m", None) is plain
        no_recal = dataclasses.replace(target_rule(), recalibrate=None)
        assert risk.rule_for(no_recal, "clinic", "m", None) is no_recal

    asyncio.run(main())


def test_a_count_the_labels_do_not_back_leaves_the_calibrations_choice() -> None:
    class Stale(MemoryStore):
        """A shared store whose count outlived its labels (a Redis restarted empty)."""

        def count(self, tenant: str, model: str) -> int:
            return 500

    async def main() -> None:
        store = Stale()
        await fill(store, labelled(10))
        risk = FeedbackRisk(store)
        rule = target_rule()
        assert risk.rule_for(rule, "clinic", "m", None).threshold == 1.0  # being chosen
        await risk.idle()
        assert risk.rule_for(rule, "clinic", "m", None) is rule  # 10 labels: too few

    asyncio.run(main())
