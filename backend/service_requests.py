"""Service requests: creation with matching, accept, start, complete, rating and cancellation."""

from __future__ import annotations

import logging
from datetime import timedelta

from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from backend import clock, credit
from backend.catalog import CATEGORIES_BY_CODE, min_rank
from backend.context import Services
from backend.errors import Conflict, Forbidden, NotFound, ValidationError
from backend.geo import haversine_m
from backend.locations import Location
from backend.matching import Candidate, find_candidates
from backend.models import (
    Agency,
    Offer,
    OfferStatus,
    Rating,
    RequestStatus,
    Role,
    ServiceRequest,
    ServiceStation,
    User,
    Worker,
)
from backend.workers import sync_agency_workers, sync_worker, worker_of
from search.base import IndexUnavailable

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 1000
MAX_ADDRESS_CHARS = 200
MAX_SUMMARY_CHARS = 2000
MAX_COMMENT_CHARS = 500
MAX_SERVICE_MINUTES = 24 * 60

CANCELLABLE = (RequestStatus.MATCHING, RequestStatus.OFFERED, RequestStatus.ACCEPTED)


class AlreadyTaken(Conflict):
    code = "already_taken"
    message = "这个需求已被其他社工接单。"


def _require_text(value: object, field: str, max_chars: int, label: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"请填写{label}。", field=field)
    value = value.strip()
    if len(value) > max_chars:
        raise ValidationError(f"{label}不能超过 {max_chars} 个字。", field=field)
    return value


async def _nearest_station(location: Location) -> ServiceStation | None:
    stations = await ServiceStation.filter(district_id=location.district_code)
    if not stations:
        return None
    return min(stations, key=lambda s: haversine_m(location.lat, location.lng, s.lat, s.lng))


async def create_request(
    services: Services,
    resident: User,
    *,
    category: object,
    description: object,
    address: object,
    location: Location,
) -> tuple[ServiceRequest, list[Candidate]]:
    if not isinstance(category, str) or category not in CATEGORIES_BY_CODE:
        raise ValidationError("请选择有效的服务类别。", field="category")
    description = _require_text(description, "description", MAX_DESCRIPTION_CHARS, "需求描述")
    address = _require_text(address, "address", MAX_ADDRESS_CHARS, "服务地址")

    now = clock.now()
    station = await _nearest_station(location)
    request = await ServiceRequest.create(
        resident=resident,
        category=category,
        description=description,
        address=address,
        lat=location.lat,
        lng=location.lng,
        district_id=location.district_code,
        station=station,
        status=RequestStatus.MATCHING,
        created_at=now,
        updated_at=now,
    )
    log.info("service request created request_id=%s category=%s", request.id, category)

    candidates = await match_request(services, request)
    return request, candidates


async def match_request(services: Services, request: ServiceRequest) -> list[Candidate]:
    """Find candidates and send them offers; leaves the request in `matching` when none answer."""
    settings = services.settings
    # A worker who asks for help as a resident is never offered their own request.
    own_worker_ids = frozenset(await Worker.filter(user_id=request.resident_id).values_list("id", flat=True))
    try:
        candidates = await find_candidates(
            services.index,
            lat=request.lat,
            lng=request.lng,
            category=request.category,
            min_certificate_rank=min_rank(request.category),
            radius_m=settings.search_radius_m,
            count=settings.offer_count,
            exclude_worker_ids=own_worker_ids,
        )
    except IndexUnavailable:
        # The request stays stored in `matching`; it is not lost, only not yet offered.
        log.error("matching postponed, index unavailable request_id=%s", request.id)
        return []
    if not candidates:
        log.info("no candidates request_id=%s", request.id)
        return []

    now = clock.now()
    async with in_transaction():
        moved = await ServiceRequest.filter(id=request.id, status=RequestStatus.MATCHING).update(
            status=RequestStatus.OFFERED, updated_at=now
        )
        if moved == 0:
            return []  # cancelled meanwhile
        await Offer.bulk_create(
            [
                Offer(
                    service_request_id=request.id,
                    worker_id=candidate.hit.document.worker_id,
                    distance_m=round(candidate.hit.distance_m),
                    score=round(candidate.score, 4),
                    ring=request.search_ring,
                    created_at=now,
                    expires_at=now + timedelta(seconds=settings.offer_ttl_s),
                )
                for candidate in candidates
            ]
        )
    request.status = RequestStatus.OFFERED
    log.info("offers sent request_id=%s workers=%s", request.id, len(candidates))
    return candidates


async def load_request_for(user: User, request_id: int) -> tuple[ServiceRequest, str]:
    """Load a request with the caller's relation to it: resident, assigned, offered or officer.

    Anyone else gets 404, so request ids reveal nothing about other residents.
    """
    request = await ServiceRequest.get_or_none(id=request_id).prefetch_related("station", "worker")
    if request is None:
        raise NotFound("找不到该服务需求。")
    if request.resident_id == user.id:
        return request, "resident"
    if Role.OFFICER.value in user.roles:
        return request, "officer"
    worker = await Worker.get_or_none(user_id=user.id)
    if worker is not None:
        if request.worker_id == worker.id:
            return request, "assigned"
        if await Offer.exists(service_request_id=request.id, worker_id=worker.id):
            return request, "offered"
    raise NotFound("找不到该服务需求。")


async def accept_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    worker = await worker_of(user)
    request, relation = await load_request_for(user, request_id)
    if relation == "assigned":
        return request  # a retried accept from the winner
    offer = await Offer.get_or_none(service_request_id=request.id, worker_id=worker.id)
    if offer is None:
        raise Forbidden("您没有收到这个需求的派单。", code="not_offered")

    now = clock.now()
    async with in_transaction():
        # The conditional UPDATE is the lock: of all concurrent accepts exactly one finds the
        # request still `offered` and changes a row; select_for_update is a no-op on SQLite.
        won = await ServiceRequest.filter(id=request.id, status=RequestStatus.OFFERED).update(
            status=RequestStatus.ACCEPTED, worker_id=worker.id, accepted_at=now, updated_at=now
        )
        if won == 1:
            await Offer.filter(id=offer.id).update(status=OfferStatus.ACCEPTED)
            await Offer.filter(service_request_id=request.id).exclude(id=offer.id).update(status=OfferStatus.CLOSED)

    if won == 0:
        await request.refresh_from_db()
        if request.worker_id == worker.id:
            return request
        if request.status == RequestStatus.CANCELLED:
            raise Conflict("该需求已被居民取消。", code="request_cancelled")
        raise AlreadyTaken()

    await request.refresh_from_db()
    log.info("request accepted request_id=%s worker_id=%s", request.id, worker.id)
    return request


async def _assigned_request(user: User, request_id: int) -> tuple[Worker, ServiceRequest]:
    worker = await worker_of(user)
    request, relation = await load_request_for(user, request_id)
    if relation != "assigned":
        raise Forbidden("只有接单的社工可以进行此操作。", code="not_assigned_worker")
    return worker, request


async def start_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    worker, request = await _assigned_request(user, request_id)
    now = clock.now()
    moved = await ServiceRequest.filter(id=request.id, worker_id=worker.id, status=RequestStatus.ACCEPTED).update(
        status=RequestStatus.IN_SERVICE, started_at=now, updated_at=now
    )
    await request.refresh_from_db()
    if moved == 0 and request.status != RequestStatus.IN_SERVICE:
        raise Conflict("只有已接单的需求可以开始服务。", code="invalid_status")
    log.info("service started request_id=%s worker_id=%s", request.id, worker.id)
    return request


async def complete_request(
    services: Services, user: User, request_id: int, *, service_minutes: object, summary: object
) -> ServiceRequest:
    if isinstance(service_minutes, bool) or not isinstance(service_minutes, int):
        raise ValidationError("请填写服务时长（分钟，整数）。", field="service_minutes")
    if not 1 <= service_minutes <= MAX_SERVICE_MINUTES:
        raise ValidationError(f"服务时长需在 1 到 {MAX_SERVICE_MINUTES} 分钟之间。", field="service_minutes")
    summary = _require_text(summary, "summary", MAX_SUMMARY_CHARS, "服务小结")

    worker, request = await _assigned_request(user, request_id)
    now = clock.now()
    moved = await ServiceRequest.filter(id=request.id, worker_id=worker.id, status=RequestStatus.IN_SERVICE).update(
        status=RequestStatus.COMPLETED,
        completed_at=now,
        updated_at=now,
        service_minutes=service_minutes,
        summary=summary,
    )
    await request.refresh_from_db()
    if moved == 0 and request.status != RequestStatus.COMPLETED:
        raise Conflict("只有服务中的需求可以完成。", code="invalid_status")
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

    worker = await Worker.get(id=request.worker_id)
    try:
        async with in_transaction():
            # Lock the agency row (PostgreSQL) so concurrent ratings recompute credit in turn.
            agency = await Agency.select_for_update().get(id=worker.agency_id)
            rating = await Rating.create(
                service_request=request,
                worker=worker,
                agency=agency,
                stars=stars,
                comment=comment,
                created_at=clock.now(),
            )
            await Worker.filter(id=worker.id).update(
                rating_sum=F("rating_sum") + stars, rating_count=F("rating_count") + 1
            )
            old_credit = agency.credit_score
            new_credit = await credit.recompute_credit(agency, reason=f"rating of service request {request.id}")
    except IntegrityError:
        raise Conflict("您已经评价过这次服务。", code="already_rated") from None

    log.info("request rated request_id=%s stars=%s agency_id=%s", request.id, stars, agency.id)
    await sync_worker(services.index, worker.id)
    if new_credit != old_credit:
        await sync_agency_workers(services.index, agency.id)
    return rating


async def cancel_request(services: Services, user: User, request_id: int) -> ServiceRequest:
    request, relation = await load_request_for(user, request_id)
    if relation != "resident":
        raise Forbidden("只有提出需求的居民可以取消。", code="not_request_resident")
    now = clock.now()
    async with in_transaction():
        moved = await ServiceRequest.filter(id=request.id, status__in=list(CANCELLABLE)).update(
            status=RequestStatus.CANCELLED, cancelled_at=now, updated_at=now
        )
        if moved:
            await Offer.filter(service_request_id=request.id, status=OfferStatus.OPEN).update(status=OfferStatus.CLOSED)
    await request.refresh_from_db()
    if moved == 0 and request.status != RequestStatus.CANCELLED:
        raise Conflict("服务已开始或已结束，无法取消。", code="invalid_status")
    log.info("request cancelled request_id=%s", request.id)
    return request


async def open_offers(user: User) -> list[tuple[Offer, ServiceRequest]]:
    worker = await worker_of(user)
    offers = (
        await Offer.filter(worker_id=worker.id, status=OfferStatus.OPEN, service_request__status=RequestStatus.OFFERED)
        .prefetch_related("service_request__station")
        .order_by("-id")
        .limit(50)
    )
    return [(offer, offer.service_request) for offer in offers]
