"""Reading policy files: YAML parsing, validation messages with key paths, and reload.

:func:`load_policy` turns a file into a compiled :class:`~proxy.policy.Policy` or raises
:class:`PolicyError` listing *every* problem as ``file: key.path: message``.
:class:`PolicyStore` holds the policy in force and swaps it atomically on reload; a
broken new file is reported and the old policy keeps serving.

Parsing is bounded, because a policy file is input that a reload reads while serving:

* the file may be at most :data:`MAX_POLICY_BYTES` (1 MiB), and must be UTF-8;
* nesting may be at most :data:`MAX_DEPTH` (64) collections deep, checked while the
  YAML is composed, so a 100k-deep file is refused before Python's recursion limit;
* YAML anchors and aliases are allowed (they are handy for sharing tenant settings),
  but the document *as aliases expand it* may hold at most :data:`MAX_NODES` (200,000)
  nodes and at most :data:`MAX_ALIASES` (10,000) aliases. A "billion laughs" alias bomb
  is a few hundred composed nodes that expand to billions; it is refused after
  composing, before anything (the constructor, pydantic) walks the expansion.
  Recursive aliases (an anchor used inside itself) are refused too.

A reload (:meth:`PolicyStore.reload` / :meth:`PolicyStore.reload_async`) never raises:
every failure of any kind is logged, counted through ``on_reload("failure")``, and the
old policy keeps serving. ``reload_async`` parses in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.confidence.calibration import Calibration, CalibrationError, load_calibration
from proxy.policy.rules import Policy, PolicyFile
from proxy.policy.schema import reference_problems

log = logging.getLogger("abstain.policy")


class PolicyError(ValueError):
    """A policy file could not be loaded; ``problems`` lists each one with its location."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{_loc(loc)}: {message}")
    return problems


#: Largest policy file read, in bytes.
MAX_POLICY_BYTES = 1024 * 1024
#: Deepest nesting of mappings and sequences.
MAX_DEPTH = 64
#: Most nodes in the document once aliases are expanded.
MAX_NODES = 200_000
#: Most alias uses (``*name``) in one document.
MAX_ALIASES = 10_000


class _TooComplex(yaml.YAMLError):
    """The document exceeds a parsing bound; ``problem`` says which."""

    def __init__(self, problem: str, mark: Any = None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting, many aliases and huge alias expansions."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def _mark(self) -> Any:
        return self.peek_event().start_mark  # type: ignore[no-untyped-call]

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _TooComplex(f"more than {MAX_ALIASES} aliases", self._mark())
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooComplex(f"nested more than {MAX_DEPTH} levels deep", self._mark())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose alias expansion is too large, too deep or recursive.

    Walks the node graph once, memoizing each shared node's expanded (size, height),
    so the cost is linear in the composed document, not in its expansion.
    """
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise _TooComplex("an alias refers to a node that contains it", node.start_mark)
        if key not in done:
            size, height = 1, 0
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            active.add(key)
            for child in children:
                child_size, child_height = visit(child, depth + 1)
                size += child_size
                height = max(height, child_height + 1)
                if size > MAX_NODES:
                    raise _TooComplex(
                        f"more than {MAX_NODES} values once aliases are expanded",
                        node.start_mark,
                    )
            active.discard(key)
            done[key] = (size, height)
        size, height = done[key]
        if depth + height > MAX_DEPTH:
            raise _TooComplex(
                f"nested more than {MAX_DEPTH} levels deep once aliases are expanded",
                node.start_mark,
            )
        return size, height

    visit(root, 0)


def _load_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_policy(text: str, path: str = "<string>", base_dir: Path | None = None) -> Policy:
    """Validate policy YAML text and compile it; raises :class:`PolicyError`."""
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "refused" if isinstance(exc, _TooComplex) else "not valid YAML"
        raise PolicyError(path, [f"{where}{what} ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise PolicyError(path, ["(top level): the policy must be a mapping"])
    try:
        spec = PolicyFile.model_validate(data)
    except ValidationError as exc:
        found = _validation_problems(exc)
        # Cross-references are checked after the fields; report them in this run too.
        found += [p for p in reference_problems(data) if p not in " ".join(found)]
        raise PolicyError(path, found) from None

    calibrations: dict[str, Calibration] = {}
    problems: list[str] = []
    for where, ref in _calibration_refs(spec):
        if ref in calibrations:
            continue
        file = Path(ref) if base_dir is None or Path(ref).is_absolute() else base_dir / ref
        try:
            calibrations[ref] = load_calibration(file)
        except CalibrationError as exc:
            problems.append(f"{where}.calibration: {exc}")
    if problems:
        raise PolicyError(path, problems)
    return Policy(spec, calibrations, source=path)


def _calibration_refs(spec: PolicyFile) -> list[tuple[str, str]]:
    refs = []
    if spec.defaults.calibration:
        refs.append(("defaults", spec.defaults.calibration))
    refs += [(f"models.{n}", m.calibration) for n, m in spec.models.items() if m.calibration]
    refs += [(f"tenants.{n}", t.calibration) for n, t in spec.tenants.items() if t.calibration]
    return refs


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile a policy file."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(str(p), [f"cannot read file ({exc.strerror or exc})"]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            str(p), [f"the file is larger than the limit of {MAX_POLICY_BYTES} bytes"]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            str(p), [f"not valid UTF-8 (byte offset {exc.start}: {exc.reason})"]
        ) from None
    return parse_policy(text, str(p), p.resolve().parent)


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)


def _log_warnings(policy: Policy) -> None:
    for warning in policy.warnings():
        log.warning("%s: %s", policy.source, warning)


class PolicyStore:
    """The policy in force, and its reload.

    ``on_reload(result)`` is told ``"success"`` or ``"failure"`` after every attempt, so
    that metrics stay out of this module.
    """

    def __init__(self, path: str | Path, on_reload: Callable[[str], None] | None = None):
        self.path = Path(path)
        self._on_reload = on_reload or (lambda _result: None)
        self._stamp = _stamp(self.path)
        self.current: Policy = load_policy(self.path)
        self.last_error: str | None = None
        self._lock: asyncio.Lock | None = None
        _log_warnings(self.current)

    def _attempt(self) -> tuple[_Stamp | None, Policy | None, str | None]:
        """Read and compile the file; never raises. Safe to run in a worker thread."""
        stamp = _stamp(self.path)
        try:
            return stamp, load_policy(self.path), None
        except PolicyError as exc:
            return stamp, None, str(exc)
        except RecursionError:
            return stamp, None, f"{self.path}: the policy is nested too deeply to read"
        except Exception as exc:  # any failure at all must keep the old policy
            log.exception("unexpected error while reading the policy %s", self.path)
            return stamp, None, f"{self.path}: cannot load the policy ({type(exc).__name__})"

    def _apply(self, stamp: _Stamp | None, policy: Policy | None, error: str | None) -> bool:
        self._stamp = stamp
        if policy is None:
            self.last_error = error or f"{self.path}: cannot load the policy"
            log.error("policy reload rejected, keeping the previous policy:\n%s", self.last_error)
            self._on_reload("failure")
            return False
        self.current = policy
        self.last_error = None
        _log_warnings(policy)
        log.info("policy reloaded from %s", self.path)
        self._on_reload("success")
        return True

    def reload(self) -> bool:
        """Load the file again; keep the old policy if the new one is broken. Never raises."""
        return self._apply(*self._attempt())

    async def reload_async(self) -> bool:
        """:meth:`reload` with the reading and parsing done in a worker thread.

        The result is applied (and ``on_reload`` called) on the event loop; concurrent
        calls (the watcher and SIGHUP) are serialized.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return self._apply(*await asyncio.to_thread(self._attempt))

    def changed(self) -> bool:
        """Whether the file on disk differs from the one last read."""
        return _stamp(self.path) != self._stamp
