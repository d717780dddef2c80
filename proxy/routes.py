"""The HTTP surface: thin handlers that admit a request and hand it to the pipeline.

Admission (size limit, JSON, schema, tenant, route) happens here because it is about
HTTP; everything about confidence and decisions happens in the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy import streaming
from proxy.call import Call
from proxy.decision_log import DecisionLog
from proxy.errors import (
    BadRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
)
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.policy.loading import PolicyStore
from proxy.protocol import Kind, parse_json_body, validate_request
from proxy.recording import Recorder
from proxy.rewrite import verdict_headers

router = APIRouter()

_JSON = "application/json"


@dataclass(slots=True)
class _Labels:
    """Metric labels known so far; 'unknown' until the policy has vouched for a value."""

    route: str
    tenant: str = "unknown"
    model: str = "unknown"


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("api-key")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        parts.append(part)
    return b"".join(parts)


def _tenant(store: PolicyStore, request: Request) -> str:
    tenant = store.current.tenant_for(_api_key(request))
    if tenant is None:
        raise Unauthorized("Invalid or missing API key.")
    return tenant


async def _completion(request: Request, kind: Kind) -> Response:
    started = time.perf_counter()
    state = request.app.state
    store: PolicyStore = state.store
    pipeline: Pipeline = state.pipeline
    labels = _Labels(route=kind)
    call: Call | None = None
    try:
        raw = await _read_body(request, state.settings.max_body_bytes)
        tenant = _tenant(store, request)  # like OpenAI: authenticate before parsing
        body = parse_json_body(raw)
        labels.tenant = tenant
        validate_request(kind, body)
        policy = store.current
        route = policy.route(body["model"])
        if route is None:
            raise ModelNotFound(f"The model {body['model']!r} does not exist.", param="model")
        labels.model = route.model
        call = Call(kind, body, tenant, route, policy.rule(tenant, route.model), started)
        if body.get("stream"):
            return await _stream(pipeline, call)
        response, verdicts = await pipeline.complete(call)
    except ProxyError as exc:
        if call is not None:
            pipeline.finish(call, [], exc.status)
        else:
            recorder: Recorder = state.recorder
            recorder.rejected(labels.route, labels.tenant, labels.model, exc.status, started)
        raise
    pipeline.finish(call, verdicts, 200)
    return Response(orjson.dumps(response), media_type=_JSON, headers=verdict_headers(verdicts))


async def _stream(pipeline: Pipeline, call: Call) -> Response:
    if call.rule.streaming == "passthrough":
        stream = await streaming.passthrough(pipeline, call)
    else:
        stream = await streaming.buffered(pipeline, call)
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **stream.headers}
    return StreamingResponse(stream.body, media_type="text/event-stream", headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _completion(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _completion(request, "completions")


@router.post("/v1/feedback")
async def feedback(request: Request) -> Response:
    """Record whether a past answer was right: ``{"id", "correct", "choice"?}``."""
    state = request.app.state
    tenant = _tenant(state.store, request)
    body = parse_json_body(await _read_body(request, state.settings.max_body_bytes))
    rid, correct, choice = body.get("id"), body.get("correct"), body.get("choice", 0)
    if not isinstance(rid, str) or not rid:
        raise BadRequest("'id' must be the id of a response the proxy returned.", param="id")
    if not isinstance(correct, bool):
        raise BadRequest("'correct' must be true or false.", param="correct")
    if not isinstance(choice, int) or isinstance(choice, bool) or choice < 0:
        raise BadRequest("'choice' must be a non-negative integer.", param="choice")
    decisions: DecisionLog = state.decisions
    seen = decisions.lookup(rid)
    # Another tenant's response is as unknown as one that never existed.
    if seen is None or seen.tenant != tenant:
        raise NotFound(f"No recent response with id {rid[:100]!r}.", param="id")
    if choice >= len(seen.confidences):
        raise BadRequest(f"The response has {len(seen.confidences)} choice(s).", param="choice")
    p = seen.confidences[choice]
    metrics: Metrics = state.metrics
    bin_label = None if p is None else metrics.feedback_bin(p)
    if bin_label is not None:
        verdict = "true" if correct else "false"
        metrics.feedback.labels(seen.tenant, seen.model, bin_label, verdict).inc()
    decisions.feedback(rid, choice, correct)
    out = {"id": rid, "choice": choice, "correct": correct, "recorded": True, "bin": bin_label}
    return Response(orjson.dumps(out), media_type=_JSON)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    store: PolicyStore = request.app.state.store
    _tenant(store, request)
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": "abstain-proxy"}
        for name in store.current.model_names
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type=_JSON)


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    state = request.app.state
    upstreams = getattr(state, "upstreams", None)
    ready = state.store.current is not None and upstreams is not None and len(upstreams) > 0
    body = {"status": "ready" if ready else "not ready", "policy": str(state.store.path)}
    if state.store.last_error:
        body["last_reload_error"] = "the last policy reload was rejected; see the server log"
    return Response(orjson.dumps(body), media_type=_JSON, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    # Under several workers each process holds only its own share; proxy.multiprocess
    # installs a registry that sums every worker's files. One worker: its own registry.
    registry = getattr(state, "scrape_registry", None)
    if registry is None:
        registry = state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
