"""The real Claude Code CLI against the gateway, offline: the fake OpenRouter answers.

Claude Code speaks Anthropic Messages: each model turn is one streamed
``POST {ANTHROPIC_BASE_URL}/v1/messages?beta=true``, with the token of
``ANTHROPIC_AUTH_TOKEN`` as ``Authorization: Bearer``. A streamed message's
usage carries no cost, so its record settles from the generation stats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from billing.models import CostSource
from devtools.fake_openrouter import ANSWER_TEXT
from tests.support.accounts import Account, Gateway
from tests.support.client_charges import (
    MARKUP,
    assert_charged_the_fake_cost,
    assert_forwarded_with_server_key,
    upstream_requests,
    wait_for_settled_records,
)
from tests.support.npm_clients import CLAUDE_CODE, isolated_env, require, run_client

MODEL = "x-ai/grok-code-fast-1"


@pytest.fixture(scope="session")
def claude() -> Path:
    return require(CLAUDE_CODE)


def claude_env(root: Path, base_url: str, token: str) -> dict[str, str]:
    """The README's configuration, in a home of its own, with nothing but the gateway to talk to."""
    env = isolated_env(root)
    env.update(
        {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_AUTH_TOKEN": token,
            "ANTHROPIC_API_KEY": "",
            # Every model Claude Code would pick by itself, pointed at one that is allowed.
            "ANTHROPIC_MODEL": MODEL,
            "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL,
            "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
            "CLAUDE_CODE_SUBAGENT_MODEL": MODEL,
            # No telemetry, error reports, update checks or connectivity probes.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            # Its settings and sessions (default ~/.claude and ~/.claude.json).
            "CLAUDE_CONFIG_DIR": str(root / "claude"),
            # A failed request fails the run at once instead of after ten backed-off retries.
            "CLAUDE_CODE_MAX_RETRIES": "0",
        }
    )
    return env


@pytest.mark.slow
def test_claude_code_print_is_answered_through_the_proxy_and_billed(
    gateway: Gateway, live_account: Account, claude: Path, tmp_path: Path, settings: Any
) -> None:
    settings.BILLING_MARKUP = MARKUP
    env = claude_env(tmp_path, gateway.proxy, live_account.token)
    command = [str(claude), "-p", "Hi, how are you?", "--model", MODEL, "--output-format", "json"]
    run = run_client(command, tmp_path, env)
    report = run.report

    assert run.returncode == 0, report
    output = json.loads(run.stdout)
    assert output["type"] == "result", report
    assert output["subtype"] == "success", report
    assert output["is_error"] is False, report
    assert ANSWER_TEXT in output["result"], report

    # One streamed Messages request per model turn (a plain answer: one turn), and
    # nothing else: no count_tokens, no connectivity probe, no catalogue read.
    messages = upstream_requests(gateway, "v1/messages")
    assert len(messages) == output["num_turns"] == 1, report
    others = {seen.path for seen in gateway.fake.app.requests} - {"/api/v1/messages"}
    assert others <= {"/api/v1/generation"}, others
    for seen in messages:
        assert seen.method == "POST"
        assert seen.query == "beta=true"  # forwarded byte for byte
        assert_forwarded_with_server_key(seen, live_account.token)
        body = json.loads(seen.body)
        assert body["model"] == MODEL
        assert body["stream"] is True

    user = live_account.user
    records = wait_for_settled_records(user, len(messages))
    assert_charged_the_fake_cost(
        gateway,
        user,
        records,
        endpoint="messages",
        model=MODEL,
        streamed=True,
        cost_source=CostSource.GENERATION,
    )
    # The fake's token counts reached Claude Code through the stream.
    assert output["usage"]["input_tokens"] == sum(r.prompt_tokens for r in records), report
    assert output["usage"]["output_tokens"] == sum(r.completion_tokens for r in records), report
