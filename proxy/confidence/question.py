"""The question an answer replies to, read from the request body.

Some confidence inputs compare the answer with the question it answers (how much of the
answer is copied from it: :mod:`proxy.confidence.shift_scores`). The question is:

* chat: the last user message's text (its text parts joined, when it has parts);
* completions: the text after the last ``Q:`` / ``Question:`` label of the prompt (up
  to the end of that line), or, without such a label, the last non-empty line that is
  not an answer cue (``A:``, ``Answer:``). That is where a few-shot prompt puts the
  question being asked, after the shots.

None when the body holds no question to read: no user message, a prompt of token ids,
or a batch of several prompts (whose choices answer different questions). Only the end
of a long prompt is read (:data:`MAX_PROMPT_CHARS`): the question is at the end, and a
multi-megabyte prompt must not cost more than a short one.

Pure: standard library only, reads the OpenAI request shapes as plain dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: How much of the end of a completions prompt is read for the question.
MAX_PROMPT_CHARS = 8192

#: A question label at the start of a line: "Q:", "Question:", any case, full-width colon.
_LABEL = re.compile(r"^[ \t]*(?:q|question)[ \t]*[:：][ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
#: An answer cue the prompt ends with, on its own line or after the question.
_CUE = re.compile(r"(?:^|\s)(?:a|answer)[ \t]*[:：][ \t]*$", re.IGNORECASE)


def question_of(kind: str, body: Mapping[str, Any]) -> str | None:
    """The question of a ``chat`` or ``completions`` request body, or None."""
    if kind == "chat":
        return _last_user_message(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        # A batch answers one question per prompt; only a batch of one has one question.
        prompt = prompt[0] if len(prompt) == 1 else None
    return prompt_question(prompt) if isinstance(prompt, str) else None


def _last_user_message(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content.strip()
        if isinstance(content, list):
            parts = [
                p["text"]
                for p in content
                if isinstance(p, dict) and p.get("type", "text") == "text"
                and isinstance(p.get("text"), str)
            ]  # fmt: skip
            return " ".join(parts).strip()
        return None
    return None


def prompt_question(prompt: str) -> str:
    """The question of a completions prompt (see the module docstring); "" when empty."""
    tail = prompt[-MAX_PROMPT_CHARS:]
    labels = _LABEL.findall(tail)
    if labels:
        # The last label is the question being asked; the earlier ones are the shots.
        return _CUE.sub("", labels[-1]).strip()
    for line in reversed(tail.splitlines()):
        text = _CUE.sub("", line).strip()
        if text:
            return text
    return ""
