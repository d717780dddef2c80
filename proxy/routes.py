"""The HTTP surface: thin handlers that admit a request and hand it to the pipeline.

Admission (size limit, JSON, schema, tenant, route) happens here because it is about
HTTP; everything about confidence and decisions happens in the pipeline.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy import sentence_stream, streaming
from proxy.admission import (
    Admission,
    ReleasingBody,
    admit,
    api_key,
    read_body,
    read_body_in_time,
    tenant_of,
    until_disconnect,
)
from proxy.call import Call
from proxy.decision_log import DecisionLog
from proxy.errors import (
    BadRequest,
    Conflict,
    ModelNotFound,
    NotFound,
    ProxyError,
    Unauthorized,
)
from proxy.metrics import Metrics
from proxy.online_recalibration import recalibration_model
from proxy.pipeline import Pipeline
from proxy.policy.loading import PolicyStore
from proxy.protocol import Kind, dump_json, parse_json_body, validate_request
from proxy.recording import Recorder
from proxy.rewrite import verdict_headers
from proxy.shared_state.memory import MAX_SENTENCES, Remembered
from proxy.verdict import Verdict

_JSON = "application/json"


@dataclass(slots=True)
class _Labels:
    """Metric labels known so far; 'unknown' until the policy has vouched for a value."""

    route: str
    tenant: str = "unknown"
    model: str = "unknown"


async def _completion(request: Request, kind: Kind) -> Response:
    started = time.perf_counter()
    state = request.app.state
    store: PolicyStore = state.store
    pipeline: Pipeline = state.pipeline
    labels = _Labels(route=kind)
    call: Call | None = None
    admission: Admission | None = None
    try:
        settings = state.settings
        tenant = tenant_of(store, request)  # before the body: a stranger holds nothing
        raw = await read_body_in_time(
            request, settings.max_body_bytes, settings.client_body_timeout_seconds
        )
        body = parse_json_body(raw)
        labels.tenant = tenant
        validate_request(kind, body)
        policy = store.current
        route = policy.route(body["model"])
        if route is None:
            # Bounded: a client's megabyte of model name is not echoed back.
            name = body["model"][:100]
            raise ModelNotFound(f"The model {name!r} does not exist.", param="model")
        labels.model = route.model
        rule = policy.rule(tenant, route.model)
        admission = await admit(request, policy, route, rule, body)
        call = Call(kind, body, tenant, route, rule, started)
        if body.get("stream"):
            streamed = await until_disconnect(
                request, _stream(pipeline, call, admission), admission
            )
            admission = None  # the stream's body releases the lease when it ends
            return streamed
        response, verdicts = await until_disconnect(request, pipeline.complete(call), admission)
        payload = dump_json(response)
        await admission.confirmed()  # an overlapped admission: decided long since
    except ProxyError as exc:
        if call is not None:
            pipeline.finish(call, [], exc.status)
        else:
            recorder: Recorder = state.recorder
            recorder.rejected(labels.route, labels.tenant, labels.model, exc.status, started)
        raise
    finally:
        # Answered, failed or cancelled (client gone): the tenant's slot is free again.
        if admission is not None:
            admission.release()
    # Recorded once the body is written: metrics and the log are not in the client's wait.
    return Response(
        payload,
        media_type=_JSON,
        headers=verdict_headers(verdicts),
        background=_Answered(pipeline, call, verdicts),
    )


class _Answered(BackgroundTask):
    """A response's background task: record its call once the body is written.

    Starlette's BackgroundTask inspects its function on every construction to tell a
    coroutine from a sync one (which it would run in a thread); this one is known.
    """

    def __init__(self, pipeline: Pipeline, call: Call, verdicts: list[Verdict]) -> None:
        self._pipeline, self._call, self._verdicts = pipeline, call, verdicts

    async def __call__(self) -> None:
        await self._pipeline.answered(self._call, self._verdicts)


async def _stream(pipeline: Pipeline, call: Call, admission: Admission) -> Response:
    """The SSE response; the admission is released once its body has ended (or failed
    to start).

    A stream waits for an overlapped admission to be decided before it starts: a buffer
    stream's first keep-alive goes out at once, and a stream body never iterated would
    not close the upstream stream it holds.
    """
    try:
        await admission.confirmed(before_work=True)
        if call.rule.streaming == "passthrough":
            stream = await streaming.passthrough(pipeline, call)
        elif call.rule.streaming == "sentence":
            stream = await sentence_stream.stream(pipeline, call)
        else:
            stream = await streaming.buffered(pipeline, call)
    except BaseException:
        admission.release()
        raise
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **stream.headers}
    body = ReleasingBody(stream.body, admission.release)
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


async def chat_completions(request: Request) -> Response:
    return await _completion(request, "chat")


async def completions(request: Request) -> Response:
    return await _completion(request, "completions")


async def feedback(request: Request) -> Response:
    """Record whether a past answer was right: ``{"id", "correct", "choice"?, "sentence"?}``.

    ``sentence`` (an index into the choice's ``verdict.sentences``) labels one sentence
    of an answer judged by sentence; without it the label is of the whole answer. A
    rule judged by sentence learns its recalibration from sentence labels only, a rule
    judged whole from whole-answer labels only.

    Idempotent per (id, choice[, sentence]): the first feedback is counted and logged.
    Repeating it with the same ``correct`` answers 200 with ``"recorded": false,
    "duplicate": true`` and counts and logs nothing more (a client retry cannot skew the
    reliability diagram or the refit). A repeat with the *other* ``correct`` is refused
    with 409 (``code: "feedback_conflict"``) and the first word stands: the live
    counters cannot be taken back, so accepting a correction would leave the metrics and
    the log disagreeing, and contradictory labels for one answer are worth a person's look.

    With ``ABSTAIN_REDIS_URL`` this holds across pods; when Redis does not answer in
    time the feedback is refused with 503 ``shared_state_unavailable`` (and
    ``Retry-After``), never queued, so the client keeps it and retries.
    """
    state = request.app.state
    tenant = tenant_of(state.store, request)
    body = parse_json_body(await read_body(request, state.settings.max_body_bytes))
    rid, correct, choice = body.get("id"), body.get("correct"), body.get("choice", 0)
    sentence = body.get("sentence")
    if not isinstance(rid, str) or not rid:
        raise BadRequest("'id' must be the id of a response the proxy returned.", param="id")
    if not isinstance(correct, bool):
        raise BadRequest("'correct' must be true or false.", param="correct")
    if not _index(choice):
        raise BadRequest("'choice' must be a non-negative integer.", param="choice")
    if sentence is not None and not _index(sentence):
        raise BadRequest("'sentence' must be a non-negative integer.", param="sentence")
    decisions: DecisionLog = state.decisions
    # In this process, or in Redis (shared by every pod; 503 when it does not answer).
    memory = decisions.memory
    seen = await memory.lookup(tenant, rid)
    # Another tenant's response is as unknown as one that never existed.
    if seen is None or seen.tenant != tenant:
        raise NotFound(f"No recent response with id {rid[:100]!r}.", param="id")
    if choice >= len(seen.confidences):
        raise BadRequest(f"The response has {len(seen.confidences)} choice(s).", param="choice")
    p, base = _labelled(seen, choice, sentence)
    metrics: Metrics = state.metrics
    bin_label = None if p is None else metrics.feedback_bin(p)
    # Atomic (per process, or across pods in Redis): exactly one claim is "new".
    claim = await memory.claim_feedback(tenant, rid, choice, correct, sentence)
    if claim == "unknown":  # expired since the lookup
        raise NotFound(f"No recent response with id {rid[:100]!r}.", param="id")
    what = f"choice {choice}" if sentence is None else f"sentence {sentence} of choice {choice}"
    if claim == "conflict":
        raise Conflict(
            f"Feedback for {what} of this response was already recorded as "
            f"correct={str(not correct).lower()}; the first feedback stands.",
            param="correct",
            code="feedback_conflict",
        )
    out: dict[str, Any] = {"id": rid, "choice": choice, "correct": correct}
    if sentence is not None:
        out["sentence"] = sentence
    if claim == "duplicate":
        out.update(recorded=False, duplicate=True, bin=bin_label)
        return Response(orjson.dumps(out), media_type=_JSON)
    if bin_label is not None:
        verdict = "true" if correct else "false"
        counter = metrics.feedback if sentence is None else metrics.sentence_feedback
        counter.labels(seen.tenant, seen.model, bin_label, verdict).inc()
    decisions.feedback(rid, choice, correct, sentence)
    rule = state.store.current.rule(seen.tenant, seen.model)
    # Answers and sentences learn apart: a label feeds only a rule judged at its level.
    level = "answer" if sentence is None else "sentence"
    if rule.granularity == level:
        name = recalibration_model(seen.model, level)
        await state.recalibration.feedback(rule.recalibrate, seen.tenant, name, base, correct)
    out.update(recorded=True, bin=bin_label)
    return Response(orjson.dumps(out), media_type=_JSON)


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _labelled(
    seen: Remembered, choice: int, sentence: int | None
) -> tuple[float | None, float | None]:
    """(the confidence the client saw, the shipped P a label is learnt on) of what the
    feedback is about: the choice, or one of its sentences (400 when it has none)."""
    if sentence is None:
        return seen.confidences[choice], seen.base(choice)
    parts = seen.parts(choice)
    if parts is None:
        raise BadRequest(
            f"Choice {choice} was judged as a whole: give no 'sentence'.", param="sentence"
        )
    if sentence >= len(parts):
        if len(parts) == MAX_SENTENCES:
            message = f"Only the first {MAX_SENTENCES} parts of an answer take feedback."
        else:
            message = f"Choice {choice} has {len(parts)} part(s)."
        raise BadRequest(message, param="sentence")
    p, base = parts[sentence]
    if p is None:
        raise BadRequest(
            f"Part {sentence} of choice {choice} was not judged (code, or no score).",
            param="sentence",
        )
    return p, base


async def models(request: Request) -> Response:
    store: PolicyStore = request.app.state.store
    tenant_of(store, request)
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": "abstain-proxy"}
        for name in store.current.model_names
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=_JSON)


async def readyz(request: Request) -> Response:
    state = request.app.state
    upstreams = getattr(state, "upstreams", None)
    ready = state.store.current is not None and upstreams is not None and len(upstreams) > 0
    body = {"status": "ready" if ready else "not ready", "policy": str(state.store.path)}
    if state.store.last_error:
        body["last_reload_error"] = "the last policy reload was rejected; see the server log"
    return Response(orjson.dumps(body), media_type=_JSON, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    state = request.app.state
    token = state.settings.metrics_token
    if token is not None:
        given = (api_key(request) or "").encode()
        if not hmac.compare_digest(given, token.get_secret_value().encode()):
            raise Unauthorized("The metrics need the metrics token (ABSTAIN_METRICS_TOKEN).")
    # Under several workers each process holds only its own share; proxy.multiprocess
    # installs a registry that sums every worker's files. One worker: its own registry.
    registry = getattr(state, "scrape_registry", None)
    if registry is None:
        registry = state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


#: The endpoints :class:`~proxy.app.ProxyApp` serves ahead of the middleware, by path
#: (POST only): they raise nothing but ProxyError for a client to see.
LANES = {"/v1/chat/completions": chat_completions, "/v1/completions": completions}

#: Starlette routes, not FastAPI's: the handlers take the raw request (admission parses
#: and bounds the body itself), so FastAPI's dependency solving had nothing to do and
#: cost 55 µs a request (docs/performance.md). Every error still goes through the
#: application's exception handlers (the two completion routes are served by
#: :class:`~proxy.app.ProxyApp`'s lane, which answers the same, unless OpenTelemetry is on).
routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/feedback", feedback, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
