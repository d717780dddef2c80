"""A ``target_error`` threshold chosen from the tenant's own feedback, once it has enough.

A rule's ``target_error`` is first met from the calibration's validation labels
(:mod:`proxy.confidence.risk_control`, chosen when the policy loads). Those labels come
from the traffic the calibration was fitted for; the guarantee holds for traffic like
them. Once a tenant has sent ``recalibrate_min_labels`` feedback labels for a model, its
own traffic is the better evidence, and :class:`FeedbackRisk` chooses the threshold from
the newest ``recalibrate_window`` of them instead, with the same test (Clopper-Pearson
bounds over the fixed grid, Bonferroni-combined).

The test runs on the **shipped** calibration's P(correct), which is what each label
records (:mod:`proxy.online_recalibration`): no map fitted on these labels enters the
choice, so the bound keeps its finite-sample meaning. A threshold t on the shipped P is
the threshold recal(t) on the recalibrated P the verdict reports, since the
recalibration is monotone (:meth:`FeedbackRisk.rule_for` maps it), so the decision
"answer when P(correct) > threshold" is unchanged in form.

When no grid threshold qualifies on the tenant's labels, every answer is refused, even if
the calibration's labels would have allowed one: they describe other traffic. While the
first choice for a key is being computed (after a restart, or when the count first
reaches the minimum), answers are refused too, for the fraction of a second it takes.
A choice is recomputed in a worker thread after every ``recalibrate_every`` new labels.

Which answers get feedback matters: the bound is for traffic like the labelled answers.
Labels that clients send only for answers they happened to check, in a way that depends
on whether the answer was right, make it optimistic (docs/calibration.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.confidence.recalibration import Recalibration
from proxy.confidence.risk_control import RiskChoice, choose_threshold
from proxy.online_recalibration import recalibration_model
from proxy.policy.rules import Policy, Rule
from proxy.recalibration_store import Label, RecalibrationStore

log = logging.getLogger("abstain.recalibration")

#: (tenant, model as stored, target error, confidence, window, min_labels)
_Key = tuple[str, str, float, float, int, int]


@dataclass(frozen=True, slots=True)
class _Chosen:
    #: None: fewer labels than the minimum could be read (a shared store that lost them)
    choice: RiskChoice | None
    #: the store's label count the choice was computed at
    count: int


class FeedbackRisk:
    """Per tenant and model: the threshold a ``target_error`` rule's feedback supports."""

    def __init__(self, store: RecalibrationStore) -> None:
        self.store = store
        self._chosen: dict[_Key, _Chosen] = {}
        self._computing: set[_Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: per (tenant, model): the last (rule, map, choice) and the rule judged with for
        #: them, so that requests under an unchanged choice share one rule
        self._rules: dict[tuple[str, str], tuple[Rule, Recalibration | None, RiskChoice, Rule]] = {}

    def choice(self, tenant: str, model: str, rule: Rule) -> RiskChoice | None:
        """The choice from the tenant's feedback for this rule, or None while it has fewer
        labels than ``recalibrate_min_labels`` (the calibration's labels decide then).

        Never waits: a choice due is computed in the background, and the previous one
        (or, for the first, a refusal that says so) answers meanwhile.
        """
        target = rule.risk
        settings = rule.recalibrate
        if target is None or settings is None:
            return None
        count = self.store.count(tenant, model)
        if count < settings.min_labels:
            return None
        key = (tenant, model, float(target["target_error"]), float(target["confidence"]),
               settings.window, settings.min_labels)  # fmt: skip
        chosen = self._chosen.get(key)
        if (chosen is None or abs(count - chosen.count) >= settings.refit_every) and (
            key not in self._computing
        ):
            self._computing.add(key)
            task = asyncio.get_running_loop().create_task(self._compute(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if chosen is None:
            return _pending(key, count)
        return chosen.choice

    def rule_for(self, rule: Rule, tenant: str, model: str, recal: Recalibration | None) -> Rule:
        """``rule`` with its threshold from the tenant's feedback when it has enough labels
        (on the scale of the P(correct) the verdict reports), else ``rule`` itself."""
        choice = self.choice(tenant, model, rule)
        if choice is None:
            return rule
        last = self._rules.get((tenant, model))
        if last is not None and last[0] is rule and last[1] is recal and last[2] is choice:
            return last[3]
        if choice.threshold is None:
            threshold = 1.0  # refuse every answer rather than guess
        else:
            threshold = recal(choice.threshold) if recal is not None else choice.threshold
        risk = choice.to_dict() | {"shipped_threshold": choice.threshold}
        if choice.threshold is None:
            risk["reason"] = _reason(choice)
        judged = dataclasses.replace(rule, threshold=threshold, risk=risk)
        self._rules[(tenant, model)] = (rule, recal, choice, judged)
        return judged

    async def _compute(self, key: _Key) -> None:
        tenant, model, target, confidence, window, min_labels = key
        try:
            labels = await self.store.labels(tenant, model, limit=window)
            choice = None
            if len(labels) >= min_labels:  # else the count was stale: the calibration decides
                choice = await asyncio.to_thread(
                    choose_from_feedback, labels, target, confidence, tenant, model
                )
            self._chosen[key] = _Chosen(choice, self.store.count(tenant, model))
        except Exception:  # the previous choice (or the refusal) stays in force
            log.exception("choosing a target_error threshold from feedback failed (%s)", key)
        finally:
            self._computing.discard(key)

    async def idle(self) -> None:
        """Wait for the choices being computed (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def choose_from_feedback(
    labels: Sequence[Label], target_error: float, confidence: float, tenant: str, model: str
) -> RiskChoice:
    """The grid threshold for ``target_error`` that ``labels`` (shipped P, correct) support:
    what the proxy serves, and what ``abstain check-policy --recalibration-dir`` prints."""
    return choose_threshold(
        [label.base for label in labels],
        [label.correct for label in labels],
        target_error=target_error,
        target_confidence=confidence,
        source=f"feedback ({len(labels)} labels of tenant {tenant}, {model})",
    )


async def report(policy: Policy, store: RecalibrationStore) -> list[str]:
    """For each ``target_error`` rule whose tenant has stored enough feedback: the
    threshold the proxy serves from it instead (``abstain check-policy
    --recalibration-dir``), or how many labels there are when too few."""
    lines = []
    for tenant in (None, *policy.spec.tenants):
        for model in policy.model_names:
            rule = policy.rule(tenant, model)
            settings = rule.recalibrate
            if rule.risk is None or settings is None:
                continue
            name = recalibration_model(model, rule.granularity)
            count = store.count(rule.tenant, name)
            where = f"models.{model}" + (f" for tenant {tenant}" if tenant else "")
            if count < settings.min_labels:
                if count:
                    lines.append(
                        f"{where}: {count} feedback labels, fewer than recalibrate_min_labels "
                        f"({settings.min_labels}): the threshold above stands"
                    )
                continue
            labels = await store.labels(rule.tenant, name, limit=settings.window)
            target = float(rule.risk["target_error"])
            confidence = float(rule.risk["confidence"])
            choice = choose_from_feedback(labels, target, confidence, rule.tenant, name)
            if choice.threshold is None or choice.bound is None:
                lines.append(f"{where}: from feedback: {choice.reason}")
            else:
                lines.append(
                    f"{where}: from feedback: target_error {choice.target_error:g} at "
                    f"{choice.confidence:.0%} -> threshold {choice.threshold:g} on the shipped "
                    f"P(correct) (error bound {choice.bound:.3f}, answers "
                    f"{choice.coverage:.1%} of {choice.labels} labelled answers)"
                )
    return sorted(set(lines))


def _pending(key: _Key, count: int) -> RiskChoice:
    tenant, model, target, confidence, _, _ = key
    return RiskChoice(
        threshold=None,
        target_error=target,
        confidence=confidence,
        labels=count,
        coverage=0.0,
        bound=None,
        observed_error=None,
        tests=(),
        source=f"feedback (being chosen from {count} labels of tenant {tenant}, {model})",
    )


def _reason(choice: RiskChoice) -> str:
    if choice.tests:
        return choice.reason or ""
    return (
        f"the threshold for target_error {choice.target_error:g} is being chosen from "
        f"{choice.labels} feedback labels: answers are refused until it is"
    )
