"""What one pod holds of a tenant's shared limits between two Redis round trips.

A tenant far from its limits would otherwise pay a Redis round trip per request (the
limiter script) for a refusal that almost never comes. Instead, when every limit its
rule sets has at least :data:`MIN_FREE_FOR_BATCH` free, the pod takes a small batch in
that one round trip: a few rate tokens and a few concurrency slots, each taken from the
shared bucket and lease set as if that many requests had been admitted at once. The
next requests spend the batch here, without Redis, until it runs out or
:data:`ALLOWANCE_SECONDS` pass; then what is left goes back (slots are removed from the
lease set, unused tokens returned to the bucket). A fresh batch is asked for in the
background once a quarter of either is left (:meth:`Allowance.running_low`), so that
under steady traffic no request waits for Redis and one ask is in flight at a time.

Why the limits still hold across pods: every slot a request uses here is a member of
the shared lease set, so the pods together never run more than ``max_concurrent_requests``
at once; every token is taken from the shared bucket before it is spent, so the pods
together never admit more than the bucket gives out. What a batch costs is fairness at
the margin: tokens and slots held here, unused, are not available to another pod for up
to a second. A batch is at most :data:`BATCH_SHARE` of what is free when it is taken,
so that cost is bounded, and near a limit (less than :data:`MIN_FREE_FOR_BATCH` free)
every request asks Redis, exactly as without batches.

Pure: no Redis, no clock of its own (``now`` is passed in, on ``time.monotonic()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: How long a batch may be spent from; then what is left of it goes back.
ALLOWANCE_SECONDS = 1.0
#: A batch takes at most this share of the tokens (or slots) free when it is taken.
BATCH_SHARE = 1 / 16
#: Free tokens (or slots) a limit needs before batches are taken for it at all.
MIN_FREE_FOR_BATCH = 32
#: A batch's size at most, and at least when there is demand for it.
MAX_TOKENS, MIN_TOKENS = 4096, 16
MAX_SLOTS, MIN_SLOTS = 256, 4

#: (max_concurrent_requests, rate_limit_per_second, burst) a batch was taken under.
Limits = tuple[int | None, float | None, int]


def batch_size(free: float, demand: int, *, least: int, most: int) -> int:
    """How many to ask for: twice the recent ``demand`` (at least ``least``), within
    :data:`BATCH_SHARE` of ``free`` and ``most``; 1 (no batch) when little is free."""
    if free < MIN_FREE_FOR_BATCH:
        return 1
    return max(1, min(most, math.floor(free * BATCH_SHARE), max(least, 2 * demand)))


@dataclass(slots=True, eq=False)
class Allowance:
    """A batch of one tenant's tokens and slots, taken from Redis and spent here.

    ``tokens`` is None when the rule has no rate limit; ``idle`` holds the ids of the
    slots (members of the shared lease set) not in use now, and stays empty when the
    rule has no concurrency cap.
    """

    limits: Limits
    tokens: int | None
    idle: list[str]
    until: float
    #: requests admitted from it so far (sizes the next batch)
    used: int = 0
    #: when it was granted (monotonic), and the tokens it was granted
    since: float = 0.0
    granted: int = 0
    #: set once it is handed back: slots given back after that go to Redis
    retired: bool = False
    #: slots of this batch in use now
    busy: set[str] = field(default_factory=set)

    def usable(self, limits: Limits, now: float) -> bool:
        """Whether one more request, under ``limits``, may be admitted from it now."""
        if self.retired or now >= self.until or limits != self.limits:
            return False
        if self.tokens is not None and self.tokens < 1:
            return False
        return limits[0] is None or bool(self.idle)

    def running_low(self, now: float) -> bool:
        """Whether to ask for the next batch now: a quarter of its time, its tokens or
        its slots (against those in use) is left."""
        if now >= self.until - (self.until - self.since) / 4:
            return True
        if self.tokens is not None and self.tokens * 4 <= self.granted:
            return True
        return self.limits[0] is not None and len(self.idle) * 4 <= len(self.busy)

    def take(self) -> str | None:
        """Spend one request's token and slot (call :meth:`usable` first): the slot's id,
        or None when the rule has no concurrency cap."""
        self.used += 1
        if self.tokens is not None:
            self.tokens -= 1
        if self.limits[0] is None:
            return None
        slot = self.idle.pop()
        self.busy.add(slot)
        return slot

    def give_back(self, slot: str, now: float) -> bool:
        """A request's slot, after it ended: kept for the next request (True) while the
        batch may still be spent, else to be removed from the shared set (False)."""
        self.busy.discard(slot)
        if self.retired or now >= self.until:
            return False
        self.idle.append(slot)
        return True

    def retire(self) -> tuple[list[str], int]:
        """End it: the idle slots to remove from the shared set and the tokens to return."""
        self.retired = True
        idle, self.idle = self.idle, []
        tokens = self.tokens or 0
        self.tokens = 0 if self.tokens is not None else None
        return idle, tokens
