"""Online recalibration: feedback labels in, a recalibration swapped in, per tenant and model.

:class:`OnlineRecalibration` is what the pipeline and the feedback handler call: it
hands the judge the map in service, turns feedback into labels in a
:class:`~proxy.recalibration_store.RecalibrationStore`, and refits in the background
(:func:`asyncio.to_thread`: a fit never blocks a request) when a rule's
``recalibrate_*`` settings say so. The fitting and the swap rule are
:mod:`proxy.confidence.recalibration`.

A label is the **shipped** calibration's P(correct) for the answer (or sentence), never
the recalibrated confidence the client saw: each fit starts again from the shipped map,
so maps do not stack. The judge keeps the shipped P on the verdict
(``Verdict.shipped_confidence``), the feedback memory remembers it with the response
(in Redis too, so it is exact whichever pod gets the feedback), and feedback hands it
here. Answers and sentences learn apart (:func:`recalibration_model`).

With ``ABSTAIN_REDIS_URL`` the store is
:class:`proxy.shared_state.redis_recalibration.RedisRecalibrationStore` (labels as a list
per key, the map as one value swapped with a version check, ``current`` served from a
local copy polled every second), shared by every pod. Which label count last
triggered a refit stays per process: each pod may refit; the compare-and-swap keeps one
winner per version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from proxy.confidence.recalibration import Recalibration, RecalibrationRule, refit
from proxy.metrics import Metrics
from proxy.recalibration_store import Label, RecalibrationStore
from proxy.shared_state.memory import SharedStateUnavailable

log = logging.getLogger("abstain.recalibration")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_SENTENCES = " (sentences)"


def recalibration_model(model: str, granularity: str) -> str:
    """The name labels and a map are kept under: the model's, or ``<model> (sentences)``
    for a rule judged by sentence. Labels of answers and of sentences must not mix: an
    answer is right only when all its sentences are."""
    return model if granularity == "answer" else f"{model}{_SENTENCES}"


def served_model(name: str) -> str:
    """The model a name of :func:`recalibration_model` belongs to."""
    return name.removesuffix(_SENTENCES)


class OnlineRecalibration:
    """The maps in service for the judge, and feedback turned into labels and refits."""

    def __init__(self, store: RecalibrationStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self._fitting: set[tuple[str, str]] = set()
        self._last_fit: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        if metrics is not None:
            for tenant, model in store.known():
                self._show(tenant, model, store.current(tenant, model))

    def current(self, tenant: str, model: str) -> Recalibration | None:
        return self.store.current(tenant, model)

    async def feedback(
        self,
        rule: RecalibrationRule | None,
        tenant: str,
        model: str,
        base: float | None,
        correct: bool,
    ) -> None:
        """Store the label of one judged answer (or sentence): ``base`` is the shipped
        calibration's P(correct) for it. Start a refit when one is due."""
        if rule is None or base is None:
            return
        label = Label(base, correct, _now())
        try:
            n = await self.store.add_label(tenant, model, label)
        except OSError as exc:  # the feedback itself is recorded; only the label is lost
            log.error("cannot store a recalibration label for %s/%s: %s", tenant, model, exc)
            return
        if self.metrics is not None:
            self.metrics.recalibration_labels.labels(tenant, model).set(n)
        key = (tenant, model)
        if n < self._last_fit.get(key, 0):  # the store lost labels (a Redis restarted empty)
            self._last_fit[key] = 0
        due = n >= rule.min_labels and n - self._last_fit.get(key, 0) >= rule.refit_every
        if due and key not in self._fitting:
            self._fitting.add(key)
            self._last_fit[key] = n
            task = asyncio.get_running_loop().create_task(self._refit(rule, tenant, model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refit(self, rule: RecalibrationRule, tenant: str, model: str) -> None:
        result = "failed"
        try:
            labels = await self.store.labels(tenant, model, limit=rule.window)
            current = self.store.current(tenant, model)
            outcome = await asyncio.to_thread(
                refit,
                [label.base for label in labels],
                [label.correct for label in labels],
                current,
                min_labels=rule.min_labels,
                holdout=rule.holdout,
                prior_strength=rule.prior_strength,
                window=rule.window,
                fitted_at=_now(),
            )
            result = "kept"
            new = outcome.recalibration if outcome.swapped else None
            if new is not None and await self.store.swap(tenant, model, new):
                result = "swapped"
                log.info(
                    "recalibration %s for tenant %s, model %s: %s (%s)",
                    new.version,
                    tenant,
                    model,
                    outcome.reason,
                    outcome.evidence,
                )
                if self.metrics is not None:
                    self.metrics.recalibration_swaps.labels(tenant, model).inc()
                    self._show(tenant, model, new, current)
        except SharedStateUnavailable:  # Redis: counted and logged by the shared state
            result = "failed"
        except Exception:
            log.exception("recalibration refit failed for tenant %s, model %s", tenant, model)
        finally:
            self._fitting.discard((tenant, model))
            if self.metrics is not None:
                self.metrics.recalibration_refits.labels(tenant, model, result).inc()

    def _show(
        self,
        tenant: str,
        model: str,
        now: Recalibration | None,
        before: Recalibration | None = None,
    ) -> None:
        assert self.metrics is not None
        info = self.metrics.recalibration_info
        if before is not None:
            info.labels(tenant, model, str(before.version)).set(0)
        if now is not None:
            info.labels(tenant, model, str(now.version)).set(1)
        self.metrics.recalibration_labels.labels(tenant, model).set(self.store.count(tenant, model))

    async def idle(self) -> None:
        """Wait for the refits in flight (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def start(self) -> None:
        """Start the store's own background work, if it has any (the Redis store loads
        the shared maps, then keeps its copy fresh)."""
        start = getattr(self.store, "start", None)
        if callable(start):
            await start()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.idle(), timeout=5.0)
        close = getattr(self.store, "aclose", None)
        if callable(close):
            with contextlib.suppress(Exception):
                await close()
