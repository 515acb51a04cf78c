"""The real Codex CLI against the gateway, offline: the fake OpenRouter answers.

Codex speaks the Responses API: ``codex exec`` makes one streamed
``POST {base_url}/responses`` per model turn (``store: false``), with the
provider's ``env_key`` variable as ``Authorization: Bearer``. The cost is in
the ``response.completed`` event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools.fake_openrouter import ANSWER_TEXT
from tests.support.accounts import Account, Gateway
from tests.support.client_charges import (
    MARKUP,
    assert_charged_the_fake_cost,
    assert_forwarded_with_server_key,
    upstream_requests,
    wait_for_settled_records,
)
from tests.support.npm_clients import CODEX, isolated_env, require, run_client

MODEL = "x-ai/grok-code-fast-1"


@pytest.fixture(scope="session")
def codex() -> Path:
    return require(CODEX)


def codex_config(base_url: str) -> str:
    """The README's ``config.toml``, plus no retries: a failed request fails the run at once."""
    return f"""\
model = "{MODEL}"
model_provider = "terragon"
check_for_update_on_startup = false

# Otherwise Codex calls ab.chatgpt.com (analytics) and api.github.com (plugin sync).
[analytics]
enabled = false

[features]
plugins = false

[model_providers.terragon]
name = "Terragon"
base_url = "{base_url}"
env_key = "TERRAGON_TOKEN"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""


@pytest.mark.slow
def test_codex_exec_is_answered_through_the_proxy_and_billed(
    gateway: Gateway, live_account: Account, codex: Path, tmp_path: Path, settings: Any
) -> None:
    settings.BILLING_MARKUP = MARKUP
    env = isolated_env(tmp_path)
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(codex_config(f"{gateway.proxy}/v1"))
    env["CODEX_HOME"] = str(codex_home)
    env["TERRAGON_TOKEN"] = live_account.token
    command = [str(codex), "exec", "--skip-git-repo-check", "--json", "Hi, how are you?"]
    run = run_client(command, tmp_path, env)
    report = run.report

    assert run.returncode == 0, report
    events = run.json_events()
    assert not [e for e in events if e.get("type") in ("error", "turn.failed")], report
    answers = [
        event["item"]["text"]
        for event in events
        if event.get("type") == "item.completed" and event["item"].get("type") == "agent_message"
    ]
    assert any(ANSWER_TEXT in text for text in answers), report
    turns = [event for event in events if event.get("type") == "turn.completed"]
    assert len(turns) == 1, report

    # One streamed Responses request, stateless as OpenRouter requires, and nothing
    # else reached upstream: no catalogue read, no account endpoint.
    responses = upstream_requests(gateway, "v1/responses")
    assert len(responses) == 1, report
    others = {seen.path for seen in gateway.fake.app.requests} - {"/api/v1/responses"}
    assert others <= {"/api/v1/generation"}, others
    for seen in responses:
        assert seen.method == "POST"
        assert_forwarded_with_server_key(seen, live_account.token)
        body = json.loads(seen.body)
        assert body["model"] == MODEL
        assert body["stream"] is True
        assert body["store"] is False
        assert "previous_response_id" not in body

    user = live_account.user
    records = wait_for_settled_records(user, len(responses))
    assert_charged_the_fake_cost(
        gateway, user, records, endpoint="responses", model=MODEL, streamed=True
    )
    # The fake's token counts reached Codex in response.completed.
    usage = turns[0]["usage"]
    assert usage["input_tokens"] == sum(r.prompt_tokens for r in records), report
    assert usage["output_tokens"] == sum(r.completion_tokens for r in records), report
