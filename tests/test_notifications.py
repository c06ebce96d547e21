"""Subscribe-message queue: enqueue inside transactions, and deliver_due against the WeChat stand-in."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from datetime import datetime, timedelta, timezone

import pytest
import requests
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from backend import clock, notifications
from backend.context import Services
from backend.models import (
    ContentFlag,
    Notification,
    NotificationStatus,
    RequestStatus,
    Role,
    ServiceRequest,
    User,
)
from backend.notifications import MAX_ATTEMPTS, RETRY_BASE_DELAY_S, deliver_due, enqueue
from backend.wechat import WeChatGateway
from tests.factories import SIMING, SIMING_CODE, make_city

HTTP_TIMEOUT_S = 5.0
SEND_PATH = "/cgi-bin/message/subscribe/send"
# 09:30 in Xiamen.
START = datetime(2025, 3, 8, 1, 30, tzinfo=timezone.utc)
TEMPLATES = {
    "template_offer": "tpl-offer",
    "template_request_status": "tpl-status",
    "template_request_cancelled": "tpl-cancelled",
}


@pytest.fixture
def notify_services(services) -> Services:
    """The test services with all three template ids configured and the stand-in reset."""
    response = requests.post(f"{services.settings.wechat_api_base_url}__standin__/reset", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 204
    clock.freeze(START)
    return dataclasses.replace(services, settings=dataclasses.replace(services.settings, **TEMPLATES))


def _standin(services: Services, path: str) -> str:
    return f"{services.settings.wechat_api_base_url}__standin__/{path}"


def _send_calls(services: Services) -> list[dict]:
    response = requests.get(_standin(services, "calls"), timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return [call for call in response.json() if call["path"] == SEND_PATH]


def _messages(services: Services) -> list[dict]:
    response = requests.get(_standin(services, "subscribe-messages"), timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return response.json()


def _script(services: Services, openid: str, errcodes: list[int]) -> None:
    response = requests.post(
        _standin(services, "script"), json={"openid": openid, "errcodes": errcodes}, timeout=HTTP_TIMEOUT_S
    )
    assert response.status_code == 204


def _unsubscribe(services: Services, openid: str) -> None:
    response = requests.post(_standin(services, "unsubscribe"), json={"openid": openid}, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 204


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _user(openid: str | None = "o-notify-resident-0001") -> User:
    return await User.create(openid=openid, roles=[Role.RESIDENT.value])


async def _only_row() -> Notification:
    rows = await Notification.all()
    assert len(rows) == 1
    return rows[0]


# Delivery


async def test_offer_sent_and_recorded(notify_services) -> None:
    worker = await _user("o-notify-worker-0001")
    await enqueue(
        worker.id,
        "offer_new",
        dedupe_key="offer:1:1",
        service_request_id=1,
        data={"category": "elderly_care", "distance_m": 1234},
    )

    sent = await deliver_due(notify_services)

    assert sent == 1
    row = await _only_row()
    assert row.status == NotificationStatus.SENT
    assert row.sent_at == START
    assert row.attempts == 1
    assert row.last_errcode is None
    messages = _messages(notify_services)
    assert messages == [
        {
            "touser": "o-notify-worker-0001",
            "template_id": "tpl-offer",
            "data": {
                "thing1": {"value": "养老照护"},
                "phrase2": {"value": "新邀约"},
                "time3": {"value": "2025年3月8日 09:30"},
                "thing4": {"value": "距您约1.2公里，请尽快回应"},
            },
        }
    ]


@pytest.mark.parametrize(
    ("kind", "template_id", "phrase"),
    [
        ("request_accepted", "tpl-status", "已接单"),
        ("request_started", "tpl-status", "服务中"),
        ("request_completed", "tpl-status", "已完成"),
        ("request_station_queued", "tpl-status", "排队中"),
        ("request_cancelled", "tpl-cancelled", "已取消"),
    ],
)
async def test_kind_uses_its_template(notify_services, kind: str, template_id: str, phrase: str) -> None:
    user = await _user()
    await enqueue(user.id, kind, dedupe_key=f"{kind}:1", service_request_id=1, data={"category": "child_care"})

    assert await deliver_due(notify_services) == 1

    [message] = _messages(notify_services)
    assert message["template_id"] == template_id
    assert message["data"]["phrase2"] == {"value": phrase}
    assert message["data"]["thing1"] == {"value": "儿童关爱"}


async def test_message_omits_caller_text(notify_services) -> None:
    user = await _user()
    data = {"category": "elderly_care", "address": "思明区厦禾路100号", "phone": "13800000000", "description": "上门"}
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1", data=data)

    await deliver_due(notify_services)

    [message] = _messages(notify_services)
    values = [item["value"] for item in message["data"].values()]
    assert not any("厦禾路" in value for value in values)
    assert not any("13800000000" in value for value in values)
    assert not any("上门" in value for value in values)
    # The row keeps what the caller stored.
    row = await _only_row()
    assert row.data == data


@pytest.mark.parametrize("errcode", [-1, 45009])
async def test_transient_error_retried_then_sent(notify_services, errcode: int) -> None:
    user = await _user()
    _script(notify_services, user.openid, [errcode])
    await enqueue(user.id, "request_started", dedupe_key="started:1", data={"category": "elderly_care"})

    assert await deliver_due(notify_services) == 0

    row = await _only_row()
    assert row.status == NotificationStatus.PENDING
    assert row.attempts == 1
    assert row.last_errcode == errcode
    assert row.next_attempt_at == START + timedelta(seconds=RETRY_BASE_DELAY_S)

    # Not due before the backoff ends.
    clock.freeze(START + timedelta(seconds=RETRY_BASE_DELAY_S - 1))
    assert await deliver_due(notify_services) == 0
    assert len(_send_calls(notify_services)) == 1

    clock.freeze(START + timedelta(seconds=RETRY_BASE_DELAY_S + 1))
    assert await deliver_due(notify_services) == 1

    await row.refresh_from_db()
    assert row.status == NotificationStatus.SENT
    assert row.attempts == 2
    assert row.sent_at == START + timedelta(seconds=RETRY_BASE_DELAY_S + 1)
    assert [call["errcode"] for call in _send_calls(notify_services)] == [errcode, 0]


async def test_unsubscribed_undeliverable_not_retried(notify_services) -> None:
    user = await _user()
    _unsubscribe(notify_services, user.openid)
    await enqueue(user.id, "request_completed", dedupe_key="completed:1")

    assert await deliver_due(notify_services) == 0

    row = await _only_row()
    assert row.status == NotificationStatus.UNDELIVERABLE
    assert row.last_errcode == 43101
    assert row.sent_at is None

    clock.freeze(START + timedelta(days=1))
    await deliver_due(notify_services)
    assert len(_send_calls(notify_services)) == 1


async def test_failed_after_max_attempts(notify_services) -> None:
    user = await _user()
    _script(notify_services, user.openid, [-1] * (MAX_ATTEMPTS + 1))
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")

    delays = []
    now = START
    for _ in range(MAX_ATTEMPTS):
        clock.freeze(now)
        assert await deliver_due(notify_services) == 0
        row = await _only_row()
        if row.status == NotificationStatus.PENDING:
            delays.append((row.next_attempt_at - now).total_seconds())
            now = row.next_attempt_at

    row = await _only_row()
    assert row.status == NotificationStatus.FAILED
    assert row.attempts == MAX_ATTEMPTS
    assert row.last_errcode == -1
    assert delays == [30, 60, 120, 240]
    assert len(_send_calls(notify_services)) == MAX_ATTEMPTS

    clock.freeze(now + timedelta(days=1))
    await deliver_due(notify_services)
    assert len(_send_calls(notify_services)) == MAX_ATTEMPTS


async def test_rejected_message_fails_at_once(notify_services) -> None:
    user = await _user()
    # 40037: WeChat does not know the template id.
    _script(notify_services, user.openid, [40037])
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")

    await deliver_due(notify_services)

    row = await _only_row()
    assert row.status == NotificationStatus.FAILED
    assert row.attempts == 1
    assert row.last_errcode == 40037


async def test_missing_template_undeliverable(notify_services) -> None:
    services = dataclasses.replace(
        notify_services, settings=dataclasses.replace(notify_services.settings, template_request_status="")
    )
    user = await _user()
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")

    assert await deliver_due(services) == 0

    row = await _only_row()
    assert row.status == NotificationStatus.UNDELIVERABLE
    assert row.last_errcode is None
    assert _send_calls(services) == []


async def test_user_without_openid_undeliverable(notify_services) -> None:
    officer = await User.create(username="notify-officer", roles=[Role.OFFICER.value])
    await enqueue(officer.id, "request_cancelled", dedupe_key="cancelled:1")

    assert await deliver_due(notify_services) == 0

    row = await _only_row()
    assert row.status == NotificationStatus.UNDELIVERABLE
    assert row.last_errcode is None
    assert _send_calls(notify_services) == []


async def test_concurrent_deliveries_send_once(notify_services) -> None:
    for index in range(10):
        user = await _user(f"o-notify-concurrent-{index:04d}")
        await enqueue(user.id, "request_accepted", dedupe_key=f"accepted:{index}")
    # A second gateway, as a second process would have.
    other = dataclasses.replace(notify_services, wechat=WeChatGateway(notify_services.settings))

    first, second = await asyncio.gather(deliver_due(notify_services), deliver_due(other))
    other.wechat.close()

    assert first + second == 10
    recipients = [message["touser"] for message in _messages(notify_services)]
    assert len(recipients) == 10
    assert len(set(recipients)) == 10
    assert await Notification.filter(status=NotificationStatus.SENT).count() == 10
    assert set(await Notification.all().values_list("attempts", flat=True)) == {1}


async def test_deliver_due_respects_limit(notify_services) -> None:
    for index in range(3):
        user = await _user(f"o-notify-limit-{index:04d}")
        await enqueue(user.id, "request_accepted", dedupe_key=f"accepted:{index}")

    assert await deliver_due(notify_services, limit=2) == 2
    assert await deliver_due(notify_services, limit=2) == 1
    assert await deliver_due(notify_services, limit=2) == 0


async def test_expired_claim_delivered_again(notify_services) -> None:
    user = await _user()
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")
    # A process claimed the row and stopped before it stored an outcome.
    lease_until = START + timedelta(seconds=notifications.CLAIM_LEASE_S)
    await Notification.all().update(attempts=1, next_attempt_at=lease_until)

    assert await deliver_due(notify_services) == 0
    clock.freeze(lease_until)
    assert await deliver_due(notify_services) == 1

    row = await _only_row()
    assert row.status == NotificationStatus.SENT
    assert row.attempts == 2


async def test_claimed_max_times_fails_unsent(notify_services) -> None:
    user = await _user()
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")
    await Notification.all().update(attempts=MAX_ATTEMPTS)

    assert await deliver_due(notify_services) == 0

    row = await _only_row()
    assert row.status == NotificationStatus.FAILED
    assert _send_calls(notify_services) == []


async def test_wechat_down_keeps_row_and_state(notify_services) -> None:
    await make_city()
    resident = await _user()
    request = await ServiceRequest.create(
        resident=resident,
        category="elderly_care",
        description="需要陪同就医",
        address="思明区测试路1号",
        lat=SIMING[0],
        lng=SIMING[1],
        district_id=SIMING_CODE,
        status=RequestStatus.ACCEPTED,
        created_at=START,
        updated_at=START,
    )
    async with in_transaction():
        await ServiceRequest.filter(id=request.id).update(status=RequestStatus.IN_SERVICE, started_at=START)
        await enqueue(resident.id, "request_started", dedupe_key=f"started:{request.id}", service_request_id=request.id)
    # Nothing listens on this port, so every send fails to connect.
    down_settings = dataclasses.replace(
        notify_services.settings, wechat_api_base_url=f"http://127.0.0.1:{_free_port()}/"
    )
    down = dataclasses.replace(notify_services, settings=down_settings, wechat=WeChatGateway(down_settings))

    sent = await deliver_due(down)
    down.wechat.close()

    assert sent == 0
    await request.refresh_from_db()
    assert request.status == RequestStatus.IN_SERVICE
    row = await _only_row()
    assert row.status == NotificationStatus.PENDING
    assert row.service_request_id == request.id
    assert row.attempts == 1
    assert row.last_errcode is None
    assert row.next_attempt_at == START + timedelta(seconds=RETRY_BASE_DELAY_S)


async def test_failure_log_masks_openid(notify_services, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend")
    user = await _user("o-notify-secret-openid-7788")
    _script(notify_services, user.openid, [-1])
    await enqueue(user.id, "request_accepted", dedupe_key="accepted:1")

    await deliver_due(notify_services)

    row = await _only_row()
    lines = [record.getMessage() for record in caplog.records if record.name == "backend.notifications"]
    assert len(lines) == 1
    assert f"notification_id={row.id}" in lines[0]
    assert "kind=request_accepted" in lines[0]
    assert "errcode=-1" in lines[0]
    assert "o-no***7788" in lines[0]
    assert user.openid not in caplog.text


# Message data


def test_assigned_offer_message() -> None:
    data = notifications.build_message_data("offer_new", {"category": "medical_escort", "assigned": True}, START)

    assert data["phrase2"] == {"value": "新指派"}
    assert data["thing4"] == {"value": "服务站已将该需求指派给您"}
    assert data["thing1"] == {"value": "就医陪诊"}


@pytest.mark.parametrize(("distance_m", "shown"), [(800, "约800米"), (837, "约800米"), (851, "约900米"), (20, "约100米")])
def test_short_distance_rounded_to_100_m(distance_m: int, shown: str) -> None:
    data = notifications.build_message_data(
        "offer_new", {"category": "elderly_care", "distance_m": distance_m}, START
    )

    assert data["thing4"] == {"value": f"距您{shown}，请尽快回应"}


def test_unknown_category_generic_name() -> None:
    data = notifications.build_message_data("request_accepted", {"category": "no-such-category"}, START)

    assert data["thing1"] == {"value": "社会工作服务"}


def test_every_kind_fits_wechat_limits() -> None:
    for kind in notifications.KINDS:
        for extra in ({}, {"distance_m": 99_999}, {"assigned": True}):
            data = notifications.build_message_data(kind, {"category": "disability_care", **extra}, START)
            assert len(data["thing1"]["value"]) <= 20, kind
            assert len(data["thing4"]["value"]) <= 20, kind
            assert len(data["phrase2"]["value"]) <= 5, kind


# enqueue


async def test_enqueue_writes_pending_row(notify_services) -> None:
    user = await _user()

    await enqueue(user.id, "request_accepted", dedupe_key="accepted:7", service_request_id=7, data={"category": "x"})

    row = await _only_row()
    assert row.user_id == user.id
    assert row.kind == "request_accepted"
    assert row.status == NotificationStatus.PENDING
    assert row.attempts == 0
    assert row.next_attempt_at == START
    assert row.created_at == START
    assert row.service_request_id == 7
    assert row.data == {"category": "x"}


async def test_duplicate_key_noop_in_transaction(notify_services) -> None:
    user = await _user()

    async with in_transaction():
        await enqueue(user.id, "request_accepted", dedupe_key="accepted:1", data={"first": True})
        await enqueue(user.id, "request_accepted", dedupe_key="accepted:1", data={"first": False})
        await enqueue(user.id, "request_started", dedupe_key="started:1")

    rows = await Notification.all().order_by("id")
    assert [row.dedupe_key for row in rows] == ["accepted:1", "started:1"]
    assert rows[0].data == {"first": True}


async def test_concurrent_same_key_keeps_transactions(notify_services) -> None:
    user = await _user()
    first_inserted = asyncio.Event()

    async def first() -> None:
        async with in_transaction():
            await enqueue(user.id, "request_accepted", dedupe_key="accepted:race")
            first_inserted.set()
            # Long enough for the second transaction to block on the unique index (PostgreSQL).
            await asyncio.sleep(0.3)
            await ContentFlag.create(target="test.first", target_id=1, verdict="review", created_at=START)

    async def second() -> None:
        await first_inserted.wait()
        async with in_transaction():
            await enqueue(user.id, "request_accepted", dedupe_key="accepted:race")
            await ContentFlag.create(target="test.second", target_id=2, verdict="review", created_at=START)

    await asyncio.wait_for(asyncio.gather(first(), second()), timeout=10)

    assert await Notification.filter(dedupe_key="accepted:race").count() == 1
    # Both transactions committed: the skipped insert did not abort the second one.
    assert sorted(await ContentFlag.all().values_list("target", flat=True)) == ["test.first", "test.second"]


async def test_enqueue_unknown_kind_raises(notify_services) -> None:
    user = await _user()

    with pytest.raises(ValueError, match="unknown notification kind"):
        await enqueue(user.id, "request_teleported", dedupe_key="x:1")

    assert await Notification.all().count() == 0


@pytest.mark.parametrize("dedupe_key", ["", "k" * 97])
async def test_enqueue_bad_dedupe_key_raises(notify_services, dedupe_key: str) -> None:
    user = await _user()

    with pytest.raises(ValueError, match="dedupe_key"):
        await enqueue(user.id, "request_accepted", dedupe_key=dedupe_key)


async def test_enqueue_unknown_user_raises(notify_services) -> None:
    with pytest.raises(IntegrityError):
        await enqueue(999_999, "request_accepted", dedupe_key="accepted:nobody")

    assert await Notification.all().count() == 0
