"""Service requests through their life: create, accept, start, complete, rate, cancel, withdraw."""

from __future__ import annotations

import logging
from datetime import timedelta

from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from backend import clock, content_check, credit, dispatch, notifications, outbox, paging
from backend.catalog import CATEGORIES_BY_CODE, min_rank
from backend.context import Services
from backend.errors import Conflict, Forbidden, NotFound, ValidationError
from backend.geo import haversine_m
from backend.locations import Location
from backend.matching import Candidate
from backend.models import (
    CERTIFICATE_RANKS,
    Agency,
    AgencyStatus,
    DispatchEvent,
    DispatchStage,
    Offer,
    OfferStatus,
    Rating,
    RequestStatus,
    Role,
    ServiceRequest,
    ServiceStation,
    User,
    Worker,
    WorkerStatus,
)
from backend.paging import Page
from backend.scheduling import check_worker_available, parse_preferred_window
from backend.workers import parse_languages, worker_of

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 1000
MAX_ADDRESS_CHARS = 200
MAX_SUMMARY_CHARS = 2000
MAX_COMMENT_CHARS = 500
MAX_SERVICE_MINUTES = 24 * 60

# A worker may check in this long before the resident's preferred start, not earlier.
EARLIEST_START_BEFORE_PREFERRED = timedelta(hours=2)
# Minutes a reported duration may exceed the time since check-in (a phone clock, rounding up).
SERVICE_MINUTES_GRACE = 15

CANCELLABLE = (RequestStatus.MATCHING, RequestStatus.OFFERED, RequestStatus.ACCEPTED)
UNASSIGNED = (RequestStatus.MATCHING, RequestStatus.OFFERED)


class AlreadyTaken(Conflict):
    code = "already_taken"
    message = "这个需求已被其他社工接单。"


class AlreadyWithdrawn(Conflict):
    code = "already_withdrawn"
    message = "这个需求已从您的接单中退回，无需再次退回。"


class AlreadyCompleted(Conflict):
    code = "already_completed"
    message = "这次服务已经提交完成，服务时长和小结不能再次提交或修改。"


def _require_text(value: object, field: str, max_chars: int, label: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"请填写{label}。", field=field)
    value = value.strip()
    if len(value) > max_chars:
        raise ValidationError(f"{label}不能超过 {max_chars} 个字。", field=field)
    return value


async def create_request(
    services: Services,
    resident: User,
    *,
    category: object,
    description: object,
    address: object,
    location: Location,
    preferred_start: object = None,
    preferred_end: object = None,
    language: object = None,
) -> tuple[ServiceRequest, list[Candidate]]:
    if Role.RESIDENT.value not in resident.roles:
        raise Forbidden("请使用微信登录后以居民身份提出需求。", code="not_a_resident")
    if not isinstance(category, str) or category not in CATEGORIES_BY_CODE:
        raise ValidationError("请选择有效的服务类别。", field="category")
    description = _require_text(description, "description", MAX_DESCRIPTION_CHARS, "需求描述")
    address = _require_text(address, "address", MAX_ADDRESS_CHARS, "服务地址")
    window_start, window_end = parse_preferred_window(preferred_start, preferred_end)
    if language is not None:
        try:
            language = parse_languages([language])[0] if isinstance(language, str) else None
        except ValidationError:
            language = None
        if language is None:
            raise ValidationError("服务语言无效，请填写一种语言，例如「闽南语」。", field="language")
    verdict = await content_check.screen(services, resident, description, field="description")

    now = clock.now()
    station = await services.stations.nearest(location)
    request = await ServiceRequest.create(
        resident=resident,
        category=category,
        language=language,
        description=description,
        address=address,
        lat=location.lat,
        lng=location.lng,
        district_id=location.district_code,
        station=station,
        status=RequestStatus.MATCHING,
        preferred_start=window_start,
        preferred_end=window_end,
        created_at=now,
        updated_at=now,
    )
    await content_check.flag(verdict, "service_request.description", request.id, resident.id)
    log.info("service request created request_id=%s category=%s", request.id, category)

    candidates = await dispatch.run_matching(
        services, request.id, loaded=request, resident_may_be_worker=Role.WORKER.value in resident.roles
    )
    if request.status != RequestStatus.OFFERED:
        # Widened, queued at its station, or taken over by the scheduler: read what happened.
        await request.refresh_from_db()
        await request.fetch_related("station")
    return request, candidates


async def load_request_for(user: User, request_id: int, *, worker: Worker | None = None) -> tuple[ServiceRequest, str]:
    """Load a request, with its station, and the caller's relation to it.

    Relations: resident, assigned (worker), offered (worker with an open or past offer),
    station (staff of the request's station, once the request has reached that station's
    queue), officer. Anyone else gets 404, so request ids reveal nothing about other residents.
    A caller that has already read the user's worker profile passes it as `worker`, which saves
    reading it again.
    """
    request = await ServiceRequest.get_or_none(id=request_id).prefetch_related("station", "worker")
    if request is None:
        raise NotFound("找不到该服务需求。")
    if request.resident_id == user.id:
        return request, "resident"
    if Role.OFFICER.value in user.roles:
        return request, "officer"
    if worker is None:
        worker = await Worker.get_or_none(user_id=user.id)
    worker_relation = await _worker_relation(worker, request)
    if worker_relation is not None:
        return request, worker_relation
    if _reached_station_queue_of(user, request):
        return request, "station"
    raise NotFound("找不到该服务需求。")


async def _worker_relation(worker: Worker | None, request: ServiceRequest) -> str | None:
    """Return "assigned" or "offered" when `worker` is assigned or was offered the request, else None."""
    if worker is None:
        return None
    if request.worker_id == worker.id:
        return "assigned"
    if await Offer.exists(service_request_id=request.id, worker_id=worker.id):
        return "offered"
    return None


async def _load_for_worker(user: User, request_id: int) -> tuple[Worker, ServiceRequest, str | None]:
    """Load a request for a worker-side action, with the caller's relation to it as a worker.

    The relation comes from the worker profile alone, so an officer who is also a worker acts
    on their own jobs as that worker and not as an officer.
    """
    worker = await worker_of(user)
    request, relation = await load_request_for(user, request_id, worker=worker)
    if relation not in ("assigned", "offered"):
        # Decided by another role first (the request's resident, an officer): ask as a worker.
        relation = await _worker_relation(worker, request)
    return worker, request, relation


def _reached_station_queue_of(user: User, request: ServiceRequest) -> bool:
    """Tell whether `user` is staff of the station whose queue `request` is in or has been through.

    Station staff handle only what nobody nearby took, so a request still searched in its rings,
    or assigned by an officer before it reached the queue, stays hidden from them. A request
    never leaves the station_queue stage once it is there, so this also covers requests that the
    station assigned and that have since moved on.
    """
    return (
        Role.STATION_STAFF.value in user.roles
        and user.station_id is not None
        and user.station_id == request.station_id
        and request.stage == DispatchStage.STATION_QUEUE
    )


async def _notify_resident(request: ServiceRequest, kind: str) -> None:
    await notifications.enqueue(
        request.resident_id,
        kind,
        dedupe_key=f"{kind}:{request.id}:{clock.now().timestamp():.0f}",
        service_request_id=request.id,
        data={"category": request.category},
    )


async def _lock_worker(worker_id: int) -> None:
    # PostgreSQL: row lock, so one worker's concurrent accepts check availability in turn.
    # SQLite runs one write transaction at a time, and Tortoise skips FOR UPDATE there.
    await Worker.select_for_update().filter(id=worker_id).first()


async def accept_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    worker, request, relation = await _load_for_worker(user, request_id)
    if relation == "assigned":
        return request  # a retried accept from the winner
    offer = await Offer.get_or_none(service_request_id=request.id, worker_id=worker.id)
    if offer is None:
        raise Forbidden("您没有收到这个需求的派单。", code="not_offered")
    # An offer outlives neither the worker's certificate nor the agency's approval.
    agency = await Agency.get(id=worker.agency_id)
    if worker.status != WorkerStatus.VERIFIED or agency.status != AgencyStatus.APPROVED:
        raise Conflict("您的证书或所属机构当前不可接单。", code="worker_not_matchable")
    if offer.status in (OfferStatus.DECLINED, OfferStatus.EXPIRED, OfferStatus.WITHDRAWN):
        raise Conflict("这个派单已失效。", code="offer_expired")

    now = clock.now()
    async with in_transaction():
        await _lock_worker(worker.id)
        await check_worker_available(worker.id, request, services.settings.max_active_jobs)
        # The conditional UPDATE is the lock on the request: of all concurrent accepts exactly
        # one finds it still `offered` with this offer open and changes a row.
        won = await ServiceRequest.filter(id=request.id, status=RequestStatus.OFFERED).update(
            status=RequestStatus.ACCEPTED, worker_id=worker.id, accepted_at=now, updated_at=now
        )
        if won == 1:
            opened = await Offer.filter(id=offer.id, status=OfferStatus.OPEN, expires_at__gt=now).update(
                status=OfferStatus.ACCEPTED
            )
            if opened == 0:
                raise _RollBack()
            await Offer.filter(service_request_id=request.id, status=OfferStatus.OPEN).update(status=OfferStatus.CLOSED)
            await DispatchEvent.create(service_request_id=request.id, kind="accepted", worker_id=worker.id, at=now)
            await _notify_resident(request, "request_accepted")

    if won == 0:
        await request.refresh_from_db()
        if request.worker_id == worker.id:
            return request
        if request.status == RequestStatus.CANCELLED:
            raise Conflict("该需求已被居民取消。", code="request_cancelled")
        raise AlreadyTaken()

    # The UPDATE above set exactly these, so there is nothing to read back.
    request.status = RequestStatus.ACCEPTED
    request.worker_id = worker.id
    request.accepted_at = now
    request.updated_at = now
    log.info("request accepted request_id=%s worker_id=%s", request.id, worker.id)
    return request


class _RollBack(Conflict):
    """The offer expired between the checks and the update: undo the accept."""

    code = "offer_expired"
    message = "这个派单已失效。"


async def decline_offer(services: Services, user: User, request_id: int) -> None:
    """Decline the caller's open offer. Declining an offer that is already declined changes nothing."""
    worker, request, relation = await _load_for_worker(user, request_id)
    if relation is None:
        raise Forbidden("您没有收到这个需求的派单。", code="not_offered")
    now = clock.now()
    # An offer past its expiry that the scheduler has not yet marked expired is not open either.
    declined = await Offer.filter(
        service_request_id=request.id, worker_id=worker.id, status=OfferStatus.OPEN, expires_at__gt=now
    ).update(status=OfferStatus.DECLINED)
    if not declined:
        offer = await Offer.get_or_none(service_request_id=request.id, worker_id=worker.id)
        # A worker who declined and was later assigned by a station has the job, so the decline
        # is rejected and they cannot believe they are free of it.
        if offer is not None and offer.status == OfferStatus.DECLINED and relation != "assigned":
            return
        await request.refresh_from_db()
        raise _no_open_offer(request, worker, offer)

    await DispatchEvent.create(service_request_id=request.id, kind="declined", worker_id=worker.id, at=now)
    log.info("offer declined request_id=%s worker_id=%s", request.id, worker.id)
    await dispatch.advance_if_exhausted(services, request.id)


def _no_open_offer(request: ServiceRequest, worker: Worker, offer: Offer | None) -> Conflict:
    """Build the error for a decline that found no open offer, naming the reason."""
    if request.worker_id == worker.id:
        return Conflict("您已接下这个需求，不能拒绝。如无法前往，请使用「退回」。", code="already_accepted")
    if request.status == RequestStatus.CANCELLED:
        return Conflict("该需求已被居民取消，无需拒绝。", code="request_cancelled")
    if request.worker_id is not None:
        return AlreadyTaken("这个需求已被其他社工接单，无需拒绝。")
    if offer is not None and offer.status in (OfferStatus.OPEN, OfferStatus.EXPIRED):
        return Conflict("这个派单已过期，无需拒绝。", code="offer_expired")
    return Conflict("这个派单已失效，无需拒绝。", code="offer_not_open")


async def withdraw_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    """Give an accepted job back before it starts; it is matched again without this worker."""
    worker, request, relation = await _load_for_worker(user, request_id)
    if relation != "assigned":
        if await _was_withdrawn_from(request.id, worker.id):
            raise AlreadyWithdrawn()
        raise Forbidden("只有接单的社工可以进行此操作。", code="not_assigned_worker")
    now = clock.now()
    async with in_transaction():
        moved = await ServiceRequest.filter(id=request.id, worker_id=worker.id, status=RequestStatus.ACCEPTED).update(
            status=RequestStatus.MATCHING, worker_id=None, accepted_at=None, updated_at=now
        )
        if moved:
            await Offer.filter(service_request_id=request.id, worker_id=worker.id).update(status=OfferStatus.WITHDRAWN)
            await DispatchEvent.create(service_request_id=request.id, kind="withdrawn", worker_id=worker.id, at=now)
    if not moved:
        # A concurrent withdraw by the same worker, or a release by dispatch, got there first.
        if await _was_withdrawn_from(request.id, worker.id):
            raise AlreadyWithdrawn()
        raise Conflict("只有已接单、尚未开始的服务可以退回。", code="invalid_status")
    log.info("job withdrawn request_id=%s worker_id=%s", request.id, worker.id)

    await request.refresh_from_db()
    if request.stage == DispatchStage.RING:
        await dispatch.run_matching(services, request.id)
        await request.refresh_from_db()
    return request


async def _was_withdrawn_from(request_id: int, worker_id: int) -> bool:
    """Tell whether the worker gave the request back or dispatch took it from them."""
    return await Offer.exists(service_request_id=request_id, worker_id=worker_id, status=OfferStatus.WITHDRAWN)


async def _assigned_request(user: User, request_id: int) -> tuple[Worker, ServiceRequest]:
    worker, request, relation = await _load_for_worker(user, request_id)
    if relation != "assigned":
        raise Forbidden("只有接单的社工可以进行此操作。", code="not_assigned_worker")
    return worker, request


async def start_request(services: Services, user: User, request_id: int, *, location: Location) -> ServiceRequest:
    """Start the service on site: the worker's location must be within CHECKIN_RADIUS_M of it."""
    worker, request = await _assigned_request(user, request_id)
    distance_m = haversine_m(location.lat, location.lng, request.lat, request.lng)
    if request.status == RequestStatus.ACCEPTED and distance_m > services.settings.checkin_radius_m:
        raise Conflict(
            f"您距离服务地点约 {round(distance_m)} 米，请到达后（{services.settings.checkin_radius_m} 米内）再开始服务。",
            field="location",
            code="too_far_to_check_in",
        )
    now = clock.now()
    if request.status == RequestStatus.ACCEPTED and request.preferred_start is not None:
        if now < request.preferred_start - EARLIEST_START_BEFORE_PREFERRED:
            raise Conflict("还未到预约的服务时间，请在预约时间前两小时内开始服务。", code="too_early_to_start")
    async with in_transaction():
        moved = await ServiceRequest.filter(id=request.id, worker_id=worker.id, status=RequestStatus.ACCEPTED).update(
            status=RequestStatus.IN_SERVICE, started_at=now, checkin_lat=location.lat, checkin_lng=location.lng,
            updated_at=now,
        )
        if moved:
            await _notify_resident(request, "request_started")
    await request.refresh_from_db()
    if moved == 0 and request.status != RequestStatus.IN_SERVICE:
        raise Conflict("只有已接单的需求可以开始服务。", code="invalid_status")
    log.info("service started request_id=%s worker_id=%s distance_m=%s", request.id, worker.id, round(distance_m))
    return request


async def complete_request(
    services: Services, user: User, request_id: int, *, service_minutes: object, summary: object, location: Location
) -> ServiceRequest:
    if isinstance(service_minutes, bool) or not isinstance(service_minutes, int):
        raise ValidationError("请填写服务时长（分钟，整数）。", field="service_minutes")
    if not 1 <= service_minutes <= MAX_SERVICE_MINUTES:
        raise ValidationError(f"服务时长需在 1 到 {MAX_SERVICE_MINUTES} 分钟之间。", field="service_minutes")
    summary = _require_text(summary, "summary", MAX_SUMMARY_CHARS, "服务小结")

    worker, request = await _assigned_request(user, request_id)
    # A retry that must return the first response sends the same Idempotency-Key. Any other
    # repeat gets 409, not a 200 that would silently drop its duration and summary.
    if request.status == RequestStatus.COMPLETED:
        raise AlreadyCompleted()
    now = clock.now()
    if request.status == RequestStatus.IN_SERVICE and request.started_at is not None:
        # The duration is part of the proof of service: it cannot exceed the time since check-in.
        elapsed_minutes = (now - request.started_at).total_seconds() / 60
        if service_minutes > elapsed_minutes + SERVICE_MINUTES_GRACE:
            raise ValidationError(
                f"服务时长不能超过签到以来的时间（约 {max(1, round(elapsed_minutes))} 分钟）。", field="service_minutes"
            )
    verdict = await content_check.screen(services, user, summary, field="summary")
    async with in_transaction():
        moved = await ServiceRequest.filter(
            id=request.id, worker_id=worker.id, status=RequestStatus.IN_SERVICE
        ).update(
            status=RequestStatus.COMPLETED,
            completed_at=now,
            completion_lat=location.lat,
            completion_lng=location.lng,
            updated_at=now,
            service_minutes=service_minutes,
            summary=summary,
        )
        if moved:
            await _notify_resident(request, "request_completed")
    await request.refresh_from_db()
    if moved == 0:
        if request.status == RequestStatus.COMPLETED:
            raise AlreadyCompleted()
        raise Conflict("只有服务中的需求可以完成。", code="invalid_status")
    await content_check.flag(verdict, "service_request.summary", request.id, user.id)
    log.info("service completed request_id=%s worker_id=%s", request.id, worker.id)
    return request


async def rate_request(services: Services, user: User, request_id: int, *, stars: object, comment: object) -> Rating:
    if isinstance(stars, bool) or not isinstance(stars, int) or not 1 <= stars <= 5:
        raise ValidationError("评分需为 1 到 5 的整数。", field="stars")
    if comment is not None:
        if not isinstance(comment, str):
            raise ValidationError("评价内容需为文字。", field="comment")
        comment = comment.strip() or None
        if comment and len(comment) > MAX_COMMENT_CHARS:
            raise ValidationError(f"评价不能超过 {MAX_COMMENT_CHARS} 个字。", field="comment")

    request, relation = await load_request_for(user, request_id)
    if relation != "resident":
        raise Forbidden("只有提出需求的居民可以评价。", code="not_request_resident")
    if request.status != RequestStatus.COMPLETED:
        raise Conflict("服务完成后才能评价。", code="invalid_status")
    # Proof of service: only a visit checked in on site and closed with a location is rated.
    if request.checkin_lat is None or request.completion_lat is None:
        raise Conflict("这次服务缺少签到记录，无法评价，请联系服务站。", code="service_not_verified")
    verdict = await content_check.screen(services, user, comment, field="comment") if comment else "pass"

    worker = await Worker.get(id=request.worker_id)
    try:
        async with in_transaction():
            # Lock the agency row (PostgreSQL) so concurrent ratings recompute credit in turn.
            agency = await Agency.select_for_update().get(id=worker.agency_id)
            previous = await Rating.filter(resident_id=user.id, worker_id=worker.id, counted=True).first()
            rating = await Rating.create(
                service_request=request,
                worker=worker,
                agency=agency,
                resident=user,
                stars=stars,
                comment=comment,
                created_at=clock.now(),
            )
            if previous is None:
                await Worker.filter(id=worker.id).update(
                    rating_sum=F("rating_sum") + stars, rating_count=F("rating_count") + 1
                )
            else:
                # The resident rated this worker before: the new rating replaces the old one.
                await Rating.filter(id=previous.id).update(counted=False)
                await Worker.filter(id=worker.id).update(rating_sum=F("rating_sum") + (stars - previous.stars))
            old_credit = agency.credit_score
            new_credit = await credit.recompute_credit(
                agency, reason_code="rating", reason=f"服务需求 {request.id} 获得 {stars} 星评价"
            )
            # The index row changes with the database, in the same transaction, so it cannot drift.
            await outbox.record_worker_change(worker.id)
            if new_credit != old_credit:
                await outbox.record_agency_change(agency.id)
    except IntegrityError:
        raise Conflict("您已经评价过这次服务。", code="already_rated") from None

    await content_check.flag(verdict, "rating.comment", rating.id, user.id)
    log.info("request rated request_id=%s stars=%s agency_id=%s", request.id, stars, agency.id)
    # The rated worker now; the agency's other workers at the scheduler's next step.
    await outbox.apply_pending(services, worker_ids=[worker.id])
    return rating


async def cancel_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    request, relation = await load_request_for(user, request_id)
    if relation != "resident":
        raise Forbidden("只有提出需求的居民可以取消。", code="not_request_resident")
    now = clock.now()
    assigned_worker_id = request.worker_id
    async with in_transaction():
        moved = await ServiceRequest.filter(id=request.id, status__in=list(CANCELLABLE)).update(
            status=RequestStatus.CANCELLED, cancelled_at=now, updated_at=now
        )
        if moved:
            await Offer.filter(service_request_id=request.id, status=OfferStatus.OPEN).update(status=OfferStatus.CLOSED)
            await DispatchEvent.create(service_request_id=request.id, kind="cancelled", at=now)
            await request.refresh_from_db()
            if request.worker_id is not None:
                worker_user_id = (await Worker.get(id=request.worker_id)).user_id
                await notifications.enqueue(
                    worker_user_id,
                    "request_cancelled",
                    dedupe_key=f"cancelled:{request.id}",
                    service_request_id=request.id,
                    data={"category": request.category},
                )
    await request.refresh_from_db()
    if moved == 0 and request.status != RequestStatus.CANCELLED:
        raise Conflict("服务已开始或已结束，无法取消。", code="invalid_status")
    log.info("request cancelled request_id=%s assigned_worker_id=%s", request.id, assigned_worker_id)
    return request


async def open_offers(user: User, *, cursor: str | None, limit: int) -> Page[tuple[Offer, ServiceRequest]]:
    """Read a page of the worker's open offers, newest first."""
    worker = await worker_of(user)
    query = Offer.filter(
        worker_id=worker.id,
        status=OfferStatus.OPEN,
        expires_at__gt=clock.now(),
        service_request__status=RequestStatus.OFFERED,
    )
    before_id = paging.parse_id_cursor(cursor)
    if before_id is not None:
        query = query.filter(id__lt=before_id)
    offers = await query.prefetch_related("service_request__station").order_by("-id").limit(limit + 1)
    rows = [(offer, offer.service_request) for offer in offers]
    return paging.page_of(rows, limit, lambda row: str(row[0].id))


def _may_manage_station(user: User, station_id: int | None) -> bool:
    if Role.OFFICER.value in user.roles:
        return True
    return Role.STATION_STAFF.value in user.roles and station_id is not None and user.station_id == station_id


async def station_queue(user: User, station_id: int, *, cursor: str | None, limit: int) -> Page[ServiceRequest]:
    """Read a page of the station's queue, oldest request first.

    The queue is ordered by id, not by created_at, because an id is unique and so a cursor on it
    can neither skip nor repeat a request.
    """
    if not await ServiceStation.exists(id=station_id):
        raise NotFound("找不到该服务站。")
    if not _may_manage_station(user, station_id):
        raise Forbidden("只有本服务站工作人员和民政部门可以查看。")
    query = ServiceRequest.filter(
        station_id=station_id, stage=DispatchStage.STATION_QUEUE, status=RequestStatus.MATCHING
    )
    after_id = paging.parse_id_cursor(cursor)
    if after_id is not None:
        query = query.filter(id__gt=after_id)
    rows = await query.prefetch_related("station").order_by("id").limit(limit + 1)
    return paging.page_of(rows, limit, lambda request: str(request.id))


async def assign_worker(services: Services, user: User, request_id: int, worker_id: object) -> ServiceRequest:
    """Assign a worker directly: officers any unassigned request, station staff only the
    requests in their station's queue."""
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or not 1 <= worker_id <= 2**31 - 1:
        raise ValidationError("请选择要指派的社工。", field="worker_id")
    request = await ServiceRequest.get_or_none(id=request_id)
    if request is None or not _may_manage_station(user, request.station_id):
        raise NotFound("找不到该服务需求。")
    # Staff step in only when nobody nearby took the request, so while its offers are still
    # open they would take it from the workers it was offered to.
    unassigned = {"id": request.id, "status__in": list(UNASSIGNED)}
    if Role.OFFICER.value not in user.roles:
        unassigned["stage"] = DispatchStage.STATION_QUEUE
        if request.stage != DispatchStage.STATION_QUEUE:
            raise Conflict(
                "该需求仍在为附近社工派单，尚未转入本服务站的待派队列，暂不能指派。请在待派队列中选择需求。",
                code="not_in_station_queue",
            )
    worker = await Worker.get_or_none(id=worker_id).prefetch_related("agency")
    if worker is None:
        raise ValidationError("找不到该社工。", field="worker_id", code="worker_not_found")
    if worker.status != WorkerStatus.VERIFIED or worker.agency.status != AgencyStatus.APPROVED:
        raise Conflict("该社工尚未通过审核或所属机构不可接单。", field="worker_id", code="worker_not_matchable")
    if worker.user_id in (request.resident_id, user.id):
        raise Conflict("不能把需求指派给提出需求的居民本人或指派人自己。", field="worker_id", code="worker_conflict_of_interest")
    if request.category not in worker.categories or CERTIFICATE_RANKS[worker.certificate_level.value] < min_rank(
        request.category
    ):
        raise Conflict("该社工不提供此类服务或证书等级不足。", field="worker_id", code="worker_not_qualified")
    # Going off duty declines the worker's open offers, so staff cannot hand them a job either.
    if not worker.on_duty:
        raise Conflict(
            "该社工当前未开启接单，不能指派。请选择正在接单的社工，或请其开启接单后再指派。",
            field="worker_id",
            code="worker_off_duty",
        )

    now = clock.now()
    async with in_transaction():
        await _lock_worker(worker.id)
        await check_worker_available(worker.id, request, services.settings.max_active_jobs)
        moved = await ServiceRequest.filter(**unassigned).update(
            status=RequestStatus.ACCEPTED, worker_id=worker.id, accepted_at=now, updated_at=now
        )
        if moved:
            await Offer.filter(service_request_id=request.id, status=OfferStatus.OPEN).update(status=OfferStatus.CLOSED)
            # An accepted offer records the assignment like an accept, so a withdrawal marks it
            # withdrawn: the worker is left out of the next search and a repeated withdraw is 409.
            distance_m = round(haversine_m(worker.lat, worker.lng, request.lat, request.lng))
            assignment = Offer(
                service_request_id=request.id, worker_id=worker.id, status=OfferStatus.ACCEPTED,
                ring=request.search_ring, distance_m=distance_m, score=0.0, created_at=now, expires_at=now,
            )
            await Offer.bulk_create(
                [assignment], on_conflict=["service_request_id", "worker_id"],
                update_fields=["status", "created_at", "expires_at"],
            )
            await DispatchEvent.create(service_request_id=request.id, kind="assigned", worker_id=worker.id, at=now)
            await notifications.enqueue(
                worker.user_id,
                "offer_new",
                dedupe_key=f"assigned:{request.id}:{worker.id}:{now.timestamp():.0f}",
                service_request_id=request.id,
                data={"category": request.category, "assigned": True},
            )
            await _notify_resident(request, "request_accepted")
    if not moved:
        raise Conflict("该需求已有社工接单或已结束。", code="invalid_status")
    log.info("worker assigned request_id=%s worker_id=%s by_user_id=%s", request.id, worker.id, user.id)
    await request.refresh_from_db()
    return request
