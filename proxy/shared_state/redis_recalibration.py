"""Recalibration labels and the maps in service, in Redis: every pod answers with the same map.

A :class:`~proxy.recalibration_store.RecalibrationStore` shared by every pod and worker
(``ABSTAIN_REDIS_URL``). Keys, with ``{p}`` the ``ABSTAIN_REDIS_KEY_PREFIX`` and tenant and
model names percent-encoded (so a ``:`` in a name cannot make two keys meet):

* ``{p}recal:labels:{tenant}:{model}``: a list of labels as JSON, newest first
  (``LPUSH``), trimmed to the newest ``max_labels`` (``LTRIM``,
  ``ABSTAIN_REDIS_RECALIBRATION_LABELS``) in the same ``MULTI`` that adds to
  ``{p}recal:count:{tenant}:{model}`` (``INCRBY``: every label ever added, which the
  refit schedule counts);
* ``{p}recal:maps``: a hash, field ``{tenant}:{model}``, value the map in service as JSON
  (with its ``version``);
* ``{p}recal:epoch``: a random token, replaced by every write to ``recal:maps``.

None has a TTL: under ``maxmemory-policy volatile-ttl`` they are never evicted, and their
size is bounded by ``max_labels`` per tenant and model.

**Swap** is one Lua script (``SWAP``, in
:mod:`~proxy.shared_state.redis_recalibration_scripts`): it reads the stored version and
writes the new map (and a new epoch) only if the new version is one past it, so of two
pods refitting at once exactly one wins, and an older map never overwrites a newer one.
The loser gets the winner's map in the same reply and serves it at once.

**current() never waits on Redis**: it reads this process's copy of the maps. A
background task polls the epoch every ``refresh_seconds`` (:data:`REFRESH_SECONDS`, 1 s:
one ``GET`` per pod per second) and reloads the hash when it changed. So a map swapped in
by one pod is served by every other pod within ``refresh_seconds`` plus one round trip
while Redis answers, and within ``ABSTAIN_REDIS_RETRY_SECONDS`` + ``refresh_seconds`` of
Redis answering again after an outage. A new process loads the maps once before it serves
(:meth:`RedisRecalibrationStore.start`, under the usual deadline), so a restarted pod
answers with the shared map from its first request.

**Who refits: any pod.** Each pod starts a refit when the shared label count says one is
due (:class:`~proxy.online_recalibration.OnlineRecalibration`), so with feedback reaching
P pods up to P fits run per ``recalibrate_every`` labels; the compare-and-swap keeps one
winner per version, and the others adopt its map. No lock: a fit is a few milliseconds
on a worker thread (2,000 labels: ~3 ms), so a lock would save little, while it would
add a failure mode (a holder that dies delays every refit until the lock expires) and
still need the compare-and-swap for correctness (a holder paused past its lock's expiry).

**When Redis fails** (each failure counted in
``abstain_shared_state_errors_total{operation}`` as ``recalibration_label``,
``recalibration_read``, ``recalibration_swap`` or ``recalibration_refresh``, and logged
at most once a minute by :class:`~proxy.shared_state.redis_state.RedisState`):

* ``current()`` keeps serving the last map this process knew;
* a label is **kept in this process** (at most :data:`PENDING_MAX`, the oldest dropped
  beyond that, logged) and sent, in arrival order, with the next successful push or
  refresh. Kept rather than dropped because by the time a label is stored its feedback
  has already been claimed in Redis: a client retry would get ``duplicate`` and never
  bring the label back. (It is rare: feedback itself answers 503 while Redis is down.)
  Pending labels are not counted yet, so they start no refit;
* a refit that cannot read the labels or swap fails (``result="failed"``); the next is
  due ``recalibrate_every`` labels later;
* the poller does not try while the client backs off, then tries again, and its first
  success sends the pending labels and reloads the maps.

A Redis that restarted empty has lost the labels (the count starts again) and the maps;
each pod writes back the map it serves when Redis has none or an older one for that
tenant and model (``RESTORE``; the highest version wins), so the learnt maps survive
a Redis without persistence as long as one pod runs. To drop a learnt map, set
``recalibrate: false`` for the model (the shipped calibration answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
import uuid
from typing import Any

import orjson

from proxy.confidence.recalibration import Recalibration
from proxy.recalibration_store import Label
from proxy.shared_state.memory import SharedStateUnavailable
from proxy.shared_state.redis_recalibration_scripts import RESTORE, SWAP
from proxy.shared_state.redis_state import RedisState

log = logging.getLogger("abstain.recalibration")

#: Seconds between two polls of the epoch: the bound on how stale another pod's map is.
REFRESH_SECONDS = 1.0
#: Labels kept in this process while Redis cannot take them.
PENDING_MAX = 10_000
#: Labels kept in Redis per tenant and model (ABSTAIN_REDIS_RECALIBRATION_LABELS).
MAX_LABELS = 10_000
#: Deadline of the background reads whose reply can be large, instead of the request
#: deadline: a refit's labels took 40-160 ms for 10,000 on loopback (most of it parsing
#: the reply in Python), past the 50 ms a request's call may take.
SLOW_TIMEOUT = 2.0
#: Seconds between two log lines about dropped labels.
_LOG_INTERVAL = 60.0

_Key = tuple[str, str]


def _field(tenant: str, model: str) -> str:
    quote = urllib.parse.quote
    return f"{quote(tenant, safe='')}:{quote(model, safe='')}"


def _key_of(field: bytes) -> _Key | None:
    tenant, sep, model = field.decode(errors="replace").partition(":")
    if not sep:
        return None
    return urllib.parse.unquote(tenant), urllib.parse.unquote(model)


def _label(raw: bytes) -> Label:
    data = orjson.loads(raw)
    return Label(float(data["base"]), bool(data["correct"]), data.get("time"))


def _map(raw: bytes) -> Recalibration:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed recalibration: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("malformed recalibration: not an object")
    return Recalibration.from_dict(data)


class RedisRecalibrationStore:
    """Labels and maps in Redis, shared by every pod; maps served from a local copy."""

    def __init__(
        self,
        state: RedisState,
        *,
        max_labels: int = MAX_LABELS,
        refresh_seconds: float = REFRESH_SECONDS,
        pending_max: int = PENDING_MAX,
    ) -> None:
        self.state = state
        self.max_labels = max_labels
        self.refresh_seconds = refresh_seconds
        self.pending_max = pending_max
        prefix = f"{state.prefix}recal:"
        self._prefix = prefix
        self._maps_key = prefix + "maps"
        self._epoch_key = prefix + "epoch"
        #: every (tenant, model) that has labels, so a pod that stores none learns the counts
        self._index_key = prefix + "keys"
        #: the maps in service as last read from (or written to) Redis: what current() reads
        self._maps: dict[_Key, Recalibration] = {}
        #: the epoch token the copy was loaded at; reloaded when Redis holds another
        self._epoch: bytes | None = None
        self._loaded = False
        #: the shared label count of each key, as Redis last gave it (a flush or a poll)
        self._counts: dict[_Key, int] = {}
        #: labels Redis could not take yet, oldest first
        self._pending: list[tuple[_Key, bytes]] = []
        #: labels dropped because too many were pending (over the process's life)
        self.dropped = 0
        self._last_logged = -_LOG_INTERVAL
        self._task: asyncio.Task[None] | None = None

    def _keys(self, tenant: str, model: str) -> tuple[str, str]:
        name = _field(tenant, model)
        return f"{self._prefix}labels:{name}", f"{self._prefix}count:{name}"

    # --- the RecalibrationStore interface -------------------------------------------------

    async def add_label(self, tenant: str, model: str, label: Label) -> int:
        key = (tenant, model)
        self._counts.setdefault(key, 0)
        record = {"base": label.base, "correct": label.correct, "time": label.time}
        self._pending.append((key, orjson.dumps(record)))
        self._bound()
        # Counted and logged by the shared state; the label stays pending for the next try.
        with contextlib.suppress(SharedStateUnavailable):
            await self._flush()
        return self._counts[key]

    async def labels(self, tenant: str, model: str, limit: int | None = None) -> list[Label]:
        if limit is not None and limit <= 0:
            return []
        key, _ = self._keys(tenant, model)
        stop = -1 if limit is None else limit - 1
        raw: list[bytes] = await self.state.run(
            "recalibration_read", lambda client: client.lrange(key, 0, stop), timeout=SLOW_TIMEOUT
        )
        found: list[Label] = []
        skipped = 0
        for item in reversed(raw):  # stored newest first; the interface is oldest first
            try:
                found.append(_label(item))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                skipped += 1
        if skipped:
            log.warning(
                "recalibration labels of %s/%s: skipped %d unreadable", tenant, model, skipped
            )
        return found

    def current(self, tenant: str, model: str) -> Recalibration | None:
        # The hot path: a dict lookup, never Redis (the poller keeps the copy fresh).
        return self._maps.get((tenant, model))

    async def swap(self, tenant: str, model: str, new: Recalibration) -> bool:
        key = (tenant, model)
        args = [_field(tenant, model), new.version, self._encode(key, new), uuid.uuid4().hex]
        got = await self.state.run(
            "recalibration_swap",
            lambda client: self.state.script(SWAP)(
                keys=[self._maps_key, self._epoch_key], args=args, client=client
            ),
        )
        if int(got[0]) == 1:
            self._maps[key] = new
            return True
        # Another pod won this version (or holds a newer one): serve its map now rather
        # than after the next poll.
        if got[1]:
            with contextlib.suppress(ValueError):
                self._adopt(key, _map(got[1]))
        return False

    def known(self) -> list[tuple[str, str]]:
        return sorted(set(self._maps) | set(self._counts))

    def count(self, tenant: str, model: str) -> int:
        """The shared label count Redis last reported to this process (0 unknown)."""
        return self._counts.get((tenant, model), 0)

    @property
    def pending(self) -> int:
        """Labels waiting in this process for Redis to take them."""
        return len(self._pending)

    # --- keeping the local copy fresh -----------------------------------------------------

    async def start(self) -> None:
        """Load the maps once (under the usual deadline), then poll in the background."""
        try:
            await self.refresh()
        except SharedStateUnavailable:
            pass  # counted and logged; the poller tries again
        except Exception:  # never keep the proxy from starting: the shipped maps answer
            log.exception("recalibration: loading the shared maps failed; still polling")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def aclose(self) -> None:
        """Stop polling; one last try to send the pending labels."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            with contextlib.suppress(SharedStateUnavailable):
                await self._flush()
        if self._pending:
            log.warning("recalibration: %d label(s) not stored at exit", len(self._pending))

    async def refresh(self) -> None:
        """One poll: send the pending labels, read every key's label count, then reload
        the maps if the epoch moved.

        Raises :class:`SharedStateUnavailable` at the first call that fails (counted).
        """
        if self._pending:
            await self._flush()
        await self._refresh_counts()
        token: bytes | None = await self.state.run(
            "recalibration_refresh", lambda client: client.get(self._epoch_key)
        )
        # No epoch while this process holds maps: Redis lost them (restarted empty), even
        # if it had no epoch either when this process last looked.
        if self._loaded and token == self._epoch and (token is not None or not self._maps):
            return
        raw: dict[bytes, bytes] = await self.state.run(
            "recalibration_refresh",
            lambda client: client.hgetall(self._maps_key),
            timeout=SLOW_TIMEOUT,
        )
        stored: dict[_Key, Recalibration] = {}
        for name, value in raw.items():
            key = _key_of(name)
            try:
                if key is None:
                    raise ValueError("not tenant:model")
                stored[key] = _map(value)
            except ValueError as exc:
                log.warning("recalibration map %r in Redis skipped: %s", name[:200], exc)
        for key, recalibration in stored.items():
            self._adopt(key, recalibration)
        # Maps Redis no longer has (it restarted empty) or has older: write them back.
        for key, mine in list(self._maps.items()):
            there = stored.get(key)
            if there is None or there.version < mine.version:
                await self._restore(key, mine)
        self._epoch, self._loaded = token, True

    async def _refresh_counts(self) -> None:
        """The shared label counts of every key with labels, from any pod: what
        :meth:`count` answers (a target_error threshold from feedback reads it)."""
        names: set[bytes] = await self.state.run(
            "recalibration_refresh", lambda client: client.smembers(self._index_key)
        )
        keys = [key for key in map(_key_of, sorted(names)) if key is not None]
        if not keys:
            return
        counts: list[bytes | None] = await self.state.run(
            "recalibration_refresh",
            lambda client: client.mget([self._keys(*key)[1] for key in keys]),
        )
        for key, value in zip(keys, counts, strict=True):
            self._counts[key] = int(value or 0)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            if not self.state.available:
                # Backing off after a failure: the next call after it tries (and counts).
                continue
            try:
                await self.refresh()
            except SharedStateUnavailable:
                pass  # counted and logged by the shared state; the last maps keep serving
            except Exception:  # a bug must not stop the refreshing
                log.exception("recalibration: refreshing the shared maps failed")

    def _adopt(self, key: _Key, new: Recalibration) -> None:
        """Serve ``new`` unless this process has a newer map (then it is written back)."""
        old = self._maps.get(key)
        if old is not None and (old.version > new.version or old == new):
            return
        self._maps[key] = new
        if old is not None and old.version == new.version:
            return  # the same version, fitted elsewhere: same metric series
        info = self.state.metrics.recalibration_info
        if old is not None:
            info.labels(key[0], key[1], str(old.version)).set(0)
        info.labels(key[0], key[1], str(new.version)).set(1)
        log.info(
            "recalibration %s for tenant %s, model %s: from the shared store",
            new.version,
            key[0],
            key[1],
        )

    async def _restore(self, key: _Key, mine: Recalibration) -> None:
        args = [_field(*key), mine.version, self._encode(key, mine), uuid.uuid4().hex]
        written = await self.state.run(
            "recalibration_refresh",
            lambda client: self.state.script(RESTORE)(
                keys=[self._maps_key, self._epoch_key], args=args, client=client
            ),
        )
        if int(written):
            log.warning(
                "recalibration %s for tenant %s, model %s: written back to Redis, which "
                "had lost it (restarted empty?)",
                mine.version,
                key[0],
                key[1],
            )

    @staticmethod
    def _encode(key: _Key, recalibration: Recalibration) -> bytes:
        return orjson.dumps({"tenant": key[0], "model": key[1], **recalibration.to_dict()})

    # --- labels Redis could not take yet --------------------------------------------------

    async def _flush(self) -> None:
        """Send every pending label in one MULTI; on failure keep them (and raise)."""
        # Take the batch before the await: concurrent flushes then send disjoint batches.
        batch, self._pending = self._pending, []
        if not batch:
            return
        grouped: dict[_Key, list[bytes]] = {}
        for key, record in batch:
            grouped.setdefault(key, []).append(record)
        cap = self.max_labels

        async def send(client: Any) -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                for (tenant, model), records in grouped.items():
                    labels, count = self._keys(tenant, model)
                    pipe.lpush(labels, *records)
                    pipe.ltrim(labels, 0, cap - 1)
                    pipe.incrby(count, len(records))
                    pipe.sadd(self._index_key, _field(tenant, model))
                replies: list[Any] = await pipe.execute()
                return replies

        try:
            replies = await self.state.run("recalibration_label", send)
        except SharedStateUnavailable:
            self._pending = batch + self._pending
            self._bound()
            raise
        for i, key in enumerate(grouped):
            self._counts[key] = int(replies[4 * i + 2])

    def _bound(self) -> None:
        over = len(self._pending) - self.pending_max
        if over <= 0:
            return
        del self._pending[:over]
        self.dropped += over
        moment = time.monotonic()
        if moment - self._last_logged >= _LOG_INTERVAL:
            self._last_logged = moment
            log.warning(
                "recalibration: Redis has not taken labels for a while; %d label(s) "
                "dropped so far (the newest %d are kept until it answers)",
                self.dropped,
                self.pending_max,
            )
