"""The gateway against an upstream that disagrees the way OpenRouter does.

OpenRouter publishes a generation's stats seconds after it ended, not at
once; its generation endpoint fails now and then; providers bill a cancelled
generation either for what was delivered or in full; a stream's error comes
in OpenRouter's own shape; keep-alive comments fall between data events; a
non-streamed answer sends its headers first and then whitespace until the
body is ready; and the operator bills at a markup. Each test makes one of
these happen through the real gateway and checks what the client saw, the
usage record, the charge (exactly what the fake says the generation cost,
times the markup, rounded as the ledger stores it) and the books.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal
from urllib.parse import parse_qs

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from billing.models import (
    CostSource,
    CreditAccount,
    CreditLedgerEntry,
    LedgerKind,
    ModelPrice,
    Outcome,
    Settlement,
    UsageRecord,
)
from billing.services import balance_of, check_ledger
from devtools import fake_openrouter
from devtools.fake_openrouter import (
    ANSWER_TEXT,
    FakeOpenRouter,
    GenerationStats,
    RunningFake,
    run_fake_openrouter,
)
from tests.support.accounts import SERVER_KEY, Account, Gateway
from tests.support.faults.common import CHAT, STREAM_CHAT, sse_events
from tests.support.logs import no_errors_logged
from tests.support.waiting import wait_for

CODER = "x-ai/grok-code-fast-1"
#: Seconds before the fake publishes a generation's stats: OpenRouter's order of magnitude.
LAG = 1.5
KEEPALIVE = ": OPENROUTER PROCESSING"
CREDIT = Decimal(10)
PICO = Decimal("1e-12")
#: A plain markup, and one whose products need rounding to the pico-dollar.
MARKUPS = ["1.25", "1.2345678901"]

Failure = Literal["503", "drop"]


# --------------------------------------------------------------------------- the fake


@dataclass(frozen=True, slots=True)
class Lookup:
    """One answer of the generation endpoint: its HTTP status, or None if the connection dropped."""

    generation_id: str
    status: int | None


class WatchedFake(FakeOpenRouter):
    """The fake, logging every generation-stats answer, its first ones failing on cue.

    ``failures``: what the next generation lookups get instead of an answer, in
    order: ``"503"`` (an error status) or ``"drop"`` (the connection closed
    before a byte of the body, an HTTP-level error for the caller).
    """

    def __init__(self, *, failures: Sequence[Failure] = (), **options: Any) -> None:
        super().__init__(**options)
        self.failures: deque[Failure] = deque(failures)
        self.lookups: list[Lookup] = []

    def answers(self, generation_id: str | None) -> list[int | None]:
        return [lookup.status for lookup in self.lookups if lookup.generation_id == generation_id]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/v1/generation":
            await super().__call__(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        generation_id = query.get("id", [""])[0]
        # Each answer is logged before it leaves: whoever reads the log after
        # receiving an answer finds it there.
        if self.failures:
            failure = self.failures.popleft()
            if failure == "503":
                self.lookups.append(Lookup(generation_id, 503))
                body = b'{"error":{"code":503,"message":"Service Unavailable"}}'
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            else:
                self.lookups.append(Lookup(generation_id, None))
                headers = [(b"content-type", b"application/json"), (b"content-length", b"400")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                # Returning now closes the connection short of the declared body
                # (the fake's own marker keeps uvicorn from logging it as a bug).
                fake_openrouter._DELIBERATE_CUT.set(True)
            return

        async def logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.lookups.append(Lookup(generation_id, message["status"]))
            await send(message)

        await super().__call__(scope, receive, logged)


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[RunningFake]:
    """The gateway's upstream; a test names its options with ``indirect`` parametrisation."""
    options: dict[str, Any] = {"generation_delay": 0.2, **getattr(request, "param", {})}
    with run_fake_openrouter(WatchedFake(api_key=SERVER_KEY, **options)) as running:
        yield running


def lagging(**options: Any) -> pytest.MarkDecorator:
    """Run the test against a fake with these options and a realistic stats lag."""
    return pytest.mark.parametrize(
        "fake", [{"generation_delay": LAG, **options}], indirect=True, ids=["lag"]
    )


def watched(gateway: Gateway) -> WatchedFake:
    app = gateway.fake.app
    assert isinstance(app, WatchedFake)
    return app


# --------------------------------------------------------------------------- helpers


def post(
    gateway: Gateway,
    account: Account,
    body: dict[str, Any],
    mode: str = "",
    path: str = "v1/chat/completions",
) -> httpx.Response:
    headers = {**account.headers, "X-Fake-Mode": mode}
    return httpx.post(f"{gateway.proxy}/{path}", json=body, headers=headers, timeout=10)


def leave_mid_stream(gateway: Gateway, account: Account) -> None:
    """Read two content events of a long, slow stream, then hang up."""
    headers = {**account.headers, "X-Fake-Mode": "chunks=50,chunk-delay=0.05"}
    with httpx.stream(
        "POST", f"{gateway.proxy}/v1/chat/completions", json=STREAM_CHAT, headers=headers
    ) as response:
        assert response.status_code == 200
        pieces = response.iter_raw()
        seen = 0
        while seen < 2:
            seen += next(pieces).count(b'"content":')
    wait_for(lambda: gateway.fake.app.disconnected_streams == 1, "the fake to see the client leave")


def the_record(settlement: str = Settlement.SETTLED) -> UsageRecord:
    return wait_for(
        lambda: UsageRecord.objects.filter(settlement=settlement).first(),
        f"the usage record to be {settlement}",
    )


def generation_of(gateway: Gateway, record: UsageRecord) -> GenerationStats:
    assert record.generation_id is not None, record.error_message
    return gateway.fake.app.generations[record.generation_id]


def at_markup(cost: Decimal) -> Decimal:
    """What a user pays for ``cost``: times the markup, half-up to the pico-dollar."""
    markup = Decimal(str(django_settings.BILLING_MARKUP))
    return (cost * markup).quantize(PICO, rounding=ROUND_HALF_UP)


def assert_charged(account: Account, record: UsageRecord, cost: Decimal) -> None:
    """The record, its one ledger row, the balance and the slot all agree on ``cost``."""
    assert cost > 0
    assert record.settlement == Settlement.SETTLED
    assert record.provider_cost == cost
    assert record.billed == at_markup(cost)
    rows = CreditLedgerEntry.objects.filter(kind=LedgerKind.USAGE, usage_record=record)
    assert list(rows.values_list("amount", flat=True)) == [-record.billed]
    assert balance_of(account.user) == CREDIT - record.billed
    assert CreditAccount.objects.get(user=account.user).in_flight == 0
    assert check_ledger() == []


def settlement_log(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "openrouter_proxy.settlement" and text in record.getMessage()
    ]


def blocks(text: str) -> list[str]:
    """The events of a stream body, comments included, in order."""
    return [block for block in text.replace("\r\n", "\n").split("\n\n") if block]


# --------------------------------------------------------------------------- stats that lag


@lagging()
def test_settlement_retries_until_the_stats_appear(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    """The first lookups find nothing yet (404); a later one, after the lag, settles."""
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0.1, 0.4, 1.5)  # lookups at 0.1, 0.5 and 2 s
    response = post(gateway, live_account, STREAM_CHAT, "cut")
    assert sse_events(response.text)[-1]["error"]["code"] == "upstream_stream_error"
    record = the_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.cost_source == CostSource.GENERATION
    answers = watched(gateway).answers(record.generation_id)
    assert len(answers) >= 2, answers
    assert answers[-1] == 200
    assert set(answers[:-1]) == {404}, answers
    stats = generation_of(gateway, record)
    assert record.completion_tokens == stats.tokens_completion
    assert_charged(live_account, record, stats.charged)


@lagging(failures=["503", "drop"])
def test_settlement_rides_out_a_failing_generation_endpoint(
    gateway: Gateway, live_account: Account, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An error status, then a dropped connection, then the lag: still settled, once, exactly."""
    caplog.set_level(logging.INFO, logger="openrouter_proxy.settlement")
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0.1, 0.1, 0.3, 1.2)  # at 0.1, 0.2, 0.5, 1.7 s
    response = post(gateway, live_account, STREAM_CHAT, "cut")
    assert sse_events(response.text)[-1]["error"]["code"] == "upstream_stream_error"
    record = the_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    answers = watched(gateway).answers(record.generation_id)
    assert answers[:2] == [503, None]
    assert answers[-1] == 200
    assert set(answers[2:-1]) <= {404}, answers
    # The dropped connection went through the HTTP-error branch, which retries.
    assert len(settlement_log(caplog, "not fetched yet")) == 1
    assert_charged(live_account, record, generation_of(gateway, record).charged)


@lagging()
def test_stats_later_than_every_retry_are_left_to_reconcile_usage(
    gateway: Gateway, live_account: Account, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process settlement gives up before the lag; reconcile_usage settles it, exactly once."""
    caplog.set_level(logging.INFO, logger="openrouter_proxy.settlement")
    settings.BILLING_MARKUP = "1.25"
    settings.OPENROUTER_PROXY_SETTLE_DELAYS = (0.1, 0.3)  # both lookups inside the lag
    response = post(gateway, live_account, STREAM_CHAT, "cut")
    assert response.status_code == 200
    fake = watched(gateway)
    wait_for(
        lambda: settlement_log(caplog, "left to reconcile_usage"),
        "in-process settlement to give up",
    )
    record = UsageRecord.objects.get()
    assert record.settlement == Settlement.PENDING
    assert record.billed == 0
    assert fake.answers(record.generation_id) == [404, 404]
    # Still pending, it keeps its in-flight slot and has charged nothing.
    assert CreditAccount.objects.get(user=live_account.user).in_flight == 1
    assert balance_of(live_account.user) == CREDIT

    def reconcile() -> str:
        out = io.StringIO()
        call_command("reconcile_usage", "--min-age", "0", stdout=out, stderr=io.StringIO())
        return out.getvalue()

    assert "0 settled, 1 still pending" in reconcile()  # stats not out yet: nothing guessed
    assert UsageRecord.objects.get().settlement == Settlement.PENDING
    stats = generation_of(gateway, record)
    wait_for(
        lambda: time.monotonic() - stats.finished_at >= LAG,
        "the fake to publish the generation's stats",
    )
    assert "1 settled" in reconcile()
    assert fake.answers(record.generation_id) == [404, 404, 404, 200]
    record.refresh_from_db()
    assert record.cost_source == CostSource.GENERATION
    assert_charged(live_account, record, stats.charged)
    assert "0 pending looked at" in reconcile()  # settled once: a rerun changes nothing
    assert_charged(live_account, UsageRecord.objects.get(), stats.charged)


# --------------------------------------------------------------------------- cancelled streams


@pytest.mark.parametrize(
    ("fake", "policy"),
    [({"bill_cancelled": "delivered"}, "delivered"), ({"bill_cancelled": "full"}, "full")],
    indirect=["fake"],
    ids=["delivered", "full"],
)
def test_a_cancelled_stream_costs_what_the_provider_billed(
    gateway: Gateway, live_account: Account, policy: str
) -> None:
    """Billed for the pieces delivered or for the whole answer: charged what the fake says."""
    leave_mid_stream(gateway, live_account)
    record = the_record()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.cost_source == CostSource.GENERATION
    stats = generation_of(gateway, record)
    assert stats.cancelled
    if policy == "full":
        assert stats.tokens_completion == 100  # all fifty pieces, of which the client read two
    else:
        assert 4 <= stats.tokens_completion < 100
    assert record.completion_tokens == stats.tokens_completion
    assert_charged(live_account, record, stats.charged)


# --------------------------------------------------------------------------- OpenRouter's shapes


@pytest.mark.parametrize("with_usage", [False, True], ids=["without usage", "with usage"])
def test_a_midstream_error_in_openrouter_shape_reaches_the_client_and_is_charged(
    gateway: Gateway, live_account: Account, with_usage: bool
) -> None:
    mode = "midstream-error-openrouter,chunks=2" + (",midstream-error-usage" if with_usage else "")
    with no_errors_logged("uvicorn.error"):
        response = post(gateway, live_account, STREAM_CHAT, mode)
    assert response.status_code == 200
    last = sse_events(response.text)[-1]
    # Passed through as OpenRouter sent it, not replaced by the gateway's own error.
    assert last["error"] == {
        "code": "server_error",
        "message": "Provider disconnected unexpectedly",
    }
    assert last["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]
    assert "upstream_stream_error" not in response.text
    assert "[DONE]" not in response.text
    record = the_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.error_message == "Provider disconnected unexpectedly"
    stats = generation_of(gateway, record)
    assert stats.finish_reason == "error"
    assert stats.tokens_completion == 4
    if with_usage:
        assert record.cost_source == CostSource.PROVIDER
        assert last["usage"]["cost"] == stats.charged
    else:
        assert "usage" not in last
        assert record.cost_source == CostSource.GENERATION
    assert_charged(live_account, record, stats.charged)


def test_an_error_body_in_openrouter_shape_parses_and_is_charged(
    gateway: Gateway, live_account: Account
) -> None:
    response = post(gateway, live_account, CHAT, "midstream-error-openrouter,keepalive=3")
    assert response.status_code == 200
    body = json.loads(response.content)
    assert body["error"]["code"] == "server_error"
    assert body["choices"][0]["finish_reason"] == "error"
    record = the_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.cost_source == CostSource.GENERATION
    assert_charged(live_account, record, generation_of(gateway, record).charged)


STREAMS = {
    "chat": ("v1/chat/completions", STREAM_CHAT, CostSource.PROVIDER),
    "responses": (
        "v1/responses",
        {"model": CODER, "input": "Hi", "stream": True},
        CostSource.PROVIDER,
    ),
    # Anthropic's events never carry OpenRouter's cost: settled from the stats.
    "messages": (
        "v1/messages",
        {"model": CODER, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
        | {"stream": True},
        CostSource.GENERATION,
    ),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_keepalives_between_data_events_pass_through_and_change_nothing(
    gateway: Gateway, live_account: Account, name: str
) -> None:
    path, body, source = STREAMS[name]
    with no_errors_logged("uvicorn.error"):
        response = post(gateway, live_account, body, "keepalive-between,keepalive=2", path)
    assert response.status_code == 200
    events = blocks(response.text)
    assert events[:2] == [KEEPALIVE, KEEPALIVE]
    after_first = events[2:]
    assert after_first[0] != KEEPALIVE
    assert after_first[-1] != KEEPALIVE
    # Every two data events have a comment between them: the client got it all.
    assert after_first[1::2] == [KEEPALIVE] * (len(after_first) // 2)
    assert KEEPALIVE not in after_first[::2]
    record = the_record()
    assert record.outcome == Outcome.COMPLETED
    assert record.cost_source == source
    stats = generation_of(gateway, record)
    assert not stats.cancelled
    assert record.completion_tokens == stats.tokens_completion == 6
    assert_charged(live_account, record, stats.charged)


JSON_BODIES = {
    "chat": ("v1/chat/completions", CHAT),
    "responses": ("v1/responses", {"model": CODER, "input": "Hi"}),
    "messages": (
        "v1/messages",
        {"model": CODER, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]},
    ),
}


def answer_text(name: str, body: dict[str, Any]) -> str:
    if name == "chat":
        text: str = body["choices"][0]["message"]["content"]
    elif name == "responses":
        text = body["output"][0]["content"][0]["text"]
    else:
        text = body["content"][0]["text"]
    return text


@pytest.mark.parametrize("name", list(JSON_BODIES))
def test_headers_first_then_padding_keeps_a_slow_json_answer_alive(
    gateway: Gateway, live_account: Account, settings: Any, name: str
) -> None:
    """Headers at once, then a line of padding every 0.3 s, then the body after 1.2 s.

    The gateway's read timeout (0.9 s) is shorter than the wait for the body but
    longer than any gap: the padding keeps the request alive, reaches the
    client first, and the body still parses and is charged exactly.
    """
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.9
    path, body = JSON_BODIES[name]
    headers = {
        **live_account.headers,
        "X-Fake-Mode": "headers-first,first-byte-delay=1.2,keepalive=4",
    }
    with (
        no_errors_logged("uvicorn.error"),
        httpx.stream("POST", f"{gateway.proxy}/{path}", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        pieces = list(response.iter_raw())
    raw = b"".join(pieces)
    assert pieces[0].isspace()  # the padding came before the body, as it was sent
    assert raw.startswith(b"\n" * 4)
    document = json.loads(raw, parse_float=Decimal)
    assert answer_text(name, document) == ANSWER_TEXT
    record = the_record()
    assert record.outcome == Outcome.COMPLETED
    assert record.cost_source == CostSource.PROVIDER
    assert record.streamed is False
    stats = generation_of(gateway, record)
    assert document["usage"]["cost"] == stats.charged
    assert_charged(live_account, record, stats.charged)


def test_without_padding_the_read_timeout_cuts_and_the_stats_still_charge(
    gateway: Gateway, live_account: Account, settings: Any
) -> None:
    """The same slow answer with no padding: the gateway gives up on the body at its read
    timeout, the client sees a broken response rather than a complete one, and the
    generation OpenRouter ran to its end is charged from its stats."""
    settings.OPENROUTER_PROXY_READ_TIMEOUT = 0.3
    headers = {
        **live_account.headers,
        "X-Fake-Mode": "headers-first,first-byte-delay=0.8,keepalive=0",
    }
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{gateway.proxy}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    record = the_record()
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.cost_source == CostSource.GENERATION
    stats = generation_of(gateway, record)
    assert not stats.cancelled
    assert_charged(live_account, record, stats.charged)


# --------------------------------------------------------------------------- markup


@pytest.fixture(params=MARKUPS)
def markup(request: pytest.FixtureRequest, settings: Any) -> Decimal:
    settings.BILLING_MARKUP = request.param
    return Decimal(request.param)


@pytest.mark.parametrize("mode", ["", "byok"], ids=["credits", "byok"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_markup_on_the_cost_the_response_reports(
    gateway: Gateway, live_account: Account, markup: Decimal, mode: str, stream: bool
) -> None:
    response = post(gateway, live_account, STREAM_CHAT if stream else CHAT, mode)
    usage = (
        sse_events(response.text)[-1]["usage"]
        if stream
        else json.loads(response.content, parse_float=Decimal)["usage"]
    )
    record = the_record()
    assert record.cost_source == CostSource.PROVIDER
    stats = generation_of(gateway, record)
    said = usage["cost"] + (usage["cost_details"]["upstream_inference_cost"] if mode else 0)
    assert said == stats.charged
    assert record.billed != stats.charged  # the markup is applied, not lost
    assert_charged(live_account, record, stats.charged)


def test_markup_on_the_price_table(
    gateway: Gateway, live_account: Account, markup: Decimal
) -> None:
    prompt, completion = Decimal("0.0000002"), Decimal("0.0000015")
    ModelPrice.objects.create(model_id=CODER, prompt=prompt, completion=completion)
    response = post(gateway, live_account, STREAM_CHAT, "no-cost")
    usage = sse_events(response.text)[-1]["usage"]
    assert "cost" not in usage
    expected = usage["prompt_tokens"] * prompt + usage["completion_tokens"] * completion
    record = the_record()
    assert record.cost_source == CostSource.PRICE_TABLE
    assert expected == generation_of(gateway, record).charged  # the table is the fake's price
    assert record.billed != expected
    assert_charged(live_account, record, expected)


def test_markup_on_settlement_from_generation_stats(
    gateway: Gateway, live_account: Account, markup: Decimal
) -> None:
    leave_mid_stream(gateway, live_account)
    record = the_record()
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.cost_source == CostSource.GENERATION
    stats = generation_of(gateway, record)
    assert record.billed != stats.charged
    assert_charged(live_account, record, stats.charged)
