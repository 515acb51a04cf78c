"""The openai and anthropic Python SDKs against the live gateway and the fake OpenRouter.

Each call must be answered in its API's own shape and charge the caller exactly
the cost the fake reported for its generation, times ``BILLING_MARKUP``.
Chat completions through the openai SDK are covered in ``test_proxy.py``.

The SDKs retry 408/409/429/5xx answers by themselves (twice by default); a
retried inference can be paid twice, so every client here has ``max_retries=0``
and a failure shows as itself.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from billing.models import CostSource
from devtools.fake_openrouter import ANSWER_TEXT
from openrouter_proxy.conf import DEFAULT_ALLOWED_MODELS
from tests.support.accounts import Account, Gateway
from tests.support.client_charges import (
    MARKUP,
    assert_charged_the_fake_cost,
    assert_forwarded_with_server_key,
    upstream_requests,
    wait_for_settled_records,
)

MODEL = "x-ai/grok-code-fast-1"
EMBEDDING_MODEL = "openai/text-embedding-3-small"
PROMPT = "Hi, how are you?"


@pytest.fixture(autouse=True)
def _markup(settings: Any) -> None:
    settings.BILLING_MARKUP = MARKUP


def openai_client(gateway: Gateway, account: Account) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.proxy}/v1", api_key=account.token, max_retries=0)


def anthropic_client(gateway: Gateway, account: Account) -> anthropic.Anthropic:
    # The base URL is the proxy prefix: the SDK appends ``/v1/messages`` itself.
    return anthropic.Anthropic(base_url=gateway.proxy, api_key=account.token, max_retries=0)


def only_request(gateway: Gateway, path: str, account: Account) -> dict[str, Any]:
    """The one request the fake received at ``path``, checked for its key; returns its body."""
    seen = upstream_requests(gateway, path)
    assert len(seen) == 1, [(s.method, s.path) for s in gateway.fake.app.requests]
    assert seen[0].method == "POST"
    assert_forwarded_with_server_key(seen[0], account.token)
    body = json.loads(seen[0].body)
    assert isinstance(body, dict)
    return body


# --- openai: Responses API -----------------------------------------------------------


@pytest.mark.slow
def test_openai_responses_create(gateway: Gateway, live_account: Account) -> None:
    client = openai_client(gateway, live_account)

    response = client.responses.create(model=MODEL, input=PROMPT)

    assert response.status == "completed"
    assert ANSWER_TEXT in response.output_text
    assert response.usage is not None
    body = only_request(gateway, "v1/responses", live_account)
    assert body["model"] == MODEL
    assert body.get("stream") is not True
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway, live_account.user, records, endpoint="responses", model=MODEL, streamed=False
    )
    assert response.usage.input_tokens == records[0].prompt_tokens
    assert response.usage.output_tokens == records[0].completion_tokens


@pytest.mark.slow
def test_openai_responses_stream(gateway: Gateway, live_account: Account) -> None:
    client = openai_client(gateway, live_account)

    events = list(client.responses.create(model=MODEL, input=PROMPT, stream=True))

    types = [event.type for event in events]
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert ANSWER_TEXT in text, types
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    body = only_request(gateway, "v1/responses", live_account)
    assert body["stream"] is True
    # The record is written as the stream ends, just after the last event was read.
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway, live_account.user, records, endpoint="responses", model=MODEL, streamed=True
    )
    assert final.response.usage.input_tokens == records[0].prompt_tokens
    assert final.response.usage.output_tokens == records[0].completion_tokens


# --- openai: embeddings --------------------------------------------------------------


@pytest.mark.slow
def test_openai_embeddings_create(gateway: Gateway, live_account: Account, settings: Any) -> None:
    settings.OPENROUTER_PROXY_ALLOWED_MODELS = [*DEFAULT_ALLOWED_MODELS, EMBEDDING_MODEL]
    client = openai_client(gateway, live_account)

    result = client.embeddings.create(model=EMBEDDING_MODEL, input=["hello", "world"])

    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert item.embedding, item
        assert all(isinstance(value, float) for value in item.embedding)
    body = only_request(gateway, "v1/embeddings", live_account)
    assert body["model"] == EMBEDDING_MODEL
    assert body["input"] == ["hello", "world"]
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway,
        live_account.user,
        records,
        endpoint="embeddings",
        model=EMBEDDING_MODEL,
        streamed=False,
    )
    assert result.usage.prompt_tokens == records[0].prompt_tokens


# --- anthropic: Messages -------------------------------------------------------------


@pytest.mark.slow
def test_anthropic_messages_create(gateway: Gateway, live_account: Account) -> None:
    client = anthropic_client(gateway, live_account)

    message = client.messages.create(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": PROMPT}]
    )

    assert message.type == "message"
    assert message.role == "assistant"
    text = "".join(block.text for block in message.content if block.type == "text")
    assert ANSWER_TEXT in text
    body = only_request(gateway, "v1/messages", live_account)
    assert body["model"] == MODEL
    assert body.get("stream") is not True
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway, live_account.user, records, endpoint="messages", model=MODEL, streamed=False
    )
    assert message.usage.input_tokens == records[0].prompt_tokens
    assert message.usage.output_tokens == records[0].completion_tokens


@pytest.mark.slow
def test_anthropic_messages_stream_settles_from_the_generation_stats(
    gateway: Gateway, live_account: Account
) -> None:
    client = anthropic_client(gateway, live_account)

    with client.messages.stream(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        types = [event.type for event in stream]
        message = stream.get_final_message()

    assert types[0] == "message_start", types
    assert types[-1] == "message_stop", types
    text = "".join(block.text for block in message.content if block.type == "text")
    assert ANSWER_TEXT in text
    body = only_request(gateway, "v1/messages", live_account)
    assert body["stream"] is True
    # A streamed message's usage has no cost: the record settles once the gateway
    # has read the generation's stats, which the fake serves a little later.
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway,
        live_account.user,
        records,
        endpoint="messages",
        model=MODEL,
        streamed=True,
        cost_source=CostSource.GENERATION,
    )
    lookups = upstream_requests(gateway, "v1/generation")
    assert lookups, "the gateway never asked for the generation's stats"
    assert all(seen.method == "GET" for seen in lookups)
    assert message.usage.input_tokens == records[0].prompt_tokens
    assert message.usage.output_tokens == records[0].completion_tokens


@pytest.mark.slow
def test_anthropic_x_api_key_is_accepted_and_not_forwarded(
    gateway: Gateway, live_account: Account
) -> None:
    """Anthropic's own header (older SDKs, Claude Code with ``ANTHROPIC_API_KEY``) works too."""
    client = anthropic_client(gateway, live_account)

    message = client.messages.create(
        model=MODEL,
        max_tokens=256,
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers={"Authorization": anthropic.omit, "X-Api-Key": live_account.token},
    )

    assert ANSWER_TEXT in "".join(block.text for block in message.content if block.type == "text")
    only_request(gateway, "v1/messages", live_account)  # carries the server's key only
    records = wait_for_settled_records(live_account.user, 1)
    assert_charged_the_fake_cost(
        gateway, live_account.user, records, endpoint="messages", model=MODEL, streamed=False
    )
