"""WeChat subscribe messages: queued with the state change they announce, sent later.

enqueue() writes a pending Notification row inside the caller's transaction, and
deliver_due() sends due rows off the request path. A WeChat failure therefore never blocks
or rolls back the state change. It only leaves the row pending, undeliverable or failed.

Every template configured for these messages must have these keywords (WeChat checks each
value against its type, for example at most 20 characters for a thing):

    thing1  服务类别   the service category's name
    phrase2 状态       the kind's status phrase, such as 已接单
    time3   时间       when the change happened, in Asia/Shanghai
    thing4  温馨提示   a fixed hint per kind; for offer_new it may give the distance

Only the category code, distance_m and the assigned flag of a row's data reach WeChat,
and the message text is built from fixed phrases, so descriptions, addresses and phone
numbers never leave the server in a subscribe message.

A row is marked undeliverable, with last_errcode set for WeChat's 43101 and None otherwise,
when the user has not subscribed to the template (43101), when the user has no openid
(accounts that log in with a password), or when the kind's template id is not configured.
The row is kept so an audit shows what would have been sent.

Delivery is at least once: when a send times out, WeChat may still deliver it, and the
retry sends it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from backend import clock
from backend.catalog import CATEGORIES_BY_CODE
from backend.models import Notification, NotificationStatus, User
from backend.wechat import (
    WeChatSendRejected,
    WeChatSendRetryable,
    WeChatUserNotSubscribed,
    mask_openid,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
# Retry delays double from the base: 30, 60, 120 and 240 s after attempts 1 to 4.
RETRY_BASE_DELAY_S = 30
RETRY_MAX_DELAY_S = 3600
# A claimed row is not due again for this long. It must exceed the gateway's overall deadline
# of one send, wechat_timeout_s + 1 s, which is at most 61 s because WECHAT_TIMEOUT_S <= 60.
CLAIM_LEASE_S = 120
DEDUPE_KEY_MAX_CHARS = 96  # Notification.dedupe_key's column length
THING_MAX_CHARS = 20  # WeChat's limit for a thing value
DEFAULT_CATEGORY_NAME = "社会工作服务"
METRES_PER_KM = 1000
SHOWN_STEP_M = 100  # distances below 1 km are shown to the nearest 100 m


@dataclass(frozen=True)
class _Kind:
    template_setting: str  # the Settings attribute that contains the template id
    status_phrase: str  # phrase2: at most 5 Chinese characters
    hint: str  # thing4: at most THING_MAX_CHARS characters


KINDS: dict[str, _Kind] = {
    # To a worker.
    "offer_new": _Kind("template_offer", "新邀约", "有新的求助，请尽快接单或婉拒"),
    # To the resident.
    "request_accepted": _Kind("template_request_status", "已接单", "社工已接单，可在小程序查看进度"),
    "request_started": _Kind("template_request_status", "服务中", "社工已签到并开始服务"),
    "request_completed": _Kind("template_request_status", "已完成", "服务已完成，欢迎评价"),
    "request_station_queued": _Kind("template_request_status", "排队中", "附近暂无社工，已转服务站安排"),
    # To the assigned worker.
    "request_cancelled": _Kind("template_request_cancelled", "已取消", "居民已取消该服务需求"),
}
# offer_new with data["assigned"]: a station assigned the request to the worker directly.
ASSIGNED_PHRASE = "新指派"
ASSIGNED_HINT = "服务站已将该需求指派给您"


@dataclass(frozen=True)
class Outgoing:
    """A subscribe message to queue for a user."""

    user_id: int
    kind: str
    dedupe_key: str
    service_request_id: int | None = None
    data: dict | None = None


def check_message(kind: str, dedupe_key: str) -> None:
    """Raise ValueError for an unknown kind or a dedupe_key that is empty or longer than DEDUPE_KEY_MAX_CHARS."""
    if kind not in KINDS:
        raise ValueError(f"unknown notification kind {kind!r}, expected one of {sorted(KINDS)}")
    if not dedupe_key or len(dedupe_key) > DEDUPE_KEY_MAX_CHARS:
        raise ValueError(f"dedupe_key must have 1 to {DEDUPE_KEY_MAX_CHARS} characters, got {dedupe_key!r}")


async def enqueue(
    user_id: int,
    kind: str,
    *,
    dedupe_key: str,
    service_request_id: int | None = None,
    data: dict | None = None,
) -> None:
    """Queue one subscribe message for user_id, due now; see enqueue_many."""
    await enqueue_many([Outgoing(user_id, kind, dedupe_key, service_request_id, data)])


async def enqueue_many(messages: list[Outgoing]) -> None:
    """Queue subscribe messages, due now, in one INSERT. A dedupe_key already queued is skipped.

    Call it inside the transaction of the state change the messages announce, so both commit
    or neither does. Raises ValueError for an unknown kind or a dedupe_key that is empty or
    longer than DEDUPE_KEY_MAX_CHARS, and IntegrityError for an unknown user.
    """
    for message in messages:
        check_message(message.kind, message.dedupe_key)
    if not messages:
        return

    now = clock.now()
    rows = [
        Notification(
            user_id=message.user_id,
            kind=message.kind,
            service_request_id=message.service_request_id,
            data=message.data or {},
            status=NotificationStatus.PENDING,
            next_attempt_at=now,
            dedupe_key=message.dedupe_key,
            created_at=now,
        )
        for message in messages
    ]
    # ON CONFLICT DO NOTHING (INSERT OR IGNORE on SQLite) skips a row whose dedupe_key is
    # taken, also when a concurrent transaction took it first, and unlike a failed insert it
    # leaves the caller's PostgreSQL transaction usable. It skips only unique-key conflicts:
    # a foreign key that points nowhere still raises.
    await Notification.bulk_create(rows, ignore_conflicts=True)


async def deliver_due(services, limit: int = 100) -> int:
    """Send up to `limit` due notifications and return how many WeChat accepted.

    Each row is claimed with a conditional UPDATE before it is sent, so two processes never
    send the same row at once. A WeChat failure never raises: the row is rescheduled, or
    marked undeliverable or failed, and the failure is logged.
    """
    now = clock.now()
    due = (
        await Notification.filter(status=NotificationStatus.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at", "id")
        .limit(limit)
    )

    sent = 0
    for row in due:
        if row.attempts >= MAX_ATTEMPTS:
            # Claimed MAX_ATTEMPTS times without a result, for example by processes that stopped mid-send.
            await _give_up(row)
            continue
        if not await _claim(row, now):
            continue
        if await _deliver(services, row):
            sent += 1
    return sent


def build_message_data(kind: str, data: dict, created_at: datetime) -> dict[str, dict[str, str]]:
    """Build the subscribe-message data of a notification, in the keyword layout of the module docstring."""
    spec = KINDS[kind]
    category = CATEGORIES_BY_CODE.get(data.get("category"))
    phrase = spec.status_phrase
    hint = spec.hint
    if kind == "offer_new":
        if data.get("assigned"):
            phrase, hint = ASSIGNED_PHRASE, ASSIGNED_HINT
        elif _is_distance(data.get("distance_m")):
            hint = f"距您{_format_distance(data['distance_m'])}，请尽快回应"

    return {
        "thing1": {"value": _clip(category.name if category else DEFAULT_CATEGORY_NAME)},
        "phrase2": {"value": phrase},
        "time3": {"value": _format_time(created_at)},
        "thing4": {"value": _clip(hint)},
    }


async def _claim(row: Notification, now: datetime) -> bool:
    """Count the attempt and lease the row; False when another process changed it since it was read."""
    attempts = row.attempts + 1
    lease_until = now + timedelta(seconds=CLAIM_LEASE_S)
    # The WHERE clause repeats the values read, so of two processes that read the row at the
    # same time only the first UPDATE matches it.
    changed = await Notification.filter(
        id=row.id,
        status=NotificationStatus.PENDING,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
    ).update(attempts=attempts, next_attempt_at=lease_until)
    if changed == 0:
        return False
    row.attempts = attempts
    row.next_attempt_at = lease_until
    return True


async def _deliver(services, row: Notification) -> bool:
    """Send one claimed row and record the outcome; True when WeChat accepted it."""
    template_id = getattr(services.settings, KINDS[row.kind].template_setting) if row.kind in KINDS else ""
    if not template_id:
        log.info("notification undeliverable: no template id configured notification_id=%s kind=%s", row.id, row.kind)
        await _finish(row, NotificationStatus.UNDELIVERABLE, errcode=None)
        return False

    user = await User.get_or_none(id=row.user_id)
    openid = user.openid if user is not None else None
    if not openid:
        log.info(
            "notification undeliverable: user has no openid notification_id=%s kind=%s user_id=%s",
            row.id,
            row.kind,
            row.user_id,
        )
        await _finish(row, NotificationStatus.UNDELIVERABLE, errcode=None)
        return False

    message = build_message_data(row.kind, row.data or {}, row.created_at)
    try:
        await services.wechat.send_subscribe_message(openid, template_id, message, page=None)
    except WeChatUserNotSubscribed as error:
        log.info(
            "notification undeliverable: user not subscribed notification_id=%s kind=%s errcode=%s openid=%s",
            row.id,
            row.kind,
            error.errcode,
            mask_openid(openid),
        )
        await _finish(row, NotificationStatus.UNDELIVERABLE, errcode=error.errcode)
        return False
    except WeChatSendRetryable as error:
        await _retry_later(row, error.errcode, openid)
        return False
    except WeChatSendRejected as error:
        log.warning(
            "notification failed: WeChat rejected it notification_id=%s kind=%s errcode=%s openid=%s",
            row.id,
            row.kind,
            error.errcode,
            mask_openid(openid),
        )
        await _finish(row, NotificationStatus.FAILED, errcode=error.errcode)
        return False

    await _finish(row, NotificationStatus.SENT, errcode=None, sent_at=clock.now())
    log.info("notification sent notification_id=%s kind=%s attempts=%s", row.id, row.kind, row.attempts)
    return True


async def _retry_later(row: Notification, errcode: int | None, openid: str) -> None:
    if row.attempts >= MAX_ATTEMPTS:
        log.warning(
            "notification failed after %s attempts notification_id=%s kind=%s errcode=%s openid=%s",
            row.attempts,
            row.id,
            row.kind,
            errcode,
            mask_openid(openid),
        )
        await _finish(row, NotificationStatus.FAILED, errcode=errcode)
        return

    delay_s = min(RETRY_BASE_DELAY_S * 2 ** (row.attempts - 1), RETRY_MAX_DELAY_S)
    retry_at = clock.now() + timedelta(seconds=delay_s)
    log.warning(
        "notification send failed, retrying in %s s notification_id=%s kind=%s errcode=%s attempts=%s openid=%s",
        delay_s,
        row.id,
        row.kind,
        errcode,
        row.attempts,
        mask_openid(openid),
    )
    await _finish(row, NotificationStatus.PENDING, errcode=errcode, next_attempt_at=retry_at)


async def _give_up(row: Notification) -> None:
    changed = await Notification.filter(
        id=row.id, status=NotificationStatus.PENDING, attempts=row.attempts, next_attempt_at=row.next_attempt_at
    ).update(status=NotificationStatus.FAILED)
    if changed:
        log.warning(
            "notification failed: claimed %s times without a result notification_id=%s kind=%s",
            row.attempts,
            row.id,
            row.kind,
        )


async def _finish(row: Notification, status: NotificationStatus, *, errcode: int | None, **fields) -> None:
    """Store the outcome of a claimed row, unless its lease ran out and another process claimed it."""
    changed = await Notification.filter(
        id=row.id, status=NotificationStatus.PENDING, attempts=row.attempts, next_attempt_at=row.next_attempt_at
    ).update(status=status, last_errcode=errcode, **fields)
    if changed == 0:
        log.warning(
            "notification outcome not stored, its lease ran out notification_id=%s kind=%s status=%s",
            row.id,
            row.kind,
            status.value,
        )


def _is_distance(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _format_distance(metres: float) -> str:
    # Rounded like the offer list in the API (to 100 m), so the message tells an offered worker
    # no more about where the resident is than the list does.
    if metres < METRES_PER_KM:
        return f"约{max(SHOWN_STEP_M, round(metres / SHOWN_STEP_M) * SHOWN_STEP_M)}米"
    return f"约{metres / METRES_PER_KM:.1f}公里"


def _format_time(moment: datetime) -> str:
    """Render a time as WeChat's time values show it, such as "2025年3月8日 09:30", in Asia/Shanghai."""
    local = moment.astimezone(clock.LOCAL_TZ)
    return f"{local.year}年{local.month}月{local.day}日 {local:%H:%M}"


def _clip(text: str) -> str:
    return text if len(text) <= THING_MAX_CHARS else text[: THING_MAX_CHARS - 1] + "…"
