"""Named prompt templates: how a question becomes an OpenAI request, and the reply an answer.

``qa-fewshot`` (the default) is for base models such as the reference Gemma 3 270M: a
three-shot ``Q: … / A: …`` prompt sent to ``/v1/completions``, greedy, stopping at the
newline that would start the next question. The shots are general-knowledge questions of
none of the dataset's kinds, so that no shot gives a test question's answer away.

``sentences-fewshot`` is for multi-fact questions ("Tell me about Ghana: its capital, its
currency and its continent.") judged sentence by sentence: a four-shot prompt, two
countries and two elements, whose answers state one fact per sentence ("Its capital is
Tokyo. Its currency is the Japanese yen. It is in Asia."), greedy, up to 64 tokens, stopping
at the end of the line. The shots' entities are left out of the facts-multi sets
(``benchmarks/facts_multi.py``), so no shot gives a question's answer away; the words of
the shots are in the prompt, so on the proxy's live path they count as given
(:mod:`proxy.confidence.spans`), as they would for any client sending this prompt.

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

#: One sentence per fact, in the order the question names the facts. Two shots of each
#: kind, alternating: with one country and one element shot the 270M base model copied
#: the shot's discoverer into all 8 element answers of a 20-question trial, with two it
#: copied one of them into 6 of 8 (and every answer of both trials came back as one
#: sentence per fact, in the question's order).
SENTENCE_SHOTS = (
    (
        "Tell me about Japan: its capital, its currency and its continent.",
        "Its capital is Tokyo. Its currency is the Japanese yen. It is in Asia.",
    ),
    (
        "Tell me about Hydrogen: its chemical symbol, its atomic number and who discovered it.",
        "Its chemical symbol is H. Its atomic number is 1. It was discovered by Henry Cavendish.",
    ),
    (
        "Tell me about Peru: its capital, its currency and its continent.",
        "Its capital is Lima. Its currency is the Peruvian sol. It is in South America.",
    ),
    (
        "Tell me about Oxygen: its chemical symbol, its atomic number and who discovered it.",
        "Its chemical symbol is O. Its atomic number is 8. It was discovered by Carl Wilhelm "
        "Scheele.",
    ),
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
    #: the few-shot (question, answer) pairs of a completions template
    shots: tuple[tuple[str, str], ...] = FEW_SHOT
    #: the answer's token budget when the command line names none
    max_tokens: int = 16

    @property
    def path(self) -> str:
        return "/completions" if self.endpoint == "completions" else "/chat/completions"

    def prompt(self, question: str) -> str | list[dict[str, str]]:
        if self.endpoint == "completions":
            shots = "".join(f"Q: {q}\nA: {a}\n" for q, a in self.shots)
            return f"{shots}Q: {question}\nA:"
        return [
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": question},
        ]

    def body(
        self, question: str, model: str, *, max_tokens: int | None = None, top_logprobs: int = 5
    ) -> dict[str, Any]:
        """The request body: greedy, short (``max_tokens``, default the template's), with
        logprobs."""
        tokens = self.max_tokens if max_tokens is None else max_tokens
        body: dict[str, Any] = {"model": model, "max_tokens": tokens, "temperature": 0}
        if self.endpoint == "completions":
            body.update(prompt=self.prompt(question), stop=["\n"], logprobs=top_logprobs)
        else:
            body.update(messages=self.prompt(question), logprobs=True, top_logprobs=top_logprobs)
        return body

    def raw_text(self, choice: Mapping[str, Any]) -> str | None:
        """The text of one response choice as received (None when it has none)."""
        if self.endpoint == "completions":
            text = choice.get("text")
        else:
            text = (choice.get("message") or {}).get("content")
        return text if isinstance(text, str) else None

    def answer(self, choice: Mapping[str, Any]) -> str:
        """The answer text of one response choice (first line, trimmed)."""
        text = self.raw_text(choice)
        if text is None:
            return ""
        return text.strip().split("\n", 1)[0].strip()


TEMPLATES: dict[str, Template] = {
    "qa-fewshot": Template(
        "qa-fewshot",
        "completions",
        "three-shot 'Q: ... A:' prompt for base models via /v1/completions, stop at newline",
    ),
    "sentences-fewshot": Template(
        "sentences-fewshot",
        "completions",
        "four-shot 'Tell me about X' prompt, one sentence per fact, for multi-fact sets",
        shots=SENTENCE_SHOTS,
        max_tokens=64,
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
