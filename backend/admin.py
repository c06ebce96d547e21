"""Civil-affairs officers' tasks: reviewing workers and agencies, and creating staff accounts."""

from __future__ import annotations

import logging

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from backend import accounts, clock, dispatch, outbox, paging, workers
from backend.context import Services
from backend.errors import Conflict, NotFound, ValidationError
from backend.models import Agency, AgencyStatus, CreditEvent, Role, ServiceStation, User, Worker, WorkerStatus
from backend.paging import Page

log = logging.getLogger(__name__)

MIN_STAFF_PASSWORD_CHARS = 12
MAX_REASON_CHARS = 200
AGENCY_STATUS_NAMES = {"pending": "待审核", "approved": "已通过", "suspended": "已暂停"}


async def list_workers(status: str | None, *, cursor: str | None, limit: int) -> Page[Worker]:
    """Read a page of workers, oldest first, so reviewers work through registrations in the order they came."""
    query = Worker.all().order_by("id")
    if status is not None:
        if status not in {s.value for s in WorkerStatus}:
            raise ValidationError("状态只能是 pending、verified 或 rejected。", field="status")
        query = query.filter(status=status)
    after_id = paging.parse_id_cursor(cursor)
    if after_id is not None:
        query = query.filter(id__gt=after_id)
    rows = await query.limit(limit + 1)
    return paging.page_of(rows, limit, lambda worker: str(worker.id))


async def reject_worker(services: Services, officer: User, worker_id: int, reason: object) -> Worker:
    """Reject a pending worker, or revoke a verified one, with a reason the worker sees.

    Raises 409 worker_already_rejected for a rejected worker, so the first reason stays, and
    403 self_review for the officer's own profile. Offers and accepted requests are released.
    """
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise ValidationError(f"请填写不超过 {MAX_REASON_CHARS} 字的驳回原因。", field="reason")
    worker = await workers.worker_for_review(worker_id, officer)
    previous_status = worker.status.value

    # Conditional on the status, so a concurrent review or resubmission is not overwritten.
    async with in_transaction():
        rejected = await Worker.filter(id=worker.id, status__in=workers.REJECTABLE_STATUSES).update(
            status=WorkerStatus.REJECTED, rejection_reason=reason.strip(), on_duty=False, verified_at=None
        )
        if rejected:
            await outbox.record_worker_change(worker.id)
    if not rejected:
        raise await workers.review_conflict(worker.id)

    await outbox.apply_pending(services, worker_ids=[worker.id])
    await dispatch.release_worker(services, worker.id, reason="rejected", release_accepted=True)
    await worker.refresh_from_db()
    log.info("worker rejected worker_id=%s previous_status=%s by_user_id=%s", worker.id, previous_status, officer.id)
    return worker


async def set_agency_status(services: Services, officer: User, agency_id: int, status: object) -> Agency:
    # A JSON list or object is unhashable, so only a string may be looked up.
    if not isinstance(status, str) or status not in AGENCY_STATUS_NAMES:
        raise ValidationError("状态只能是 pending、approved 或 suspended。", field="status")
    agency = await Agency.get_or_none(id=agency_id)
    if agency is None:
        raise NotFound("找不到该服务机构。")
    if agency.status.value != status:
        agency.status = AgencyStatus(status)
        async with in_transaction():
            await agency.save(update_fields=["status"])
            await CreditEvent.create(
                agency=agency,
                score=agency.credit_score,
                reason_code=f"status_{status}",
                reason=f"民政部门将机构状态改为「{AGENCY_STATUS_NAMES[status]}」",
                components={},
                at=clock.now(),
            )
            await outbox.record_agency_change(agency.id)
        await outbox.apply_pending(services)
        if agency.status != AgencyStatus.APPROVED:
            for worker_id in await Worker.filter(agency_id=agency.id).values_list("id", flat=True):
                await dispatch.release_worker(services, worker_id, reason=f"agency_{status}", release_accepted=True)
        log.info("agency status changed agency_id=%s status=%s by_user_id=%s", agency.id, status, officer.id)
    return agency


async def _create_staff(username: object, password: object, role: Role, **links) -> User:
    username = accounts.parse_new_username(username)
    password = accounts.check_new_password(password, min_chars=MIN_STAFF_PASSWORD_CHARS)
    # Logins match usernames without case, so one that differs from another only in case is taken.
    if await accounts.username_taken(username):
        raise Conflict("该用户名已被使用。", field="username", code="username_taken")
    password_hash = await accounts.hash_password(password)
    try:
        return await User.create(username=username, password_hash=password_hash, roles=[role.value], **links)
    except IntegrityError:
        raise Conflict("该用户名已被使用。", field="username", code="username_taken") from None


async def create_agency_manager(officer: User, agency_id: int, username: object, password: object) -> User:
    if not await Agency.exists(id=agency_id):
        raise NotFound("找不到该服务机构。")
    user = await _create_staff(username, password, Role.AGENCY_MANAGER, agency_id=agency_id)
    log.info("agency manager created user_id=%s agency_id=%s by_user_id=%s", user.id, agency_id, officer.id)
    return user


async def create_station_staff(officer: User, station_id: int, username: object, password: object) -> User:
    if not await ServiceStation.exists(id=station_id):
        raise NotFound("找不到该服务站。")
    user = await _create_staff(username, password, Role.STATION_STAFF, station_id=station_id)
    log.info("station staff created user_id=%s station_id=%s by_user_id=%s", user.id, station_id, officer.id)
    return user
