"""Acting on verdicts: the response the client gets, and the verdict in headers.

Each choice keeps its answer, gets the abstention message instead, or the hedge in
front; every choice carries its verdict object as ``abstention``, and the response
carries the first one at the top level. Logprobs the proxy asked for on its own behalf
are removed when the client did not ask for them.
"""

from __future__ import annotations

from typing import Any

from proxy.policy.rules import Rule
from proxy.protocol import Kind, choice_text, choices_of, set_choice_text, trim_top_logprobs
from proxy.sentences import marker_length
from proxy.verdict import SentenceVerdict, Verdict


def sentence_text(
    text: str, part: SentenceVerdict, rule: Rule, *, after_withheld: bool = False
) -> str:
    """What the client gets for one judged part of ``text`` (at the part's offsets).

    A withheld sentence becomes the rule's ``sentence_abstention``, or nothing when the
    one before it was withheld too in the same line (one marker for a run of guesses);
    a withheld list line keeps its marker. A hedged one gets ``sentence_hedge`` in front.
    """
    assert part.start is not None and part.end is not None
    original = text[part.start : part.end]
    if part.decision not in ("abstain", "hedge"):
        return original
    keep = marker_length(text, part.start, part.end) if part.kind == "line" else 0
    if part.decision == "hedge":
        return original[:keep] + rule.sentence_hedge + original[keep:]
    if after_withheld and part.kind == "sentence":
        return ""
    return original[:keep] + rule.sentence_abstention


def rewrite_sentences(text: str, verdict: Verdict, rule: Rule) -> str:
    """The answer with each part's verdict applied; the parts' offsets are moved (in place)
    to where each part, or its replacement, is in the text returned."""
    parts = verdict.sentences or []
    out: list[str] = []
    length = cursor = 0
    previous: SentenceVerdict | None = None
    for part in parts:
        assert part.start is not None and part.end is not None
        gap = text[cursor : part.start]
        run = (
            previous is not None
            and previous.decision == "abstain"
            and part.decision == "abstain"
            and "\n" not in gap
        )
        new = sentence_text(text, part, rule, after_withheld=run)
        cursor = part.end
        if run and not new:
            # Shares the replacement of the withheld sentence before it.
            part.start, part.end = previous.start, previous.end  # type: ignore[union-attr]
            continue
        out.append(gap)
        length += len(gap)
        part.start, part.end = length, length + len(new)
        out.append(new)
        length += len(new)
        previous = part
    out.append(text[cursor:])
    return "".join(out)


def apply_verdict(kind: Kind, choice: dict[str, Any], verdict: Verdict, rule: Rule) -> None:
    """Rewrite one choice according to its verdict (in place)."""
    if verdict.decision == "abstain":
        set_choice_text(kind, choice, rule.abstention_message)
        for part in verdict.sentences or ():
            part.start = part.end = None
    elif verdict.sentences is not None:
        # Judged sentence by sentence: each part kept, replaced or hedged on its own.
        text = rewrite_sentences(choice_text(kind, choice) or "", verdict, rule)
        set_choice_text(kind, choice, text)
    elif verdict.decision == "hedge":
        set_choice_text(kind, choice, rule.hedge_prefix + (choice_text(kind, choice) or ""))


def rewrite_response(
    kind: Kind,
    response: dict[str, Any],
    verdicts: list[Verdict],
    rule: Rule,
    *,
    keep_logprobs: bool,
    top_k: int | None = None,
    shown: str | None = None,
) -> None:
    """Apply every choice's verdict and attach it (in place).

    ``shown`` replaces the model's answer before the verdict applies (the samples'
    majority, for a rule that shows it); ``top_k`` cuts each token's alternatives to what
    the client asked for.
    """
    choices = choices_of(response)
    for choice, verdict in zip(choices, verdicts, strict=True):
        if shown is not None:
            set_choice_text(kind, choice, shown)
        apply_verdict(kind, choice, verdict, rule)
        if verdict.decision in ("abstain", "partial") and choice.get("logprobs") is not None:
            # The tokens of a withheld answer (or sentence) would spell out what was withheld.
            choice["logprobs"] = None
        elif not keep_logprobs and "logprobs" in choice:
            choice["logprobs"] = None
        elif top_k is not None:
            trim_top_logprobs(choice.get("logprobs"), top_k)
        choice["abstention"] = verdict.to_dict()
    if verdicts:
        response["abstention"] = choices[0]["abstention"]


def verdict_headers(verdicts: list[Verdict]) -> dict[str, str]:
    """The verdict of the first choice, as response headers."""
    if not verdicts:
        return {}
    v = verdicts[0]
    headers: dict[str, str] = {"x-abstention-decision": v.decision}
    if v.confidence is not None:
        headers["x-abstention-confidence"] = f"{v.confidence:.4f}"
    return headers
