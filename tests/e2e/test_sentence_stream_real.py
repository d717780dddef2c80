"""``streaming: sentence`` in front of the real reference model (Gemma 3 270M, llama-server).

One streamed three-sentence answer, read with the openai SDK; only its structure is
checked (the model's logprobs move a little with what the server batches, so which
sentences are kept is not asserted, and nothing is timed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.sentence_latency import PROMPT  # answers of three sentences, one fact each
from proxy import local_model
from tests.e2e.procs import ROOT, proxy

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

MARKER = "(not sure about this part)"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    calibration = ROOT / "policies" / "calibration" / "gemma-3-270m-sentence.json"
    with local_model.serving() as model_url:
        policy = tmp_path_factory.mktemp("sentences") / "policy.yaml"
        policy.write_text(
            f"""
upstreams:
  local: {{base_url: "{model_url}", supports_n: false}}
models:
  {local_model.MODEL_ALIAS}: {{upstream: local, streaming: sentence, calibration: "{calibration}"}}
defaults: {{threshold: 0.5, action: abstain}}
auth: {{unknown_keys: default, default_tenant: demo}}
tenants: {{demo: {{}}}}
"""
        )
        with proxy(Path(policy)) as (url, _proc):
            yield openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0, timeout=120)


def test_a_three_sentence_answer_streams_sentence_by_sentence(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=local_model.MODEL_ALIAS, prompt=PROMPT, max_tokens=40, stop=["\n"],
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    text = "".join(deltas)
    last = chunks[-1]
    assert last.model_extra is not None and not last.choices
    verdict = last.model_extra["abstention"]
    parts = verdict["sentences"]
    assert len(parts) == 3
    assert {p["decision"] for p in parts} <= {"answer", "abstain"}
    assert verdict["decision"] in ("answer", "partial", "abstain")
    if verdict["decision"] == "abstain":
        assert text == "I don't know."
        return
    # Every part's offsets point into the text received: a kept part is a sentence the
    # model wrote, a withheld one the marker.
    for part in parts:
        span = text[part["start"] : part["end"]]
        if part["decision"] == "answer":
            assert span == span.strip() and span.endswith(".") and MARKER not in span
        else:
            assert span == MARKER
    # Sentences arrive as they are judged, not as one block at the end: every content
    # delta but the last ends where a part ends.
    ends, at = [], 0
    for delta in deltas:
        at += len(delta)
        ends.append(at)
    assert len(deltas) >= 2
    assert set(ends[:-1]) <= {p["end"] for p in parts}
    assert ends[-1] == len(text)


def test_one_sentence_of_a_real_answer_takes_feedback(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=local_model.MODEL_ALIAS, prompt=PROMPT, max_tokens=40, stop=["\n"],
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    parts = chunks[-1].model_extra["abstention"]["sentences"]  # type: ignore[index]
    judged = next(i for i, p in enumerate(parts) if p["confidence"] is not None)
    label = {"id": chunks[0].id, "sentence": judged, "correct": True}
    first = client.post("/feedback", cast_to=httpx.Response, body=label)
    assert first.status_code == 200
    assert first.json()["recorded"] is True and first.json()["sentence"] == judged
    again = client.post("/feedback", cast_to=httpx.Response, body=label)
    assert again.json()["duplicate"] is True
