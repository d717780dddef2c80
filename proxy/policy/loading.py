"""Reading policy files: YAML parsing, validation messages with key paths, and reload.

:func:`load_policy` turns a file into a compiled :class:`~proxy.policy.Policy` or raises
:class:`PolicyError` listing *every* problem as ``file: key.path: message``.
:class:`PolicyStore` holds the policy in force and swaps it atomically on reload; a
broken new file is reported and the old policy keeps serving.
"""

from __future__ import annotations

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


def parse_policy(text: str, path: str = "<string>", base_dir: Path | None = None) -> Policy:
    """Validate policy YAML text and compile it; raises :class:`PolicyError`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyError(
            path, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]
        ) from None
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
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(p), [f"cannot read file ({exc.strerror})"]) from None
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
        _log_warnings(self.current)

    def reload(self) -> bool:
        """Load the file again; keep the old policy if the new one is broken."""
        stamp = _stamp(self.path)
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self._stamp = stamp
            self.last_error = str(exc)
            log.error("policy reload rejected, keeping the previous policy:\n%s", exc)
            self._on_reload("failure")
            return False
        self._stamp = stamp
        self.current = policy
        self.last_error = None
        _log_warnings(policy)
        log.info("policy reloaded from %s", self.path)
        self._on_reload("success")
        return True

    def changed(self) -> bool:
        """Whether the file on disk differs from the one last read."""
        return _stamp(self.path) != self._stamp
