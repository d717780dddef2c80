"""Which logprob entries of a ``streaming: sentence`` choice its client may get.

A token goes out only when every character of it is sent as the model wrote it: in an
answered or annotated sentence, in code, in the white space between parts. A withheld
or hedged sentence's tokens (which would spell out what was withheld), and a token that
straddles one, never do. :class:`VerbatimLogprobs` keeps a choice's wire entries as they
stream in and releases them run by run; :mod:`proxy.sentence_choice` says which runs of
text go out verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.spans import Alignment
from proxy.protocol import trim_top_logprobs


@dataclass(slots=True)
class VerbatimLogprobs:
    """One choice's logprob entries, released only with the text sent as written."""

    #: the client asked for logprobs: keep each scored token's wire entry
    keep: bool
    #: logprob entries received (every token the upstream generated for this choice)
    generated: int = 0
    #: the wire entry of each scored token: a chat entry dict, or (token, logprob, top,
    #: text_offset) of the completions shape
    entries: list[Any] = field(default_factory=list)
    chat_shape: bool = True
    #: the next entry not yet released or dropped; the verbatim run it may go out in
    next_token: int = 0
    run_start: int | None = None
    run_client: int = 0
    #: where each entry's token starts in the choice's text, placed once each
    alignment: Alignment = field(default_factory=Alignment)
    #: the tokens could not be placed in the text: which are safe is unknown, none goes
    failed: bool = False

    def add(self, logprobs: dict[str, Any]) -> None:
        """Take one delta's ``logprobs`` (either wire shape)."""
        content = logprobs.get("content")
        if isinstance(content, list):
            self.generated += len(content)
            if self.keep:
                self.entries += [e for e in content if e.get("logprob") is not None]
            return
        tokens = logprobs.get("tokens")
        if not isinstance(tokens, list):
            return
        self.generated += len(tokens)
        if self.keep:
            self.chat_shape = False
            lps = logprobs.get("token_logprobs") or []
            tops = logprobs.get("top_logprobs") or []
            at = logprobs.get("text_offset") or []
            for i, token in enumerate(tokens):
                lp = lps[i] if i < len(lps) else None
                if lp is not None:
                    top = tops[i] if i < len(tops) else None
                    self.entries.append((token, lp, top, at[i] if i < len(at) else None))

    def restart(self) -> None:
        """Nothing was sent: every entry may go out again with what is placed anew."""
        self.next_token, self.run_start, self.run_client = 0, None, 0

    def verbatim(self, text: str, start: int, end: int, client_start: int) -> list[Any]:
        """``text[start:end]`` goes out as written, at ``client_start`` in the client's text:
        the entries of the tokens now wholly inside the current verbatim run."""
        offsets = self._offsets(text)
        if offsets is None:
            return []
        if self.run_start is None:
            self.run_start, self.run_client = start, client_start
        released = []
        while self.next_token < len(offsets):
            at = offsets[self.next_token]
            if at + len(self._token(self.next_token)) > end:
                break  # not all of it is out yet
            if at >= self.run_start:
                released.append(self._client_entry(self.next_token, at))
            self.next_token += 1
        return released

    def withheld(self, text: str, end: int) -> None:
        """``text`` up to ``end`` is not sent as written: its tokens never go out."""
        offsets = self._offsets(text)
        self.run_start = None
        if offsets is None:
            return
        while self.next_token < len(offsets) and offsets[self.next_token] < end:
            self.next_token += 1

    def as_logprobs(self, entries: list[Any], top_k: int | None) -> dict[str, Any]:
        """The client's ``logprobs`` object for ``entries``, in the upstream's shape."""
        out: dict[str, Any]
        if self.chat_shape:
            out = {"content": entries}
        else:
            out = {
                "tokens": [e[0] for e in entries],
                "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries],
                "text_offset": [e[3] for e in entries],
            }
        if top_k is not None:
            trim_top_logprobs(out, top_k)
        return out

    def _offsets(self, text: str) -> list[int] | None:
        """Where each entry's token starts in ``text`` (each placed once, as it came)."""
        if self.failed or not self.keep:
            return None
        new = [self._token(i) for i in range(len(self.alignment.offsets), len(self.entries))]
        strings = [t for t in new if t is not None]
        if len(strings) != len(new):
            self.failed = True
            return None
        offsets = self.alignment.add(strings, text)
        if offsets is None:
            self.failed = True
        return offsets

    def _token(self, i: int) -> Any:
        entry = self.entries[i]
        token = entry.get("token") if isinstance(entry, dict) else entry[0]
        return token if isinstance(token, str) else None

    def _client_entry(self, i: int, at: int) -> Any:
        entry = self.entries[i]
        if isinstance(entry, dict):
            return entry
        assert self.run_start is not None
        token, lp, top, offset = entry
        # Where the token is in the client's text, on the upstream's own base.
        if isinstance(offset, int):
            offset += self.run_client + (at - self.run_start) - at
        return (token, lp, top, offset)
