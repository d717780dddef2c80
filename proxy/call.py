"""One admitted request on its way through the proxy: :class:`Call`.

Routes create it once the tenant, the route and the rule are known; the pipeline,
streaming and recording read it, and add what they learn (upstream time, the response
id feedback will refer to, the model's own answers when text is logged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.recalibration import Recalibration
from proxy.policy.rules import Route, Rule
from proxy.protocol import Kind, client_top_logprobs, client_wants_logprobs, wants_json


@dataclass(slots=True)
class Call:
    """One validated client request, with who sent it and the rule that applies."""

    kind: Kind
    body: dict[str, Any]
    tenant: str
    route: Route
    rule: Rule
    started: float = field(default_factory=time.perf_counter)
    #: seconds spent waiting on the upstream for the main answer, summed as spent
    upstream_seconds: float = 0.0
    upstream_called: bool = False
    #: the id of the response sent to the client (for feedback), once known
    response_id: str | None = None
    #: the model's own answers before any rewrite, kept only when the rule logs text
    answers: list[str | None] | None = None
    #: the map learnt from the tenant's feedback that judges this call, fixed when the
    #: upstream is called: a swap mid-stream cannot judge one answer with two maps
    recalibration: Recalibration | None = None

    @property
    def client_logprobs(self) -> bool:
        return client_wants_logprobs(self.kind, self.body)

    @property
    def client_top_k(self) -> int | None:
        """The alternatives per token to leave in the client's answer, when the proxy asked
        the upstream for more than the client did (None: nothing to cut)."""
        if not self.uses_logprobs:
            return None
        k = client_top_logprobs(self.kind, self.body)
        return k if k is not None and k < self.rule.top_logprobs else None

    @property
    def uses_logprobs(self) -> bool:
        return self.rule.method in ("logprobs", "hybrid")

    @property
    def json_mode(self) -> bool:
        return wants_json(self.body)
