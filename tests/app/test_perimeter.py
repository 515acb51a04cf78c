"""The billing perimeter through the gateway: closed paths, canonical paths, own generations."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from billing.models import UsageRecord
from billing.services import balance_of, check_ledger
from tests.support.accounts import SERVER_KEY, Account, Gateway, make_account
from tests.support.endpoints import CLOSED
from tests.support.requests import CHAT, assert_openai_error, decimal_json, post


def test_closed_paths_never_reach_the_upstream(gateway: Gateway, live_account: Account) -> None:
    for path in CLOSED:
        for method in ("GET", "POST", "DELETE"):
            response = httpx.request(
                method,
                f"{gateway.proxy}/{path}",
                headers=live_account.headers,
                content=b"{}",
                timeout=10,
            )
            error = assert_openai_error(response, 404, "endpoint_not_available")
            assert path in error["message"]
    assert len(gateway.fake.app.requests) == 0
    assert UsageRecord.objects.count() == 0


def test_closed_paths_refuse_even_without_credit_and_need_a_key(
    gateway: Gateway, transactional_db: None
) -> None:
    broke = make_account("broke", credit=None)
    response = httpx.get(f"{gateway.proxy}/v1/key", headers=broke.headers)
    assert_openai_error(response, 404, "endpoint_not_available")
    assert_openai_error(httpx.get(f"{gateway.proxy}/v1/key"), 401, "missing_api_key")
    assert len(gateway.fake.app.requests) == 0


@pytest.mark.parametrize(
    "spelling",
    [
        "v1/chat/complet%69ons",
        "v1/chat/%63ompletions",
        "%76%31/chat/completions",
        "v1/c%68at/co%6Dpletions",
    ],
)
def test_escaped_spellings_of_chat_are_metered_and_sent_canonical(
    gateway: Gateway, live_account: Account, spelling: str
) -> None:
    response = post(gateway, live_account, path=f"/{spelling}")
    assert response.status_code == 200, response.text
    cost = decimal_json(response)["usage"]["cost"]
    assert [seen.path for seen in gateway.fake.app.requests] == ["/api/v1/chat/completions"]
    record = UsageRecord.objects.get()
    assert record.endpoint == "chat/completions"
    assert record.billed == cost
    refused = post(gateway, live_account, {**CHAT, "model": "openai/gpt-4o"}, path=f"/{spelling}")
    assert_openai_error(refused, 400, "model_not_allowed")
    assert len(gateway.fake.app.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {**CHAT, "models": ["openai/gpt-4o"]},
        {**CHAT, "fallbacks": [{"model": "openai/gpt-4o"}]},
        {**CHAT, "model": "openrouter/auto"},
        {**CHAT, "model": "@preset/anything"},
        {**CHAT, "preset": "anything"},
    ],
)
def test_every_model_a_body_names_is_checked(
    gateway: Gateway, live_account: Account, body: dict[str, Any]
) -> None:
    response = post(gateway, live_account, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in {"model_not_allowed", "preset_not_allowed"}
    assert len(gateway.fake.app.requests) == 0


def test_wrong_method_on_a_metered_path_is_405(gateway: Gateway, live_account: Account) -> None:
    response = httpx.get(f"{gateway.proxy}/v1/chat/completions", headers=live_account.headers)
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert len(gateway.fake.app.requests) == 0


def test_x_api_key_is_a_caller_token_and_never_goes_upstream(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, None, headers={"x-api-key": live_account.token})
    assert response.status_code == 200, response.text
    seen = gateway.fake.app.requests[-1]
    assert seen.header("x-api-key") is None
    assert seen.header("authorization") == f"Bearer {SERVER_KEY}"
    assert UsageRecord.objects.get().user_id == live_account.user.pk
    bad = post(gateway, None, headers={"x-api-key": "tg_nope"})
    assert_openai_error(bad, 401, "invalid_api_key")


def _wait_for_stats(gateway: Gateway, generation_id: str) -> None:
    deadline = time.monotonic() + 10
    fake = gateway.fake.app
    while generation_id not in fake.generations or (
        time.monotonic() - fake.generations[generation_id].finished_at < fake.generation_delay
    ):
        assert time.monotonic() < deadline, f"generation {generation_id} never became visible"
        time.sleep(0.02)


def test_generation_stats_answer_only_for_the_callers_generations(
    gateway: Gateway, live_account: Account, transactional_db: None
) -> None:
    mallory = make_account("mallory")
    response = post(gateway, live_account)
    generation_id = response.headers["x-generation-id"]
    _wait_for_stats(gateway, generation_id)
    upstream_calls = len(gateway.fake.app.requests)

    theirs = httpx.get(
        f"{gateway.proxy}/v1/generation", params={"id": generation_id}, headers=mallory.headers
    )
    assert_openai_error(theirs, 404, "generation_not_found")
    unknown = httpx.get(
        f"{gateway.proxy}/v1/generation", params={"id": "gen-nope"}, headers=live_account.headers
    )
    assert_openai_error(unknown, 404, "generation_not_found")
    assert len(gateway.fake.app.requests) == upstream_calls

    mine = httpx.get(
        f"{gateway.proxy}/v1/generation", params={"id": generation_id}, headers=live_account.headers
    )
    assert mine.status_code == 200, mine.text
    assert mine.json()["data"]["id"] == generation_id
    assert gateway.fake.app.requests[-1].query == f"id={generation_id}"
    # Reading stats is free and leaves the books as they were.
    assert UsageRecord.objects.count() == 1
    assert check_ledger() == []
    assert balance_of(mallory.user) == 10


@pytest.mark.parametrize(
    "query",
    ["", "id=", "id=a&id=b", "id=a&x=1", "x=1", "id=%ff", "id"],
)
def test_generation_stats_need_exactly_one_id(
    gateway: Gateway, live_account: Account, query: str
) -> None:
    response = httpx.get(f"{gateway.proxy}/v1/generation?{query}", headers=live_account.headers)
    assert response.status_code in {400, 404}, response.text
    assert response.json()["error"]["code"] in {"invalid_generation_id", "generation_not_found"}
    assert len(gateway.fake.app.requests) == 0


def test_generation_stats_with_a_duplicated_id_cannot_smuggle_another(
    gateway: Gateway, live_account: Account, transactional_db: None
) -> None:
    """``?id=mine&id=theirs``: upstreams disagree on which one counts, so both are refused."""
    other = make_account("other")
    theirs = post(gateway, other).headers["x-generation-id"]
    mine = post(gateway, live_account).headers["x-generation-id"]
    calls = len(gateway.fake.app.requests)
    for query in (f"id={mine}&id={theirs}", f"id={theirs}&id={mine}"):
        response = httpx.get(f"{gateway.proxy}/v1/generation?{query}", headers=live_account.headers)
        assert_openai_error(response, 400, "invalid_generation_id")
    assert len(gateway.fake.app.requests) == calls
