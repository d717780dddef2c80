"""Agreement among sampled answers: normalisation, matchers, clustering, scores.

The answer the client sees (the *reference*) and k extra samples are grouped into
meaning-equivalent clusters by a pluggable :class:`Matcher`; greedy clustering puts each
answer in the first cluster whose first member it matches. From the clusters:

* ``agreement``: share of the samples in the reference's cluster (self-consistency);
* ``agreement_smoothed``: (agreeing + 1) / (samples + 2), the same shrunk toward 1/2 so
  that 3 of 3 counts for less than 8 of 8 when early stopping varies the sample count;
* ``majority_share``: share of the samples in the largest cluster;
* ``semantic_entropy``: **minus** the entropy (nats) of the samples' cluster
  distribution. Negated, like ``mean_entropy`` in :mod:`proxy.confidence.logprobs`, so
  that every score follows the proxy's convention: higher means more confident.

These are the feature names (:data:`~proxy.confidence.features.AGREEMENT_SCORES`) a
calibration or a hybrid logistic model reads. Matchers: normalised exact match
(default), numeric equivalence, and sentence embeddings
(:mod:`proxy.confidence.embedding`, loaded only when asked for).

Pure: no web or HTTP imports, no model loaded at import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from proxy.confidence.normalize import normalize_answer
from proxy.confidence.numeric import numbers_equivalent, parse_number

__all__ = [
    "EXACT",
    "NUMERIC",
    "Agreement",
    "Matcher",
    "cluster",
    "matcher_by_name",
    "normalize_answer",
    "score_agreement",
]

T = TypeVar("T")


class Matcher(Protocol[T]):
    """Decides whether two answers state the same thing.

    ``prepare`` turns the raw answers into whatever the matcher compares (normalised
    text, parsed numbers, embeddings), once per answer and in one batch, so that an
    expensive step such as an embedding model runs once per request rather than per pair.
    """

    @property
    def name(self) -> str: ...

    #: True when matching runs a model: callers should keep it off the event loop.
    @property
    def runs_model(self) -> bool: ...

    def prepare(self, answers: Sequence[str]) -> Sequence[T]: ...

    def equivalent(self, a: T, b: T) -> bool: ...


class ExactMatcher:
    """Equal after :func:`normalize_answer` (the default matcher)."""

    name = "exact"
    runs_model = False

    def prepare(self, answers: Sequence[str]) -> list[str]:
        return [normalize_answer(a) for a in answers]

    def equivalent(self, a: str, b: str) -> bool:
        return a == b


@dataclass(frozen=True, slots=True)
class _Numeric:
    text: str
    number: tuple[float, str] | None


class NumericMatcher:
    """Numbers compare by value ("1,000" = "1000" = "one thousand"), others as exact.

    Units must agree when both answers give one; a bare number matches any unit, since
    models often drop it ("8,849" vs "8,849 m").
    """

    name = "numeric"
    runs_model = False

    def prepare(self, answers: Sequence[str]) -> list[_Numeric]:
        return [_Numeric(normalize_answer(a), parse_number(a)) for a in answers]

    def equivalent(self, a: _Numeric, b: _Numeric) -> bool:
        return numbers_equivalent(a.number, b.number, a.text, b.text)


EXACT = ExactMatcher()
NUMERIC = NumericMatcher()
MATCHERS = ("exact", "numeric", "embedding")


def matcher_by_name(name: str, **options: Any) -> Matcher[Any]:
    """The matcher a policy names; ``embedding`` takes ``threshold=`` and ``encode=``.

    Build the embedding matcher once per process and reuse it: it holds the model.
    """
    if name == "exact":
        return EXACT
    if name == "numeric":
        return NUMERIC
    if name == "embedding":
        from proxy.confidence.embedding import EmbeddingMatcher

        return EmbeddingMatcher(**options)
    raise ValueError(f"unknown matcher {name!r}; expected one of {', '.join(MATCHERS)}")


def cluster(answers: Sequence[str], matcher: Matcher[Any] = EXACT) -> list[int]:
    """Greedy clustering: the cluster label of each answer, labels in order of appearance.

    Each answer joins the first cluster whose first member it matches. Matching need not
    be transitive (embeddings are not), so comparing with one fixed representative keeps
    the result independent of how a cluster grew.
    """
    prepared = matcher.prepare(answers)
    representatives: list[Any] = []
    labels: list[int] = []
    for item in prepared:
        for label, rep in enumerate(representatives):
            if matcher.equivalent(item, rep):
                labels.append(label)
                break
        else:
            labels.append(len(representatives))
            representatives.append(item)
    return labels


@dataclass(frozen=True, slots=True)
class Agreement:
    """How the samples agree with the reference answer and with each other."""

    samples: int
    #: samples in the reference's cluster (the majority's when there is no reference)
    agreeing: int
    majority_answer: str
    majority_count: int
    runner_up_count: int
    #: whether the reference is in the majority cluster (ties go to the reference)
    reference_in_majority: bool
    #: entropy of the cluster distribution in nats, >= 0: *higher = less* confident
    entropy: float
    clusters: int

    @property
    def agreement(self) -> float:
        return self.agreeing / self.samples if self.samples else 0.0

    def features(self) -> dict[str, float]:
        """The agreement scores; empty without samples, so the caller reports 'no score'."""
        if not self.samples:
            return {}
        return {
            "agreement": self.agreeing / self.samples,
            "agreement_smoothed": (self.agreeing + 1) / (self.samples + 2),
            "majority_share": self.majority_count / self.samples,
            "semantic_entropy": -self.entropy,
        }


def score_agreement(
    reference: str | None, samples: Sequence[str], matcher: Matcher[Any] = EXACT
) -> Agreement:
    """Cluster the reference with the samples and score their agreement.

    The reference is clustered with the samples but not counted among them: agreement is
    the share of *independent* samples that say what the client is told. With no
    reference (its text is not known yet) the majority answer stands in for it.
    """
    answers = list(samples) if reference is None else [reference, *samples]
    labels = cluster(answers, matcher)
    sample_labels = labels if reference is None else labels[1:]
    counts: dict[int, int] = {}
    for label in sample_labels:
        counts[label] = counts.get(label, 0) + 1
    ref_label = None if reference is None else labels[0]
    n = len(sample_labels)
    # Largest cluster; ties go to the reference, then to the earliest cluster.
    ranked = sorted(counts, key=lambda lab: (-counts[lab], lab != ref_label, lab))
    top = ranked[0] if ranked else ref_label
    top_count = counts.get(top, 0) if top is not None else 0
    if top is not None and top == ref_label and reference is not None:
        majority_answer = reference
    elif top is not None:
        majority_answer = samples[sample_labels.index(top)]
    else:
        majority_answer = ""
    entropy = -sum((c / n) * math.log(c / n) for c in counts.values()) if n else 0.0
    return Agreement(
        samples=n,
        agreeing=top_count if ref_label is None else counts.get(ref_label, 0),
        majority_answer=majority_answer,
        majority_count=top_count,
        runner_up_count=counts[ranked[1]] if len(ranked) > 1 else 0,
        reference_in_majority=ref_label is not None and top == ref_label,
        entropy=max(0.0, entropy),
        clusters=len(counts),
    )
