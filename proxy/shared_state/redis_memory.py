"""The feedback memory in Redis: one hash per response, with a TTL.

Key ``{prefix}fb:{tenant}:{response id}`` (tenant-scoped: another tenant's id is simply
not there), fields ``tenant``, ``model``, ``conf`` (JSON list of per-choice confidences),
``base`` (the shipped P(correct) per choice, when a recalibration answered), ``sent``
(per choice, ``[[confidence, shipped P], ...]`` of its sentence parts, or null; only
when some choice was judged by sentence), and ``fb:{choice}`` (``fb:{choice}:{sentence}``
for one sentence) = ``1``/``0`` once that got feedback. Written (``HSET`` +
``EXPIRE`` in one transaction) in the background when the response is recorded;
claimed by a Lua script (``HSETNX`` of the choice's field), so exactly one of any number
of identical or contradicting feedbacks, on any pods, is the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from proxy.shared_state.memory import (
    MAX_SENTENCES,
    Claim,
    Remembered,
    SentenceParts,
    packed_parts,
)
from proxy.shared_state.redis_state import RedisState

#: 1 new, 0 duplicate, 2 conflict, -1 unknown (expired or never recorded).
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return 1 end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
return 2
"""
_CLAIMS: dict[int, Claim] = {1: "new", 0: "duplicate", 2: "conflict", -1: "unknown"}


class RedisFeedbackMemory:
    """Responses remembered for ``ttl_seconds`` in Redis, shared by every pod."""

    def __init__(self, state: RedisState, *, ttl_seconds: int = 86_400) -> None:
        self.state = state
        self.ttl_seconds = ttl_seconds

    def key(self, tenant: str, response_id: str) -> str:
        return f"{self.state.prefix}fb:{tenant}:{response_id}"

    def remember(
        self,
        response_id: str,
        tenant: str,
        model: str,
        confidences: Sequence[float | None],
        *,
        bases: Sequence[float | None] | None = None,
        sentences: Sequence[SentenceParts | None] | None = None,
    ) -> None:
        key = self.key(tenant, response_id)
        fields = {"tenant": tenant, "model": model, "conf": orjson.dumps(list(confidences))}
        if bases is not None:
            fields["base"] = orjson.dumps(list(bases))
        if sentences is not None:
            capped = [None if parts is None else parts[:MAX_SENTENCES] for parts in sentences]
            fields["sent"] = orjson.dumps(capped)
        ttl = self.ttl_seconds

        def write(pipe: Any) -> None:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)

        self.state.enqueue("feedback_remember", write)

    async def lookup(self, tenant: str, response_id: str) -> Remembered | None:
        key = self.key(tenant, response_id)
        data: dict[bytes, bytes] = await self.state.run(
            "feedback_lookup", lambda client: client.hgetall(key)
        )
        if not data or b"conf" not in data:
            return None
        feedback: dict[int, bool] = {}
        sentence_feedback: dict[tuple[int, int], bool] = {}
        for name, value in data.items():
            if name[:3] != b"fb:":
                continue
            choice, _, sentence = name[3:].partition(b":")
            if sentence:
                sentence_feedback[(int(choice), int(sentence))] = value == b"1"
            else:
                feedback[int(choice)] = value == b"1"
        sentences = None
        if b"sent" in data:
            sentences = packed_parts(
                [
                    None if parts is None else tuple((c, b) for c, b in parts)
                    for parts in orjson.loads(data[b"sent"])
                ]
            )
        return Remembered(
            tenant=data.get(b"tenant", tenant.encode()).decode(),
            model=data.get(b"model", b"unknown").decode(),
            confidences=tuple(orjson.loads(data[b"conf"])),
            bases=tuple(orjson.loads(data[b"base"])) if b"base" in data else None,
            sentences=sentences,
            feedback=feedback,
            sentence_feedback=sentence_feedback,
        )

    async def claim_feedback(
        self,
        tenant: str,
        response_id: str,
        choice: int,
        correct: bool,
        sentence: int | None = None,
    ) -> Claim:
        key = self.key(tenant, response_id)
        name = f"fb:{choice}" if sentence is None else f"fb:{choice}:{sentence}"
        args = [name, "1" if correct else "0"]
        got = await self.state.run(
            "feedback_claim",
            lambda client: self.state.script(CLAIM)(keys=[key], args=args, client=client),
        )
        return _CLAIMS.get(int(got), "unknown")
