"""Named prompt templates: how a question becomes an OpenAI request, and the reply an answer.

``qa-fewshot`` (the default) is for base models such as the reference Gemma 3 270M: a
three-shot ``Q: … / A: …`` prompt sent to ``/v1/completions``, greedy, stopping at the
newline that would start the next question. The shots are general-knowledge questions of
none of the dataset's kinds, so that no shot gives a test question's answer away.

``chat`` is for instruction-tuned models: a system message asking for a short answer and
the question as the user message, sent to ``/v1/chat/completions``.

Both ask for the top-5 alternatives of every token, which the proxy's entropy score needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["completions", "chat"]

FEW_SHOT = (
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the largest ocean on Earth?", "Pacific Ocean"),
)

CHAT_SYSTEM = (
    "Answer the question with the shortest correct phrase: a name, a number or a few "
    "words. No sentence, no explanation."
)


@dataclass(frozen=True)
class Template:
    """A named way of asking a question."""

    name: str
    endpoint: Endpoint
    description: str

    @property
    def path(self) -> str:
        return "/completions" if self.endpoint == "completions" else "/chat/completions"

    def prompt(self, question: str) -> str | list[dict[str, str]]:
        if self.endpoint == "completions":
            shots = "".join(f"Q: {q}\nA: {a}\n" for q, a in FEW_SHOT)
            return f"{shots}Q: {question}\nA:"
        return [
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": question},
        ]

    def body(
        self, question: str, model: str, *, max_tokens: int = 16, top_logprobs: int = 5
    ) -> dict[str, Any]:
        """The request body: greedy, short, with logprobs."""
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if self.endpoint == "completions":
            body.update(prompt=self.prompt(question), stop=["\n"], logprobs=top_logprobs)
        else:
            body.update(messages=self.prompt(question), logprobs=True, top_logprobs=top_logprobs)
        return body

    def answer(self, choice: Mapping[str, Any]) -> str:
        """The answer text of one response choice (first line, trimmed)."""
        if self.endpoint == "completions":
            text = choice.get("text")
        else:
            text = (choice.get("message") or {}).get("content")
        if not isinstance(text, str):
            return ""
        return text.strip().split("\n", 1)[0].strip()


TEMPLATES: dict[str, Template] = {
    "qa-fewshot": Template(
        "qa-fewshot",
        "completions",
        "three-shot 'Q: ... A:' prompt for base models via /v1/completions, stop at newline",
    ),
    "chat": Template(
        "chat",
        "chat",
        "system instruction + question for chat models via /v1/chat/completions",
    ),
}


def get_template(name: str) -> Template:
    """A template by name; ``ValueError`` listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None
