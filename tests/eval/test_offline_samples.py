"""Drawing, caching and scoring samples for calibration (proxy.evaluation.offline_samples)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from proxy.confidence.consistency import EXACT, NUMERIC
from proxy.evaluation import offline_samples, runner
from proxy.evaluation.datasets import Question
from proxy.evaluation.prompts import get_template
from tests.eval import fake_model

TEMPLATE = get_template("qa-fewshot")
URL = "http://model.test/v1"


def _questions(n: int) -> list[Question]:
    return [Question(q["id"], q["question"], tuple(q["answers"])) for q in fake_model.questions(n)]


async def _draw(
    qs: list[Question],
    transport: httpx.AsyncBaseTransport,
    cache: offline_samples.SampleCache,
    **kw: object,
) -> offline_samples.Drawn:
    params = offline_samples.sampling_params(0.7, 8)
    return await offline_samples.draw_all(
        qs, TEMPLATE, params, model="m", base_url=URL, cache=cache, transport=transport,
        progress=None, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_key_is_the_one_the_benchmark_cached_under() -> None:
    # Pinned: ~/.cache/abstain/consistency holds thousands of samples drawn by
    # benchmarks/consistency_eval.py under this key; a changed key would redraw them all.
    q = Question("facts-dev-2", "What is the chemical symbol for Scandium?", ("Sc",))
    params = offline_samples.sampling_params(0.7, 8)
    key = offline_samples.sample_key(q, TEMPLATE, "gemma-3-270m", params)
    assert key == "ba7a471997e3b45a7f037f5d"
    assert (
        offline_samples.sample_key(
            q, TEMPLATE, "gemma-3-270m", offline_samples.sampling_params(1.0, 8)
        )
        != key
    )
    assert (
        offline_samples.sample_key(
            q, TEMPLATE, "gemma-3-270m", offline_samples.sampling_params(0.7, 4)
        )
        != key
    )


async def test_samples_are_drawn_whole_then_read_back_from_the_cache(tmp_path: Path) -> None:
    counter = fake_model.Counter()
    path = tmp_path / "s.jsonl"
    first = await _draw(
        _questions(3), fake_model.transport(counter), offline_samples.SampleCache(path)
    )
    assert counter.sampled == 3 * 8
    assert first.samples["q1"] == [" " + fake_model.sample_text(1, j) for j in range(8)]
    with path.open("a") as f:
        f.write('{"key": "torn')  # an interrupted write must not break the next run
    again = await _draw(
        _questions(3), fake_model.transport(counter), offline_samples.SampleCache(path)
    )
    assert counter.requests == 3 * 8
    assert again.samples == first.samples and not again.failed
    rows = [json.loads(line) for line in path.read_text().splitlines()[:3]]
    assert {r["id"] for r in rows} == {"q0", "q1", "q2"}
    assert all(r["temperature"] == 0.7 and r["upstream_requests"] == 8 for r in rows)


async def test_one_request_with_n_when_asked(tmp_path: Path) -> None:
    bodies: list[dict[str, object]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        n = int(body.get("n", 1))
        choices = [{"index": j, "text": f" City{j % 2}"} for j in range(n)]
        return httpx.Response(200, json={"choices": choices})

    params = offline_samples.sampling_params(0.7, 8, use_n=True)
    drawn = await offline_samples.draw_all(
        _questions(1), TEMPLATE, params, model="m", base_url=URL,
        cache=offline_samples.SampleCache(None), transport=httpx.MockTransport(handle), progress=None,
    )  # fmt: skip
    assert len(bodies) == 1 and bodies[0]["n"] == 8 and bodies[0]["temperature"] == 0.7
    assert "logprobs" not in bodies[0]
    assert len(drawn.samples["q0"]) == 8


async def test_a_question_whose_samples_keep_failing_is_reported_not_cached(
    tmp_path: Path,
) -> None:
    asked = fake_model.Counter()

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "Country1?" in body["prompt"]:
            asked.hit(body)
            return httpx.Response(500, json={"error": {"message": "down"}})
        return httpx.Response(200, json=fake_model.completion(body))

    path = tmp_path / "s.jsonl"
    drawn = await _draw(
        _questions(2), httpx.MockTransport(handle), offline_samples.SampleCache(path), attempts=2
    )
    assert set(drawn.samples) == {"q0"} and set(drawn.failed) == {"q1"}
    assert "status_500" in drawn.failed["q1"]
    assert asked.sampled == 2 * 2  # two attempts; each stops after its failed first round
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["q0"]


def test_features_join_logprob_scores_and_agreement() -> None:
    gens = [
        runner.Generation(id="q0", key="k0", text="City0", logprobs=None),
        runner.Generation(id="q1", key="k1", text="Atlantis"),
        runner.Generation(id="q2", key="k2", error="HTTPError: boom"),
    ]
    samples = {
        "q0": [" City0", "city0.", "Paris", "City0"],
        "q1": ["Avalon", "Lemuria", "Atlantis", "Mu"],
        "q2": ["x", "x"],
    }
    features = offline_samples.features_by_id(gens, samples, EXACT)
    assert set(features) == {"q0", "q1"}  # a failed answer has nothing to compare
    assert features["q0"]["agreement"] == pytest.approx(3 / 4)
    assert features["q1"]["agreement"] == pytest.approx(1 / 4)
    assert features["q1"]["semantic_entropy"] == pytest.approx(-1.3862943611)


def test_the_record_names_the_policy_fields() -> None:
    params = offline_samples.sampling_params(0.7, 8)
    assert offline_samples.sampling_record(params, NUMERIC) == {
        "samples": 8,
        "sample_temperature": 0.7,
        "matcher": "numeric",
    }
    from proxy.confidence.embedding import EmbeddingMatcher

    embedder = EmbeddingMatcher(lambda texts: [[1.0, 0.0] for _ in texts], threshold=0.7)
    assert offline_samples.sampling_record(params, embedder)["embedding_threshold"] == 0.7
