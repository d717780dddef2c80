"""Traffic drift acted on, in front of the real reference model (issue 12): NQ-open's real
search questions read drifted from the shipped calibration within 60 answers (from the
44th on, in the cached answers of benchmarks/drift_action.py) and are then judged at
``ood_threshold``; facts-extra, the calibration's own kind of question, does not.

The model server and the proxy run as real processes; the client is the openai SDK. The
shipped calibration's prompt (qa-fewshot) is the one the questions are asked through.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import local_model
from proxy.evaluation import datasets
from proxy.evaluation.prompts import get_template
from tests.e2e.procs import proxy

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

CALIBRATION = Path(__file__).resolve().parents[2] / "policies/calibration/gemma-3-270m.json"
QUESTIONS = 60
TEMPLATE = get_template("qa-fewshot")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, str]]:
    policy = tmp_path_factory.mktemp("drift") / "policy.yaml"
    watched = (
        f"{{upstream: local, upstream_model: {local_model.MODEL_ALIAS}, "
        f'calibration: "{CALIBRATION}", ood_threshold: 0.9, drift_psi: 0.25}}'
    )
    with local_model.serving() as model_url:
        policy.write_text(
            f"""
upstreams:
  local: {{base_url: "{model_url}", supports_n: false}}
models:
  search: {watched}
  facts: {watched}
defaults: {{threshold: 0.5, action: abstain}}
auth: {{unknown_keys: default, default_tenant: demo}}
tenants: {{demo: {{}}}}
"""
        )
        with proxy(policy) as (url, _proc):
            client = openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0, timeout=120)
            yield client, url


def verdicts(client: openai.OpenAI, model: str, dataset: str) -> list[dict[str, Any]]:
    out = []
    for q in datasets.load_questions(dataset)[:QUESTIONS]:
        body = TEMPLATE.body(q.question, model)
        r = client.completions.create(
            model=model,
            prompt=body["prompt"],
            max_tokens=body["max_tokens"],
            stop=body["stop"],
            temperature=0,
            logprobs=body["logprobs"],
        )
        out.append(r.model_extra["abstention"])
    return out


def drifted_total(url: str, model: str) -> float:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "abstain_drifted_answers_total" and s.labels.get("model") == model:
                return float(s.value)
    return 0.0


def test_real_search_questions_read_drifted_and_are_judged_at_ood_threshold(
    served: tuple[openai.OpenAI, str],
) -> None:
    client, url = served
    seen = verdicts(client, "search", "nq-open")
    drifted = [i for i, v in enumerate(seen) if "traffic_drift" in v]
    assert drifted, f"{QUESTIONS} real search questions never read drifted"
    assert drifted[0] >= 30  # not before the window holds 30 answers
    # Near the edge of significance a reading may flicker for an answer; most stay.
    assert len(drifted) >= 0.8 * (QUESTIONS - drifted[0])
    for i, v in enumerate(seen):
        if i in drifted:
            assert v["threshold"] == 0.9 and v["traffic_drift"]["psi"] >= 0.25
            assert "drifted" in v["reason"]
        elif not v["out_of_distribution"]:
            assert v["threshold"] == 0.5
    assert drifted_total(url, "search") == len(drifted)


def test_the_calibrations_own_kind_of_question_does_not(
    served: tuple[openai.OpenAI, str],
) -> None:
    client, url = served
    seen = verdicts(client, "facts", "facts-extra")
    assert not [v for v in seen if "traffic_drift" in v]
    # Only an answer outside the fitted range is judged at ood_threshold, on its own.
    assert {v["threshold"] for v in seen if not v["out_of_distribution"]} == {0.5}
    assert all(v["threshold"] == 0.9 for v in seen if v["out_of_distribution"])
    assert drifted_total(url, "facts") == 0.0
