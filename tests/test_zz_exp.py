import asyncio, logging, uuid, re
from decimal import Decimal
import httpx
from billing.services import UsageDraft
from billing.usage import ReportedUsage
from billing.spool import spool_draft, spooled_paths
from billing.models import UsageRecord
from billing.services import check_ledger
from tests.conftest import Account, Gateway
from tests.faults.common import CHAT
from tests.servers import wait_until


def test_x(gateway: Gateway, live_account: Account, settings, caplog) -> None:
    caplog.set_level(logging.INFO)
    for i in range(300):
        spool_draft(UsageDraft(request_id=uuid.uuid4(), user_id=live_account.user.pk, endpoint="chat/completions", streamed=False, outcome="completed", usage=ReportedUsage(generation_id=f"gen-sp-{i}", cost=Decimal("0.001")), holds_slot=False))
    (settings.BILLING_SPOOL_DIR / "00000000-0000-0000-0000-000000000000.json").write_text("{garbage")

    async def fire():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{gateway.proxy}/v1/chat/completions", json=CHAT, headers=live_account.headers) for _ in range(16)))
    rs = asyncio.run(fire())
    print("statuses", [r.status_code for r in rs])
    wait_until(lambda: UsageRecord.objects.count() >= 316, timeout=30)
    replayed = sum(int(m) for m in re.findall(r"replayed (\d+) spooled", caplog.text))
    unreadable = caplog.text.count("unreadable spooled usage")
    print("records", UsageRecord.objects.count(), "replayed sum", replayed, "unreadable logs", unreadable, "left", len(spooled_paths()), check_ledger())
    for _ in range(3):
        httpx.post(f"{gateway.proxy}/v1/chat/completions", json=CHAT, headers=live_account.headers)
    print("unreadable logs after 3 more", caplog.text.count("unreadable spooled usage"))
