"""A fake base model answering multi-fact questions one sentence per fact, with known grades.

Question i: "Tell me about Country{i}: its capital, its currency and its continent."; gold
City{i}, Coin{i}, Europe. Its answer has three sentences, "Its capital is City{i}. Its
currency is the Coin{i}. It is in Europe.", and claim j of question i follows
``(i + j) % 3``:

* 0: right, the claim's tokens at logprob −0.05 (it knows);
* 1: wrong (Atlantis, Peso, Mars), the claim's tokens at −2.5 (it guesses, and says so);
* 2: the claim's tokens at −0.7, right when i + j is even (a coin flip).

Every other token ("Its", "capital", "is", the full stop) is at −0.01, so only the
claim's tokens tell the sentences apart, as in the reference model's answers. Logprobs
come in llama-server's shape (``content`` with token texts and top-5 lists).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.eval.fake_model import serve_json

N = 60
_QUESTION = re.compile(r"Q: Tell me about Country(\d+): [^\n]*\nA:$")
FRAMES = (
    ([" Its", " capital", " is"], "City{i}", " Atlantis"),
    ([" Its", " currency", " is", " the"], "Coin{i}", " Peso"),
    ([" It", " is", " in"], "Europe", " Mars"),
)
SURE, GUESS, COIN = -0.05, -2.5, -0.7


def questions(n: int = N) -> list[dict[str, Any]]:
    return [
        {
            "id": f"m{i}",
            "question": f"Tell me about Country{i}: its capital, its currency and its continent.",
            "claims": [
                {"about": "capital", "answers": [f"City{i}"]},
                {"about": "currency", "answers": [f"Coin{i}"]},
                {"about": "continent", "answers": ["Europe"]},
            ],
            "kind": "country",
        }
        for i in range(n)
    ]


def write_dataset(path: Path, n: int = N) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions(n)))
    return path


def state(i: int, j: int) -> int:
    return (i + j) % 3


def is_right(i: int, j: int) -> bool:
    return state(i, j) == 0 or (state(i, j) == 2 and (i + j) % 2 == 0)


def claim_logprob(i: int, j: int) -> float:
    return (SURE, GUESS, COIN)[state(i, j)]


def tokens(i: int) -> list[tuple[str, float]]:
    """The answer's tokens and their logprobs."""
    out: list[tuple[str, float]] = []
    for j, (lead, right, wrong) in enumerate(FRAMES):
        out += [(t, -0.01) for t in lead]
        lp = claim_logprob(i, j)
        if is_right(i, j):
            word = right.format(i=i)
            pieces = [" " + word[:4], word[4:]] if word[4:] else [" " + word]
        else:
            pieces = [wrong]
        out += [(p, lp) for p in pieces]
        out.append((".", -0.01))
    return out


def completion(body: dict[str, Any]) -> dict[str, Any]:
    match = _QUESTION.search(str(body.get("prompt", "")))
    i = int(match.group(1)) if match else 0
    toks = tokens(i)
    content = [
        {
            "token": t,
            "logprob": lp,
            "top_logprobs": [{"token": t, "logprob": lp}, {"token": " other", "logprob": lp - 1.0}],
        }
        for t, lp in toks
    ]
    return {
        "id": f"cmpl-m{i}",
        "object": "text_completion",
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "text": "".join(t for t, _ in toks),
                "finish_reason": "stop",
                "logprobs": {"content": content},
            }
        ],
    }


@contextmanager
def serve(seen: list[dict[str, Any]]) -> Iterator[str]:
    """Run the fake on a free loopback port (request bodies appended to ``seen``)."""

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return completion(body)

    with serve_json(answer) as url:
        yield url
