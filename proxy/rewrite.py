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
from proxy.verdict import Verdict


def apply_verdict(kind: Kind, choice: dict[str, Any], verdict: Verdict, rule: Rule) -> None:
    """Rewrite one choice according to its verdict (in place)."""
    if verdict.decision == "abstain":
        set_choice_text(kind, choice, rule.abstention_message)
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
        if not keep_logprobs and "logprobs" in choice:
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
