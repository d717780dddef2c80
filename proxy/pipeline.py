"""The request pipeline: upstream call → evidence → judge → rewrite, for one admitted call.

Routes hand over a validated :class:`~proxy.call.Call`; :meth:`Pipeline.complete`
returns the judged, rewritten response and one :class:`~proxy.verdict.Verdict` per
choice, and :meth:`Pipeline.open_stream` an :class:`UpstreamStream` whose chunks the
streaming layer relays before asking it for the verdicts. Both go down the same stages:

1. the upstream request: the client's body, the upstream's model name, logprobs on;
2. samples drawn alongside it, when the method needs them (:mod:`proxy.sampling`);
3. evidence gathered from the answer (:mod:`proxy.evidence`), with the samples attached;
4. verdicts, made in one place (:func:`proxy.judge.judge_call`);
5. the rewrite (:mod:`proxy.rewrite`) or, for streams, the verdict chunk; and the record
   of it all (:class:`~proxy.recording.Recorder`), where upstream time is observed once.

It knows the OpenAI wire format only through :mod:`proxy.protocol` and upstreams only
through their protocol.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from proxy.call import Call
from proxy.confidence.features import reads_text
from proxy.confidence.question import question_of
from proxy.confidence.recalibration import Recalibration
from proxy.errors import UpstreamError
from proxy.evidence import CallEvidence, from_response
from proxy.feedback_risk import FeedbackRisk
from proxy.judge import drifted_rule, judge_call, shown_answer, skip_reason
from proxy.online_recalibration import OnlineRecalibration, recalibration_model
from proxy.protocol import Kind, choices_of, upstream_body
from proxy.recording import Recorder
from proxy.rewrite import rewrite_response
from proxy.sampling.session import Matchers, SamplingSession
from proxy.upstream.base import Upstream
from proxy.upstream.pool import UpstreamPool
from proxy.verdict import Verdict

T = TypeVar("T")


class Pipeline:
    """Runs calls against upstreams and judges their answers."""

    def __init__(
        self,
        upstreams: UpstreamPool,
        recorder: Recorder,
        matchers: Matchers | None = None,
        recalibration: OnlineRecalibration | None = None,
        feedback_risk: FeedbackRisk | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.recorder = recorder
        self.matchers = matchers or Matchers()
        #: the maps learnt from feedback (issue 12.2); None: the calibrations as shipped
        self.recalibration = recalibration
        #: target_error thresholds chosen from feedback (issue 12.3); None: from the
        #: calibrations' validation labels only
        self.feedback_risk = feedback_risk

    async def complete(self, call: Call) -> tuple[dict[str, Any], list[Verdict]]:
        """A non-streaming completion, judged and rewritten.

        Its verdicts are not recorded yet: :meth:`answered` records them once the
        response is on its way, so that metrics and the decision log are not in the
        client's wait (and a response that fails to go out is not counted as answered).
        """
        upstream, body = self._upstream_request(call)
        self._learnt(call)
        body.pop("stream", None)
        body.pop("stream_options", None)
        session = self._start_sampling(call, upstream, body)
        try:
            response = await self._timed(call, _fetch(upstream, call.kind, body))
            evidence = from_response(
                call.kind, response, json_mode=call.json_mode, keep_tokens=keeps_tokens(call)
            )
            call.response_id = ensure_id(response)
            verdicts = await self._judge(call, evidence, session, record=False)
        except UpstreamError as exc:
            self.recorder.upstream_failed(call, exc)
            raise
        finally:
            # Failed, cancelled (client gone) or done: no sample may outlive the request.
            if session is not None:
                session.cancel()
        rewrite_response(
            call.kind,
            response,
            verdicts,
            call.rule,
            keep_logprobs=call.client_logprobs,
            top_k=call.client_top_k,
            shown=shown_answer(evidence, call.rule),
        )
        return response, verdicts

    async def open_stream(self, call: Call) -> UpstreamStream:
        """Start the upstream stream and wait for its first chunk.

        Errors before the first chunk raise here, so the client still gets a status code.
        """
        upstream, body = self._upstream_request(call)
        self._learnt(call)
        session = self._start_sampling(call, upstream, body)
        stream = UpstreamStream(self, call, upstream.stream(call.kind, body), session)
        try:
            await stream.start()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def finish(
        self, call: Call, verdicts: list[Verdict], status: int, ttfb: float | None = None
    ) -> None:
        """The call is over (answered, failed or streamed out): record it."""
        self.recorder.finished(call, verdicts, status, ttfb)

    async def answered(self, call: Call, verdicts: list[Verdict]) -> None:
        """A :meth:`complete` call's response was sent: record its verdicts and the call.

        A coroutine with nothing to await, run as the response's background task: it
        runs to its end as soon as the body is written, before this process reads the
        next request (so a feedback for this response always finds it remembered).
        """
        self.recorder.verdicts(call, verdicts)
        self.recorder.finished(call, verdicts, 200)

    def recalibration_for(self, call: Call) -> Recalibration | None:
        """The map learnt from the tenant's feedback that judges this call, if any."""
        if self.recalibration is None or call.rule.recalibrate is None:
            return None
        name = recalibration_model(call.route.model, call.rule.granularity)
        return self.recalibration.current(call.tenant, name)

    def _learnt(self, call: Call) -> None:
        """What the tenant's feedback and traffic change for this call, fixed when it
        starts: the map that judges it, for a ``target_error`` rule the threshold, and for
        a ``drift_psi`` rule whether the traffic has drifted."""
        call.recalibration = self.recalibration_for(call)
        shipped = call.rule
        if self.feedback_risk is not None and call.rule.risk is not None:
            name = recalibration_model(call.route.model, call.rule.granularity)
            call.rule = self.feedback_risk.rule_for(
                call.rule, call.tenant, name, call.recalibration
            )
        level = call.rule.drift_psi
        # Drift says the shipped calibration no longer describes the traffic. Once a map
        # or a threshold learnt from the tenant's own labels answers, those labels decide.
        if level is not None and call.recalibration is None and call.rule is shipped:
            drift = self.recorder.drift.drifted(call.tenant, call.route.model, level)
            if drift is not None:
                call.rule = drifted_rule(call.rule, drift.to_dict())

    def _upstream_request(self, call: Call) -> tuple[Upstream, dict[str, Any]]:
        upstream = self.upstreams.get(call.route.upstream)
        top = call.rule.top_logprobs if call.uses_logprobs else None
        return upstream, upstream_body(call.kind, call.body, call.route.upstream_model, top)

    def _start_sampling(
        self, call: Call, upstream: Upstream, body: dict[str, Any]
    ) -> SamplingSession | None:
        """Start drawing samples now, alongside the main answer, when the method needs them."""
        sampling = call.rule.sampling
        if sampling is None:
            return None
        if skip_reason(call.rule, tool_call=False, json_mode=call.json_mode) is not None:
            return None
        matcher = self.matchers.get(sampling)
        return SamplingSession(call.rule, upstream, call.kind, body, matcher)

    async def _timed(self, call: Call, waiting: Awaitable[T]) -> T:
        """Wait on the upstream, adding the time to the call's upstream seconds."""
        call.upstream_called = True
        t0 = time.perf_counter()
        try:
            return await waiting
        finally:
            call.upstream_seconds += time.perf_counter() - t0

    async def _judge(
        self,
        call: Call,
        evidence: CallEvidence,
        session: SamplingSession | None,
        settle: Callable[[list[Verdict]], None] | None = None,
        *,
        record: bool = True,
    ) -> list[Verdict]:
        """Attach the samples (when drawn), judge every choice, and count the verdicts
        (unless ``record`` is false: the caller records them later).

        ``settle`` sees the verdicts before they are recorded (see
        :meth:`UpstreamStream.verdicts`).
        """
        if reads_text_scores(call):
            evidence.add_text_scores(question_of(call.kind, call.body))
        if session is not None and evidence.choices:
            self.recorder.sampling(call, await session.gather(evidence))
        verdicts = judge_call(evidence, call.rule, call.recalibration)
        if settle is not None:
            settle(verdicts)
        if call.rule.log_text:
            call.answers = evidence.texts
        if record:
            self.recorder.verdicts(call, verdicts)
        return verdicts


class UpstreamStream:
    """An upstream stream in flight: its chunks, then the verdicts on what they carried."""

    def __init__(
        self,
        pipeline: Pipeline,
        call: Call,
        chunks: AsyncIterator[dict[str, Any]],
        session: SamplingSession | None,
    ) -> None:
        self._pipeline = pipeline
        self._call = call
        self._chunks = chunks.__aiter__()
        self._session = session
        self._first: dict[str, Any] | None = None

    @property
    def samples(self) -> bool:
        """Whether samples are being drawn (the judge then needs the streamed text)."""
        return self._session is not None

    async def start(self) -> None:
        self._first = await self._next()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Every chunk, the first one included; upstream errors are counted and re-raised."""
        chunk = self._first
        while chunk is not None:
            yield chunk
            chunk = await self._next()

    async def verdicts(
        self, evidence: CallEvidence, settle: Callable[[list[Verdict]], None] | None = None
    ) -> list[Verdict]:
        """The verdicts on what was streamed.

        ``settle`` may adjust them (in place) before they are recorded: a stream that sent
        parts of the answer as it judged them makes the recorded verdicts describe what
        the client got (:mod:`proxy.sentence_stream`).
        """
        try:
            return await self._pipeline._judge(self._call, evidence, self._session, settle)
        except UpstreamError as exc:
            self._pipeline.recorder.upstream_failed(self._call, exc)
            raise

    async def aclose(self) -> None:
        """Release the upstream: done, failed, or the client went away."""
        if self._session is not None:
            self._session.cancel()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _next(self) -> dict[str, Any] | None:
        try:
            return await self._pipeline._timed(self._call, anext(self._chunks))
        except StopAsyncIteration:
            return None
        except UpstreamError as exc:
            self._pipeline.recorder.upstream_failed(self._call, exc)
            raise


def by_sentence(call: Call) -> bool:
    """Whether the call's answers are judged sentence by sentence (token texts kept)."""
    return call.rule.granularity == "sentence" and call.rule.method == "logprobs"


def reads_text_scores(call: Call) -> bool:
    """Whether the rule's calibration reads scores of the answer's token texts and the
    question (issue 12.4). Only then are token texts kept and the question read: every
    other call pays this check (a few name lookups) and nothing more."""
    calibration = call.rule.calibration
    return calibration is not None and reads_text(calibration.inputs)


def keeps_tokens(call: Call) -> bool:
    """Whether the evidence keeps each answer's token texts (sentences, text scores)."""
    return by_sentence(call) or reads_text_scores(call)


async def _fetch(upstream: Upstream, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """One completion; ``n > 1`` fans out when the upstream ignores ``n``."""
    n = body.get("n") or 1
    if n == 1 or upstream.supports_n:
        return await upstream.complete(kind, body)
    single = {**body, "n": 1}
    parts = await asyncio.gather(*(upstream.complete(kind, single) for _ in range(n)))
    return merge_completions(parts)


def merge_completions(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join single-choice completions into one response with choices 0..n-1."""
    merged = dict(parts[0])
    choices = []
    for i, part in enumerate(parts):
        for choice in choices_of(part):
            choices.append({**choice, "index": i})
    merged["choices"] = choices
    usages: list[dict[str, Any]] = [u for p in parts if isinstance(u := p.get("usage"), dict)]
    if usages:
        # The prompt is the same for every part: count it once, like a real n request.
        completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
        prompt = int(usages[0].get("prompt_tokens") or 0)
        merged["usage"] = {**usages[0], "completion_tokens": completion,
                           "total_tokens": prompt + completion}  # fmt: skip
    return merged


def ensure_id(response: dict[str, Any]) -> str:
    """The response's id, minted when the upstream gave none: feedback refers to it."""
    rid = response.get("id")
    if not isinstance(rid, str) or not rid:
        rid = response["id"] = f"abst-{uuid.uuid4().hex}"
    return rid
