"""The runner against httpx.MockTransport: order, scores, cache, retries, failures, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx

from proxy.evaluation import runner
from proxy.evaluation.datasets import Question
from proxy.evaluation.prompts import get_template
from tests.eval import fake_model

TEMPLATE = get_template("qa-fewshot")


def _questions(n: int) -> list[Question]:
    return [Question(q["id"], q["question"], tuple(q["answers"])) for q in fake_model.questions(n)]


async def _ask(
    qs: list[Question], transport: httpx.AsyncBaseTransport, **kw: object
) -> list[runner.Generation]:
    return await runner.ask_all(
        qs, TEMPLATE, base_url="http://model.test/v1", model="m", transport=transport,
        progress=None, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_answers_come_back_in_order_with_scores() -> None:
    gens = await _ask(_questions(6), fake_model.transport(), concurrency=3)
    assert [g.id for g in gens] == [f"q{i}" for i in range(6)]
    assert gens[0].text == "City0" and gens[1].text == "Atlantis"
    assert gens[0].scores["min_logprob"] == -0.05
    assert gens[1].scores["min_logprob"] == -2.0
    assert gens[0].response_id == "cmpl-0"


async def test_the_cache_answers_the_second_run(tmp_path: Path) -> None:
    counter = fake_model.Counter()
    path = tmp_path / "c.jsonl"
    first = await _ask(
        _questions(4), fake_model.transport(counter), cache=runner.GenerationCache(path)
    )
    with path.open("a") as f:
        f.write('{"id": "torn"')  # an interrupted write must not break the next run
    again = await _ask(
        _questions(4), fake_model.transport(counter), cache=runner.GenerationCache(path)
    )
    assert counter.requests == 4
    assert [g.text for g in again] == [g.text for g in first]


async def test_a_changed_tag_is_asked_afresh(tmp_path: Path) -> None:
    counter = fake_model.Counter()
    cache = runner.GenerationCache(tmp_path / "c.jsonl")
    await _ask(_questions(2), fake_model.transport(counter), cache=cache, tag="direct")
    await _ask(_questions(2), fake_model.transport(counter), cache=cache, tag="proxy:x")
    assert counter.requests == 4


async def test_server_errors_are_retried_and_client_errors_are_not(tmp_path: Path) -> None:
    calls: dict[str, int] = {}

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        q = body["prompt"].rsplit("Country", 1)[1]
        calls[q] = calls.get(q, 0) + 1
        if q.startswith("0") and calls[q] == 1:
            return httpx.Response(503, json={})
        if q.startswith("1"):
            return httpx.Response(400, json={"error": {"message": "no"}})
        return httpx.Response(200, json=fake_model.completion(body))

    cache = runner.GenerationCache(tmp_path / "c.jsonl")
    gens = await _ask(_questions(2), httpx.MockTransport(handle), cache=cache, retries=2)
    assert gens[0].error is None and gens[0].text == "City0"
    assert gens[1].error is not None and "400" in gens[1].error
    assert calls == {"0?\nA:": 2, "1?\nA:": 1}
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 1  # failures not cached


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _progress(out: io.StringIO, n: int) -> str:
    await runner.ask_all(
        _questions(n), TEMPLATE, base_url="http://m/v1", model="m",
        transport=fake_model.transport(), progress=out, label="facts",
    )  # fmt: skip
    return out.getvalue()


async def test_progress_is_redrawn_in_place_on_a_terminal() -> None:
    text = await _progress(_Terminal(), 3)
    final = text.rsplit("\r", 1)[-1]
    assert final.startswith("facts [") and "3/3 (0 cached)" in final and "ETA" in final
    assert final.endswith("\n") and text.count("\n") == 1


async def test_progress_into_a_log_is_a_few_whole_lines() -> None:
    lines = (await _progress(io.StringIO(), 40)).splitlines()
    assert "\r" not in "".join(lines)
    assert 2 <= len(lines) <= 12
    assert lines[-1].startswith("facts [") and "40/40" in lines[-1]
