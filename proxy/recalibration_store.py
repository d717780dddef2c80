"""Where recalibration labels and the map in service live, per tenant and model.

:class:`RecalibrationStore` is the one interface, with :class:`MemoryStore` (lost at
exit) and :class:`FileStore` (one JSON Lines file per tenant and model in a directory,
so it survives a restart). A shared store (Redis, for several replicas:
:class:`proxy.shared_state.redis_recalibration.RedisRecalibrationStore`) implements the
same six methods. :mod:`proxy.online_recalibration` turns feedback into labels and
refits on top of a store.

A label is the **shipped** calibration's P(correct) for the answer and whether it was
right, never the recalibrated confidence the client saw: each fit starts again from the
shipped map, so maps do not stack.

Where the file store lives: ``ABSTAIN_RECALIBRATION_DIR``; unset, the directory
``recalibration/`` beside the decision log (``ABSTAIN_DECISION_LOG``); with neither (or
a decision log on standard output) labels and maps are kept in memory only.

File format (``<dir>/<tenant>@<model>.jsonl``, both names percent-encoded), append only::

    {"type": "label", "base": 0.83, "correct": false, "time": "2026-12-01T10:00:00Z"}
    {"type": "recalibration", "slope": 0.71, "intercept": -0.9, "version": 1, "n": 100, ...}

The last ``recalibration`` line is the map in service. A torn last line (a crash while
writing) is skipped when the file is read. One process writes a directory; several
workers or replicas need a shared store.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from proxy.confidence.recalibration import Recalibration
from proxy.settings import Settings

log = logging.getLogger("abstain.recalibration")

#: Labels of one tenant and model kept in memory (the file keeps every one).
MEMORY_LABELS = 100_000


@dataclass(frozen=True, slots=True)
class Label:
    """One feedback label: the shipped calibration's P(correct), and whether it was right."""

    base: float
    correct: bool
    time: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"type": "label", "base": self.base, "correct": self.correct, "time": self.time}


class RecalibrationStore(Protocol):
    """Where labels and the map in service live, per (tenant, model).

    ``current`` and ``known`` are called on the request path: they must not wait on I/O
    (keep a cache, refreshed on :meth:`swap` and however else the backend learns of
    another writer's swap). The others are awaited off the request path.
    """

    async def add_label(self, tenant: str, model: str, label: Label) -> int:
        """Append a label; returns how many labels (tenant, model) has now."""
        ...

    async def labels(self, tenant: str, model: str, limit: int | None = None) -> list[Label]:
        """The labels in arrival order, oldest first; only the newest ``limit`` when given."""
        ...

    def current(self, tenant: str, model: str) -> Recalibration | None:
        """The map in service, or None (the shipped calibration answers)."""
        ...

    async def swap(self, tenant: str, model: str, new: Recalibration) -> bool:
        """Put ``new`` in service iff ``new.version`` is one past the current version
        (0 without one): a compare-and-swap, so two writers cannot both swap. Returns
        whether it was swapped in."""
        ...

    def known(self) -> list[tuple[str, str]]:
        """Every (tenant, model) with labels or a map."""
        ...

    def count(self, tenant: str, model: str) -> int:
        """How many labels (tenant, model) has, as far as this process knows (no I/O)."""
        ...


@dataclass(slots=True)
class _Entry:
    labels: deque[Label]
    count: int = 0
    current: Recalibration | None = None


class MemoryStore:
    """Labels and maps in this process's memory: gone at exit."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, tenant: str, model: str) -> _Entry:
        key = (tenant, model)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(deque(maxlen=MEMORY_LABELS))
        return entry

    def _persist(self, tenant: str, model: str, record: dict[str, object]) -> None:
        """Where a durable store writes the record (nothing here)."""

    async def add_label(self, tenant: str, model: str, label: Label) -> int:
        with self._lock:
            self._persist(tenant, model, label.to_json())
            entry = self._entry(tenant, model)
            entry.labels.append(label)
            entry.count += 1
            return entry.count

    async def labels(self, tenant: str, model: str, limit: int | None = None) -> list[Label]:
        with self._lock:
            entry = self._entries.get((tenant, model))
            if entry is None:
                return []
            found = list(entry.labels)
        return found[-limit:] if limit is not None and limit < len(found) else found

    def current(self, tenant: str, model: str) -> Recalibration | None:
        entry = self._entries.get((tenant, model))
        return None if entry is None else entry.current

    async def swap(self, tenant: str, model: str, new: Recalibration) -> bool:
        with self._lock:
            entry = self._entry(tenant, model)
            version = entry.current.version if entry.current is not None else 0
            if new.version != version + 1:
                return False
            record = {"type": "recalibration", "tenant": tenant, "model": model}
            self._persist(tenant, model, {**record, **new.to_dict()})
            entry.current = new
            return True

    def known(self) -> list[tuple[str, str]]:
        return sorted(self._entries)

    def count(self, tenant: str, model: str) -> int:
        entry = self._entries.get((tenant, model))
        return 0 if entry is None else entry.count


def file_name(tenant: str, model: str) -> str:
    """The file of (tenant, model): both names percent-encoded, so any name is safe."""
    quote = urllib.parse.quote
    return f"{quote(tenant, safe='')}@{quote(model, safe='')}.jsonl"


def key_of(path: Path) -> tuple[str, str] | None:
    tenant, sep, model = path.name.removesuffix(".jsonl").partition("@")
    if not sep:
        return None
    return urllib.parse.unquote(tenant), urllib.parse.unquote(model)


class FileStore(MemoryStore):
    """A :class:`MemoryStore` that appends every label and swap to a file, and reads
    the directory back when it starts (the recalibration survives a restart)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        #: lines that could not be read (a torn write), over every file
        self.skipped = 0
        if directory.is_dir():
            for path in sorted(directory.glob("*.jsonl")):
                key = key_of(path)
                if key is not None:
                    self._load(path, *key)

    def _load(self, path: Path, tenant: str, model: str) -> None:
        entry = self._entry(tenant, model)
        skipped = 0
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
                if data.get("type") == "label":
                    entry.labels.append(
                        Label(float(data["base"]), bool(data["correct"]), data.get("time"))
                    )
                    entry.count += 1
                elif data.get("type") == "recalibration":
                    entry.current = Recalibration.from_dict(data)
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                skipped += 1
        if skipped:
            self.skipped += skipped
            log.warning("recalibration store %s: skipped %d unreadable line(s)", path, skipped)

    def _persist(self, tenant: str, model: str, record: dict[str, object]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / file_name(tenant, model), "ab") as fh:
            fh.write(orjson.dumps(record) + b"\n")


def store_for(settings: Settings, shared: RecalibrationStore | None = None) -> RecalibrationStore:
    """The store the settings ask for (see the module text for the defaults).

    With ``ABSTAIN_REDIS_URL``, ``shared`` is the Redis store
    (:class:`proxy.shared_state.redis_recalibration.RedisRecalibrationStore`), built by
    :mod:`proxy.app` beside the other Redis pieces (it imports this module, so it is not
    built here), and it is used instead of any directory: every pod then reads and
    writes the same labels and maps.
    """
    if shared is not None:
        if settings.recalibration_dir is not None:
            log.warning("ABSTAIN_RECALIBRATION_DIR is ignored: with Redis, labels live there")
        return shared
    if settings.redis_url is not None:
        raise ValueError("ABSTAIN_REDIS_URL is set: pass the Redis recalibration store")
    directory = settings.recalibration_dir
    log_path = settings.decision_log
    if directory is None and log_path is not None and str(log_path) != "-":
        directory = log_path.parent / "recalibration"
    return MemoryStore() if directory is None else FileStore(directory)
