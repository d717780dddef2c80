"""Confidence scores from the token logprobs of one answer.

Both OpenAI wire shapes are read in place, without copying the token list:

* chat: ``choice.logprobs.content = [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]``
* completions: ``choice.logprobs = {"tokens", "token_logprobs", "top_logprobs": [{tok: lp}]}``

Every score is oriented so that higher means more confident; the names and what each
reads are listed in :mod:`proxy.confidence.features`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class MalformedLogprobs(ValueError):
    """A choice's ``logprobs`` field is in neither OpenAI shape, or holds a non-logprob."""


#: A logprob is at most 0. Servers round, so a hair above 0 is accepted (and read as 0);
#: anything larger (800, +1.0 per token) is not a log probability at all.
_SLACK = 1e-3


def _logprob(value: Any) -> float:
    # type() rather than isinstance(): a bool is an int, and True is no logprob.
    if type(value) is not float and type(value) is not int:
        raise MalformedLogprobs(f"a logprob must be a number, not {type(value).__name__}")
    v = float(value)
    if not v <= _SLACK:  # also false for NaN
        raise MalformedLogprobs(f"{v!r} is not a log probability")
    return min(v, 0.0)


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedLogprobs(f"{what} must be a list")
    return value


def _chat_tokens(logprobs: Mapping[str, Any]) -> tuple[list[float], list[list[float]]]:
    lps: list[float] = []
    tops: list[list[float]] = []
    for tok in _list(logprobs.get("content"), "logprobs.content"):
        if not isinstance(tok, dict):
            raise MalformedLogprobs("each logprobs.content entry must be an object")
        lp = tok.get("logprob")
        if lp is None:
            continue
        lps.append(_logprob(lp))
        top = tok.get("top_logprobs")
        if top is not None:
            values = _top_values(top)
            if top:
                tops.append(values)
    return lps, tops


def _top_values(top: Any) -> list[float]:
    """The logprobs of one token's ``top_logprobs`` list (entries without one skipped).

    On every answer's path, once per token: floats in range are taken inline, and
    anything else goes through :func:`_logprob`, which accepts an int or raises.
    """
    if not isinstance(top, list):
        raise MalformedLogprobs("top_logprobs must be a list")
    values: list[float] = []
    for alt in top:
        if not isinstance(alt, dict):
            raise MalformedLogprobs("each top_logprobs entry must be an object")
        v = alt.get("logprob")
        if v is None:
            continue
        if type(v) is float and v <= 0.0:  # the common case; NaN fails the comparison
            values.append(v)
        else:
            values.append(_logprob(v))
    return values


def _completion_tokens(logprobs: Mapping[str, Any]) -> tuple[list[float], list[list[float]]]:
    # The first token of an echoed prompt has logprob None; skip Nones rather than fail.
    lps = [
        _logprob(x)
        for x in _list(logprobs.get("token_logprobs"), "token_logprobs")
        if x is not None
    ]
    tops: list[list[float]] = []
    for top in _list(logprobs.get("top_logprobs"), "top_logprobs"):
        if not top:
            continue
        if not isinstance(top, dict):
            raise MalformedLogprobs("each top_logprobs entry must be an object")
        tops.append([_logprob(v) for v in top.values() if v is not None])
    return lps, tops


def token_logprobs(
    choice_logprobs: Mapping[str, Any] | None,
) -> tuple[list[float], list[list[float]]]:
    """Return (token logprobs, top-k logprobs per token) from a choice's ``logprobs`` field.

    Raises :class:`MalformedLogprobs` when the field is not in either wire shape: a proxy
    must not judge an answer on numbers it cannot read, nor crash on them.
    """
    if not choice_logprobs:
        return [], []
    if not isinstance(choice_logprobs, dict):
        raise MalformedLogprobs("logprobs must be an object")
    if "content" in choice_logprobs:
        return _chat_tokens(choice_logprobs)
    return _completion_tokens(choice_logprobs)


def _entropy(values: Sequence[float]) -> float | None:
    """Entropy (nats) of the top-k alternatives, renormalised to sum to one.

    Top-k truncates the tail, so this underestimates the true entropy; it still ranks
    answers well, and the calibration absorbs the bias. With ``w = exp(v - peak)`` and
    ``Z = sum(w)``, ``-sum(p log p) = log Z - sum(w (v - peak)) / Z``: one log per
    token rather than one per alternative (this runs for every token of every answer).
    """
    if not values:
        return None
    peak = max(values)
    total = weighted = 0.0
    for v in values:
        d = v - peak
        w = math.exp(d)
        total += w
        weighted += w * d
    return math.log(total) - weighted / total


def _margin(chosen: float, top: Sequence[float]) -> float | None:
    """How far the chosen token's logprob clears its strongest rival in the top-k.

    The top-k list holds the chosen token too (when it made the cut): one entry equal to
    its logprob is set aside. Negative when a sampled token was not the favourite.
    """
    rivals = list(top)
    if chosen in rivals:
        rivals.remove(chosen)
    return chosen - max(rivals) if rivals else None


def scores_from_tokens(
    lps: Sequence[float], tops: Sequence[Sequence[float]] = ()
) -> dict[str, float]:
    """All logprob scores of one answer; empty when the answer has no scored tokens.

    Besides the rankable scores the result holds ``log_length`` (log of the token count),
    an input of the logistic calibration only.
    """
    if not lps:
        return {}
    total = sum(lps)
    scores = {
        "mean_logprob": total / len(lps),
        "min_logprob": min(lps),
        "sequence_prob": math.exp(total),
        # The first token commits to an answer; later tokens mostly spell it out, so
        # their high probabilities dilute the mean without saying the answer is right.
        "first_logprob": lps[0],
        "log_length": math.log(len(lps)),
    }
    entropies = [e for e in (_entropy(t) for t in tops) if e is not None]
    if entropies:
        # Negated so that, like every other score, higher means more confident.
        scores["mean_entropy"] = -sum(entropies) / len(entropies)
    # Tokens without a top-k list are dropped from ``tops``, so its first list is the
    # first token's only when every token has one.
    if len(tops) == len(lps):
        margin = _margin(lps[0], tops[0])
        if margin is not None:
            scores["first_margin"] = margin
    return scores


def scores_from_choice(choice_logprobs: Mapping[str, Any] | None) -> dict[str, float]:
    """All logprob scores of a choice's ``logprobs`` field (either wire shape)."""
    lps, tops = token_logprobs(choice_logprobs)
    return scores_from_tokens(lps, tops)


def token_texts(choice_logprobs: Mapping[str, Any] | None) -> list[str] | None:
    """The text of each scored token, aligned with :func:`token_logprobs`' first list.

    None when a scored token has no text (a server that sends logprobs without tokens):
    then nothing can be said about which part of the answer a token belongs to. Read
    only by rules that need it (sentence granularity); the shapes were already checked
    by :func:`token_logprobs`.
    """
    if not choice_logprobs or not isinstance(choice_logprobs, dict):
        return []
    texts: list[str] = []
    if "content" in choice_logprobs:
        for tok in choice_logprobs.get("content") or ():
            if tok.get("logprob") is None:
                continue
            text = tok.get("token")
            if not isinstance(text, str):
                return None
            texts.append(text)
        return texts
    tokens = choice_logprobs.get("tokens")
    lps = choice_logprobs.get("token_logprobs") or ()
    if not isinstance(tokens, list) or len(tokens) != len(lps):
        return None
    for text, lp in zip(tokens, lps, strict=True):
        if lp is None:
            continue
        if not isinstance(text, str):
            return None
        texts.append(text)
    return texts
