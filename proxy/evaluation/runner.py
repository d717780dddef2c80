"""Asking a model (or the proxy) every question: bounded concurrency, progress, a disk cache.

Talks HTTP to an OpenAI-compatible ``base_url`` with httpx; tests and the in-process
proxy inject an ``httpx`` transport instead of opening sockets.

The cache is one JSON Lines file per run configuration, appended to as answers arrive,
so an interrupted run resumes where it stopped and refitting a calibration never asks
the model again. An entry is keyed by a hash of the exact request body plus a ``tag``
saying what answered it (``direct``, or the proxy with a given policy), so a changed
prompt, model, parameter or policy is asked afresh. Failed requests are not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from proxy.confidence.logprobs import scores_from_choice
from proxy.confidence.shift_scores import text_scores_of_choice
from proxy.evaluation.datasets import Question
from proxy.evaluation.prompts import Template


@dataclass
class Generation:
    """One question's answer as the model (or the proxy) gave it, raw enough to rescore."""

    id: str
    key: str
    text: str = ""
    finish_reason: str | None = None
    #: the choice's ``logprobs`` field as received, so every score can be recomputed
    logprobs: dict[str, Any] | None = None
    #: the choice's text exactly as received (``text`` is its first line, trimmed): the
    #: token offsets of per-sentence scores are offsets into it; None in older caches
    raw_text: str | None = None
    #: the proxy's verdict for this choice, when a proxy answered
    abstention: dict[str, Any] | None = None
    response_id: str | None = None
    error: str | None = None

    @property
    def scores(self) -> dict[str, float]:
        """Every logprob score the proxy can compute from this answer."""
        return scores_from_choice(self.logprobs)

    def text_scores(self, question: str | None) -> dict[str, float]:
        """The scores of this answer's token texts against ``question`` (issue 12.4),
        as the proxy computes them for a calibration that reads them."""
        return text_scores_of_choice(self.logprobs, question)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Generation:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def request_key(tag: str, path: str, body: Mapping[str, Any]) -> str:
    blob = json.dumps({"tag": tag, "path": path, "body": body}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class GenerationCache:
    """Generations on disk (JSON Lines), keyed by :func:`request_key`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, Generation] = {}
        if path is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    gen = Generation.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line torn by an interrupted run; it will be asked again
                self._entries[gen.key] = gen

    def get(self, key: str) -> Generation | None:
        return self._entries.get(key)

    def add(self, gen: Generation) -> None:
        self._entries[gen.key] = gen
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(gen.to_dict()) + "\n")


class Progress:
    """A progress line with rate and ETA on a text stream (stderr).

    On a terminal the line is redrawn in place a few times a second; into a file or a
    pipe (CI logs) it is written as a new line every tenth of the way, so a log stays
    readable instead of holding thousands of carriage returns.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.done = self.cached = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._next_line = 0

    def step(self, *, cached: bool = False) -> None:
        self.done += 1
        self.cached += cached
        if self.stream is None:
            return
        now = time.monotonic()
        last = self.done == self.total
        if self._tty and (now - self._drawn > 0.2 or last):
            self._drawn = now
            self.stream.write("\r" + self.render(now) + ("\n" if last else ""))
        elif not self._tty and (self.done >= self._next_line or last):
            self._next_line = self.done + max(1, self.total // 10)
            self.stream.write(self.render(now) + "\n")
        else:
            return
        self.stream.flush()

    def render(self, now: float) -> str:
        asked = self.done - self.cached
        elapsed = now - self.started
        rate = asked / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:5.0f}s" if rate > 0 else "    ?"
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} "
            f"({self.cached} cached) {rate:4.1f} q/s ETA {eta}"
        )


def _choice(response: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the response has no choices")
    return choices[0]


_RETRYABLE = frozenset({429, 500, 502, 503, 504})


async def _ask(
    client: httpx.AsyncClient, template: Template, body: dict[str, Any], retries: int
) -> dict[str, Any]:
    """POST with retries on transport errors, overload and server errors (not on 4xx)."""
    delay = 0.5
    for attempt in range(retries + 1):
        try:
            r = await client.post(template.path, json=body)
        except httpx.TransportError:
            if attempt == retries:
                raise
        else:
            if r.status_code not in _RETRYABLE or attempt == retries:
                r.raise_for_status()
                data = r.json()
                if not isinstance(data, dict):
                    raise ValueError("the response is not a JSON object")
                return data
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


async def ask_all(
    questions: Sequence[Question],
    template: Template,
    *,
    base_url: str,
    model: str,
    tag: str = "direct",
    concurrency: int = 2,
    cache: GenerationCache | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    api_key: str | None = None,
    max_tokens: int | None = None,
    top_logprobs: int = 5,
    timeout: float = 120.0,
    retries: int = 2,
    progress: TextIO | None = sys.stderr,
    label: str = "asking",
) -> list[Generation]:
    """One :class:`Generation` per question, in order; failures carry ``error``.

    ``max_tokens``: the answer's token budget (None: the template's own).
    """
    cache = cache or GenerationCache(None)
    bar = Progress(len(questions), label, progress)
    limit = asyncio.Semaphore(max(1, concurrency))
    headers = {"authorization": f"Bearer {api_key or 'unused'}"}

    async with httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=timeout, headers=headers
    ) as client:

        async def one(q: Question) -> Generation:
            body = template.body(
                q.question, model, max_tokens=max_tokens, top_logprobs=top_logprobs
            )
            key = request_key(tag, template.path, body)
            hit = cache.get(key)
            if hit is not None:
                bar.step(cached=True)
                return Generation(**{**hit.to_dict(), "id": q.id})
            async with limit:
                try:
                    response = await _ask(client, template, body, retries)
                    choice = _choice(response)
                except (httpx.HTTPError, ValueError) as exc:
                    bar.step()
                    return Generation(q.id, key, error=f"{type(exc).__name__}: {exc}")
            logprobs = choice.get("logprobs")
            abstention = choice.get("abstention") or response.get("abstention")
            gen = Generation(
                id=q.id,
                key=key,
                text=template.answer(choice),
                raw_text=template.raw_text(choice),
                finish_reason=choice.get("finish_reason"),
                logprobs=logprobs if isinstance(logprobs, dict) else None,
                abstention=abstention if isinstance(abstention, dict) else None,
                response_id=response.get("id") if isinstance(response.get("id"), str) else None,
            )
            cache.add(gen)
            bar.step()
            return gen

        return list(await asyncio.gather(*(one(q) for q in questions)))
