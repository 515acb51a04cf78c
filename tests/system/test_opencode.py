"""The real opencode CLI against the proxy, offline: the fake OpenRouter answers."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from billing.models import CreditAccount, Outcome, Settlement, UsageRecord
from billing.services import balance_of, check_ledger
from devtools.fake_openrouter import ANSWER_TEXT, SeenRequest
from terragon.management.commands.serve import opencode_config
from tests.support.accounts import SERVER_KEY, Account, Gateway
from tests.support.npm_clients import OPENCODE, isolated_env, require, run_client
from tests.support.servers import wait_until

MODEL = "x-ai/grok-code-fast-1"

# Everything opencode could fetch, share or download, switched off. opencode also
# installs @opencode-ai/plugin into each config folder in the background, with
# its bundled npm (no switch for that): npm's own settings keep it off the
# network, and its failure is only logged as a warning.
OFFLINE = {
    "OPENCODE_DISABLE_MODELS_FETCH": "true",
    "OPENCODE_DISABLE_AUTOUPDATE": "true",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "true",
    "OPENCODE_DISABLE_SHARE": "true",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "true",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "true",
    "OPENCODE_DISABLE_CLAUDE_CODE": "true",
    "OPENCODE_DISABLE_PROJECT_CONFIG": "true",
    "OPENCODE_PURE": "1",
    "npm_config_offline": "true",
    "npm_config_registry": "http://127.0.0.1:9/",
}


@pytest.fixture(scope="session")
def opencode() -> Path:
    return require(OPENCODE)


def opencode_env(root: Path, token: str) -> dict[str, str]:
    """An isolated home under ``root``, opencode kept offline, and the token for its config."""
    return {**isolated_env(root), **OFFLINE, "TERRAGON_TOKEN": token}


def chat_requests(gateway: Gateway) -> list[SeenRequest]:
    return [seen for seen in gateway.fake.app.requests if seen.path.endswith("/chat/completions")]


@pytest.mark.slow
def test_opencode_run_is_answered_through_the_proxy_and_billed(
    gateway: Gateway, live_account: Account, opencode: Path, tmp_path: Path
) -> None:
    env = opencode_env(tmp_path, live_account.token)
    config = Path(env["XDG_CONFIG_HOME"]) / "opencode" / "opencode.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(opencode_config(f"{gateway.proxy}/v1"), indent=2))
    command = [str(opencode), "run", "--model", "terry/grok-code", "--format", "json"]
    run = run_client([*command, "Hi, how are you?"], tmp_path, env)
    report = run.report

    assert run.returncode == 0, report
    events = run.json_events()
    assert not [event for event in events if event.get("type") == "error"], report
    texts = [event["part"]["text"] for event in events if event.get("type") == "text"]
    assert any(ANSWER_TEXT in text for text in texts), report
    finishes = [event["part"] for event in events if event.get("type") == "step_finish"]
    assert finishes, report

    # The main request and, for a new session, a title request: each one streamed,
    # with the daemon token swapped for the server's key on the way out.
    chats = chat_requests(gateway)
    assert chats, report
    for seen in chats:
        assert seen.header("x-daemon-token") is None
        assert seen.header("authorization") == f"Bearer {SERVER_KEY}"
        body = json.loads(seen.body)
        assert body["model"] == MODEL
        assert body["stream"] is True

    user = live_account.user
    # A stream's record is written when its response ends: wait for all of them.
    assert wait_until(
        lambda: (
            UsageRecord.objects.filter(user=user, settlement=Settlement.SETTLED).count()
            == len(chat_requests(gateway))
        ),
        timeout=15,
    ), list(UsageRecord.objects.filter(user=user).values())
    records = list(UsageRecord.objects.filter(user=user))
    assert len(records) == len(chat_requests(gateway)) >= 1
    for record in records:
        assert record.streamed is True
        assert record.model == MODEL
        assert record.requested_model == MODEL
        assert record.outcome == Outcome.COMPLETED
        assert record.settlement == Settlement.SETTLED
        assert record.billed > 0
    # The usage chunk reached opencode too: it counted the main request's tokens.
    prompt_tokens = {record.prompt_tokens for record in records}
    assert finishes[-1]["tokens"]["input"] in prompt_tokens, (finishes, prompt_tokens)
    billed = sum((record.billed for record in records), Decimal(0))
    assert balance_of(user) == Decimal(10) - billed
    assert wait_until(lambda: CreditAccount.objects.get(user=user).in_flight == 0)
    assert check_ledger() == []
