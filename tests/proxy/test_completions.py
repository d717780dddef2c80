"""Non-streaming completions through the proxy, against the fake upstream."""

from __future__ import annotations

from starlette.testclient import TestClient

from tests.conftest import auth
from tests.fakes import ANSWER, FakeUpstream

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def chat(client: TestClient, model: str, tenant: str = "clinic", **extra: object):
    return client.post(
        "/v1/chat/completions", json={"model": model, **CHAT, **extra}, headers=auth(tenant)
    )


def test_confident_answer_is_delivered_with_its_verdict(client: TestClient) -> None:
    r = chat(client, "sure")
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    verdict = body["abstention"]
    assert verdict["decision"] == "answer"
    assert verdict["threshold"] == 0.9
    assert verdict["confidence"] > 0.9
    assert verdict["calibrated"] is False
    assert verdict["method"] == "logprobs"
    assert verdict["policy"] == "clinic"
    assert body["choices"][0]["abstention"] == verdict
    assert r.headers["x-abstention-decision"] == "answer"
    assert float(r.headers["x-abstention-confidence"]) > 0.9


def test_unsure_answer_is_replaced_by_the_tenants_abstention(client: TestClient) -> None:
    r = chat(client, "unsure")
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Please ask a clinician."
    assert body["abstention"]["decision"] == "abstain"
    assert body["abstention"]["confidence"] < 0.1
    assert r.headers["x-abstention-decision"] == "abstain"


def test_hedge_keeps_the_answer_behind_a_caveat(client: TestClient) -> None:
    body = chat(client, "unsure", tenant="chat").json()
    assert body["choices"][0]["message"]["content"] == "Maybe: " + ANSWER
    assert body["abstention"]["decision"] == "hedge"


def test_annotate_changes_nothing_but_says_so(client: TestClient) -> None:
    body = chat(client, "unsure", tenant="tool").json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["abstention"]["decision"] == "annotate"


def test_logprobs_are_requested_upstream_and_stripped_when_client_did_not_ask(
    client: TestClient, fake: FakeUpstream
) -> None:
    body = chat(client, "sure").json()
    sent = fake.requests[-1]
    assert sent["logprobs"] is True
    assert sent["top_logprobs"] == 5
    assert body["choices"][0]["logprobs"] is None


def test_client_logprobs_are_kept_and_its_wider_top_logprobs_honoured(
    client: TestClient, fake: FakeUpstream
) -> None:
    body = chat(client, "sure", logprobs=True, top_logprobs=8).json()
    assert fake.requests[-1]["top_logprobs"] == 8
    assert len(body["choices"][0]["logprobs"]["content"]) == 4


def test_completions_route_scores_and_abstains(client: TestClient, fake: FakeUpstream) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "unsure", "prompt": "Q: x\nA:", "max_tokens": 5, "stop": ["\n"]},
        headers=auth("clinic"),
    )
    body = r.json()
    assert r.status_code == 200
    assert body["choices"][0]["text"] == "Please ask a clinician."
    assert body["choices"][0]["logprobs"] is None
    assert fake.requests[-1]["logprobs"] == 5
    assert fake.requests[-1]["stop"] == ["\n"]


def test_every_client_field_passes_through_and_unknown_response_fields_come_back(
    client: TestClient, fake: FakeUpstream
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    extra = {
        "max_tokens": 7,
        "stop": ["\n"],
        "temperature": 0.3,
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "seed": 42,
        "x_vendor_field": {"nested": [1, 2]},
        "user": "u-1",
    }
    body = chat(client, "sure", **extra).json()
    sent = fake.requests[-1]
    for key, value in extra.items():
        assert sent[key] == value
    assert body["x_upstream_extra"] == {"kept": True}


def test_model_alias_routes_to_the_upstream_model_name(
    client: TestClient, fake: FakeUpstream
) -> None:
    chat(client, "alias")
    assert fake.requests[-1]["model"] == "sure"


def test_upstream_key_comes_from_the_environment_not_the_client(
    client: TestClient, fake: FakeUpstream
) -> None:
    chat(client, "sure")
    assert fake.headers[-1]["authorization"] == "Bearer sk-upstream-secret"


def test_each_of_n_choices_is_judged_on_its_own(client: TestClient) -> None:
    body = chat(client, "sure", n=3).json()
    assert len(body["choices"]) == 3
    assert all(c["abstention"]["decision"] == "answer" for c in body["choices"])


def test_tool_calls_pass_through_unjudged(client: TestClient) -> None:
    body = chat(client, "tool").json()
    choice = body["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert choice["abstention"]["decision"] == "unjudged"


def test_json_mode_answers_pass_through_unjudged(client: TestClient) -> None:
    body = chat(client, "unsure", response_format={"type": "json_object"}).json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["abstention"]["decision"] == "unjudged"


def test_json_mode_answers_are_judged_when_the_policy_says_so(client: TestClient) -> None:
    body = chat(client, "json-judged", response_format={"type": "json_object"}).json()
    assert body["abstention"]["decision"] == "abstain"


def test_models_lists_what_the_policy_routes(client: TestClient) -> None:
    r = client.get("/v1/models", headers=auth())
    ids = {m["id"] for m in r.json()["data"]}
    assert {"sure", "unsure", "alias"} <= ids
    assert r.json()["object"] == "list"


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def test_n_fans_out_when_the_upstream_ignores_n(
    make_client, fake: FakeUpstream, policy_path
) -> None:
    policy_path.write_text(
        policy_path.read_text().replace(
            "    base_url: http://upstream.test/v1\n",
            "    base_url: http://upstream.test/v1\n    supports_n: false\n",
        )
    )
    client = make_client()
    body = chat(client, "sure", n=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [r.get("n") for r in fake.requests] == [1, 1, 1]
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == 5 + 12
    assert all(c["abstention"]["decision"] == "answer" for c in body["choices"])


def test_authentication_comes_before_parsing(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{broken", headers={"authorization": "Bearer x"}
    )
    assert r.status_code == 401
