"""Secrets out of anything the proxy returns or logs, including what an upstream echoes.

An upstream that rejects a request often repeats it in its error message, Authorization
header included ("Invalid key provided: Bearer sk-..."). :class:`Redactor` replaces

* every configured secret (the upstream keys the policy names), wherever it appears;
* any ``Bearer <token>`` and any ``sk-...`` style key, configured or not,

with ``[REDACTED]``. Pure: standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MARK = "[REDACTED]"

#: Bearer tokens and OpenAI-style keys (sk-..., sk-proj-...), whoever they belong to.
_PATTERN = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|\bsk-[A-Za-z0-9_\-]{6,}")
#: Shorter strings are not treated as secrets: redacting "abc" would shred messages.
_MIN_SECRET = 8


def _replace(match: re.Match[str]) -> str:
    return (match.group(1) or "") + MARK


class Redactor:
    """Removes known secrets and key-shaped tokens from text."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so a key that contains another is removed whole.
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        """Known secrets and key-shaped tokens out of a message (an error, a log line)."""
        return _PATTERN.sub(_replace, self.known(text))

    def known(self, text: str) -> str:
        """Only the configured secrets out of text: for answers, where a model may well
        write "Bearer" or "sk-" and mean it."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MARK)
        return text

    def bytes(self, raw: bytes) -> bytes:
        """Known secrets out of a raw body (an upstream's answer), cheaply when absent."""
        for secret in self._secrets:
            encoded = secret.encode()
            if encoded in raw:
                raw = raw.replace(encoded, MARK.encode())
        return raw


#: Redacts key-shaped tokens only, for places that know no configured secret.
PATTERNS_ONLY = Redactor()
