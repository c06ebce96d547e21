"""Dispatch of an unassigned request: offers that expire, rings that widen, the station queue.

Every transition is a conditional UPDATE guarded by the state it leaves (status, stage and
ring). When two processes run the same step at once, exactly one of them changes a row
and goes on, and the other updates zero rows and stops. A crash between a transition and the offers
that follow it leaves the request in `matching`, where the scheduler's retry picks it up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from tortoise import connections
from tortoise.expressions import Subquery
from tortoise.transactions import in_transaction

from backend import clock, notifications
from backend.catalog import min_rank
from backend.context import Services
from backend.matching import Candidate, find_candidates
from backend.models import (
    DispatchEvent,
    DispatchStage,
    NotificationStatus,
    Offer,
    OfferStatus,
    RequestStatus,
    ServiceRequest,
    Worker,
)
from search.base import IndexUnavailable

log = logging.getLogger(__name__)

# A request left in `matching` this long (index down, or a crash after a transition) is
# matched again by the scheduler.
STALLED_AFTER_S = 10
# Requests moved on to their next ring per scheduler step; the rest wait for the next step.
ADVANCE_BATCH = 50
# Offers that end without a winner: their workers are not searched again for this request.
_SPENT_OFFER_STATUSES = (OfferStatus.DECLINED, OfferStatus.EXPIRED, OfferStatus.WITHDRAWN)
OFFER_NOTIFICATION_KIND = "offer_new"
OFFERS_SENT_EVENT = "offers_sent"


async def _record_event(request_id: int, kind: str, *, ring: int | None = None, worker_id: int | None = None,
                        dedupe_key: str | None = None) -> None:
    await DispatchEvent.create(
        service_request_id=request_id, kind=kind, ring=ring, worker_id=worker_id, dedupe_key=dedupe_key,
        at=clock.now(),
    )


async def _excluded_workers(request: ServiceRequest, resident_may_be_worker: bool) -> frozenset[int]:
    spent = await Offer.filter(service_request_id=request.id, status__in=list(_SPENT_OFFER_STATUSES)).values_list(
        "worker_id", flat=True
    )
    # A worker who requests help as a resident is never offered their own request.
    own = []
    if resident_may_be_worker:
        own = await Worker.filter(user_id=request.resident_id).values_list("id", flat=True)
    return frozenset(spent) | frozenset(own)


@dataclass(frozen=True)
class _OfferRow:
    """One offer of a round and the notification that announces it."""

    worker_id: int
    distance_m: int
    score: float
    dedupe_key: str
    notification_data: dict


# PostgreSQL: the whole of _write_offers_orm in one statement, so one round trip in place of
# seven. Data-modifying CTEs all run or none do, and every insert reads from `moved`, so no
# offer is written unless the guarded UPDATE changed the request.
_WRITE_OFFERS_SQL = """
WITH moved AS (
    UPDATE service_requests SET status = $1, updated_at = $2
    WHERE id = $3 AND status = $4 AND stage = $5 AND search_ring = $6
    RETURNING id
), candidate AS (
    SELECT * FROM unnest($7::int[], $8::int[], $9::float8[], $10::text[], $11::text[])
        AS c(worker_id, distance_m, score, dedupe_key, data)
), offered AS (
    INSERT INTO offers (service_request_id, worker_id, status, ring, distance_m, score, created_at, expires_at)
    SELECT moved.id, c.worker_id, $12, $6, c.distance_m, c.score, $2, $13 FROM moved CROSS JOIN candidate c
    ON CONFLICT (service_request_id, worker_id) DO UPDATE SET
        status = EXCLUDED.status, ring = EXCLUDED.ring, distance_m = EXCLUDED.distance_m,
        score = EXCLUDED.score, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
), notified AS (
    INSERT INTO notifications (user_id, kind, service_request_id, data, status, attempts, next_attempt_at,
                               dedupe_key, created_at)
    SELECT w.user_id, $14, moved.id, c.data::jsonb, $15, 0, $2, c.dedupe_key, $2
    FROM moved CROSS JOIN candidate c JOIN workers w ON w.id = c.worker_id
    ON CONFLICT (dedupe_key) DO NOTHING
), recorded AS (
    INSERT INTO dispatch_events (service_request_id, kind, ring, at)
    SELECT moved.id, $16, $6, $2 FROM moved
)
SELECT count(*) AS moved FROM moved
"""


def _offer_rows(request: ServiceRequest, candidates: list[Candidate], now: datetime) -> list[_OfferRow]:
    rows = []
    for candidate in candidates:
        worker_id = candidate.hit.document.worker_id
        distance_m = round(candidate.hit.distance_m)
        dedupe_key = f"offer:{request.id}:{worker_id}:{now.timestamp():.0f}"
        # The PostgreSQL path writes notifications without enqueue_many, so check them here for both.
        notifications.check_message(OFFER_NOTIFICATION_KIND, dedupe_key)
        rows.append(_OfferRow(
            worker_id=worker_id,
            distance_m=distance_m,
            score=round(candidate.score, 4),
            dedupe_key=dedupe_key,
            notification_data={"category": request.category, "distance_m": distance_m},
        ))
    return rows


async def _write_offers_postgres(request: ServiceRequest, ring: int, rows: list[_OfferRow], now: datetime,
                                 expires_at: datetime) -> bool:
    _, result = await connections.get("default").execute_query(_WRITE_OFFERS_SQL, [
        RequestStatus.OFFERED.value, now, request.id, RequestStatus.MATCHING.value, DispatchStage.RING.value, ring,
        [row.worker_id for row in rows],
        [row.distance_m for row in rows],
        [row.score for row in rows],
        [row.dedupe_key for row in rows],
        [json.dumps(row.notification_data, ensure_ascii=False) for row in rows],
        OfferStatus.OPEN.value, expires_at,
        OFFER_NOTIFICATION_KIND, NotificationStatus.PENDING.value, OFFERS_SENT_EVENT,
    ])
    return result[0]["moved"] == 1


async def _write_offers_orm(request: ServiceRequest, ring: int, rows: list[_OfferRow], now: datetime,
                            expires_at: datetime) -> bool:
    async with in_transaction():
        moved = await ServiceRequest.filter(
            id=request.id, status=RequestStatus.MATCHING, stage=DispatchStage.RING, search_ring=ring
        ).update(status=RequestStatus.OFFERED, updated_at=now)
        if moved == 0:
            return False

        user_ids = dict(await Worker.filter(id__in=[row.worker_id for row in rows]).values_list("id", "user_id"))
        offers = [
            Offer(service_request_id=request.id, worker_id=row.worker_id, status=OfferStatus.OPEN, ring=ring,
                  distance_m=row.distance_m, score=row.score, created_at=now, expires_at=expires_at)
            for row in rows
        ]
        # A worker may hold a closed offer of this request from an earlier round (another
        # worker won, then withdrew), so an existing row is opened again in place.
        await Offer.bulk_create(
            offers,
            on_conflict=["service_request_id", "worker_id"],
            update_fields=["status", "ring", "distance_m", "score", "created_at", "expires_at"],
        )
        await notifications.enqueue_many([
            notifications.Outgoing(user_ids[row.worker_id], OFFER_NOTIFICATION_KIND, dedupe_key=row.dedupe_key,
                                   service_request_id=request.id, data=row.notification_data)
            for row in rows
        ])
        await _record_event(request.id, OFFERS_SENT_EVENT, ring=ring)
    return True


async def _send_offers(services: Services, request: ServiceRequest, ring: int, candidates: list[Candidate]) -> bool:
    """Move the request from `matching` to `offered` at `ring` and write the offers, atomically.

    The number of statements does not grow with the number of candidates: one on PostgreSQL,
    five in a transaction elsewhere.
    """
    now = clock.now()
    expires_at = now + timedelta(seconds=services.settings.offer_ttl_s)
    rows = _offer_rows(request, candidates, now)
    if connections.get("default").capabilities.dialect == "postgres":
        sent = await _write_offers_postgres(request, ring, rows, now, expires_at)
    else:
        sent = await _write_offers_orm(request, ring, rows, now, expires_at)
    if not sent:
        return False

    request.status = RequestStatus.OFFERED
    request.updated_at = now
    log.info("offers sent request_id=%s ring=%s workers=%s", request.id, ring, len(candidates))
    return True


async def _widen(services: Services, request: ServiceRequest, ring: int, from_status: RequestStatus) -> bool:
    """Move the request to the next ring, or to its station's queue after the last ring."""
    now = clock.now()
    radii = services.settings.search_radii_m
    guard = {"id": request.id, "status": from_status, "stage": DispatchStage.RING, "search_ring": ring}
    async with in_transaction():
        if ring < len(radii):
            moved = await ServiceRequest.filter(**guard).update(
                status=RequestStatus.MATCHING, search_ring=ring + 1, updated_at=now
            )
            if moved:
                await _record_event(request.id, "ring_widened", ring=ring + 1, dedupe_key=f"{request.id}:ring:{ring + 1}")
        else:
            moved = await ServiceRequest.filter(**guard).update(
                status=RequestStatus.MATCHING, stage=DispatchStage.STATION_QUEUE, updated_at=now
            )
            if moved:
                await _record_event(request.id, "station_queued", ring=ring, dedupe_key=f"{request.id}:station")
                await notifications.enqueue(
                    request.resident_id,
                    "request_station_queued",
                    dedupe_key=f"station:{request.id}",
                    service_request_id=request.id,
                    data={"category": request.category},
                )
    if moved:
        log.info("dispatch widened request_id=%s from_ring=%s", request.id, ring)
    return bool(moved)


async def run_matching(
    services: Services, request_id: int, *, loaded: ServiceRequest | None = None, resident_may_be_worker: bool = True
) -> list[Candidate]:
    """Search the request's current ring, widening until someone is offered it or it is queued.

    Returns the candidates offered, or [] when the request was queued at its station, is being
    handled by another process, or the index is unavailable (the scheduler retries later).
    A caller that has just created the request passes it as `loaded`, which saves reading it
    back, and sets `resident_may_be_worker` to False when its resident has no worker profile. When offers are sent, `loaded`
    is updated to the request's new status.
    """
    radii = services.settings.search_radii_m
    for _ in range(len(radii) + 1):
        request = loaded or await ServiceRequest.get_or_none(id=request_id)
        loaded = None  # read again after a widening
        if request is None or request.status != RequestStatus.MATCHING or request.stage != DispatchStage.RING:
            return []
        ring = min(request.search_ring, len(radii))
        try:
            candidates = await find_candidates(
                services.index,
                lat=request.lat,
                lng=request.lng,
                category=request.category,
                min_certificate_rank=min_rank(request.category),
                radius_m=radii[ring - 1],
                count=services.settings.offer_count,
                exclude_worker_ids=await _excluded_workers(request, resident_may_be_worker),
                language=request.language,
            )
        except IndexUnavailable:
            log.error("matching postponed, index unavailable request_id=%s ring=%s", request.id, ring)
            return []

        if candidates:
            sent = await _send_offers(services, request, ring, candidates)
            return candidates if sent else []
        if not await _widen(services, request, ring, RequestStatus.MATCHING):
            return []
    return []


async def advance_if_exhausted(services: Services, request_id: int) -> None:
    """Widen a request whose offers have all expired or been declined, then match it again."""
    request = await ServiceRequest.get_or_none(id=request_id)
    if request is None or request.status != RequestStatus.OFFERED:
        return
    if await Offer.exists(service_request_id=request.id, status=OfferStatus.OPEN):
        return
    if await _widen(services, request, request.search_ring, RequestStatus.OFFERED):
        await run_matching(services, request.id)


async def expire_due_offers() -> int:
    """Expire every open offer past its time in one UPDATE; returns how many.

    The scheduler runs this on its own short timer, apart from the slower steps, so an offer
    is closed within about one scheduler interval of its expiry even while those steps are busy.
    """
    return await Offer.filter(status=OfferStatus.OPEN, expires_at__lte=clock.now()).update(status=OfferStatus.EXPIRED)


async def advance_exhausted(services: Services) -> int:
    """Move on requests left without an open offer, at most ADVANCE_BATCH of them per call.

    Each one needs a search, so the next call takes the rest. Requests are found by their state,
    not by the offers that just expired, so a request whose advance was cut short by a crash is
    picked up again. Returns the number of requests looked at.
    """
    open_offer_requests = Subquery(Offer.filter(status=OfferStatus.OPEN).values("service_request_id"))
    exhausted = (
        await ServiceRequest.filter(status=RequestStatus.OFFERED)
        .exclude(id__in=open_offer_requests)
        .order_by("id")
        .limit(ADVANCE_BATCH)
        .values_list("id", flat=True)
    )
    for request_id in exhausted:
        await advance_if_exhausted(services, request_id)
    return len(exhausted)


async def retry_stalled(services: Services) -> int:
    """Match again requests left in `matching` on a ring; returns how many were retried."""
    cutoff = clock.now() - timedelta(seconds=STALLED_AFTER_S)
    stalled = await ServiceRequest.filter(
        status=RequestStatus.MATCHING, stage=DispatchStage.RING, updated_at__lte=cutoff
    ).order_by("id").limit(100).values_list("id", flat=True)
    for request_id in stalled:
        # Touch first, so a request that still finds nothing waits another period.
        await ServiceRequest.filter(id=request_id, status=RequestStatus.MATCHING).update(updated_at=clock.now())
        await run_matching(services, request_id)
    return len(stalled)


async def release_worker(services: Services, worker_id: int, *, reason: str, release_accepted: bool) -> None:
    """Take a worker out of dispatch: decline their open offers, and with `release_accepted`
    give their accepted, not yet started jobs back to matching.

    Used when a worker goes off duty (offers only), or loses their certificate or their
    agency's approval (offers and accepted jobs), so no request waits on someone who cannot come.
    """
    offered = await Offer.filter(worker_id=worker_id, status=OfferStatus.OPEN).values_list(
        "service_request_id", flat=True
    )
    if offered:
        await Offer.filter(worker_id=worker_id, status=OfferStatus.OPEN).update(status=OfferStatus.DECLINED)
        for request_id in offered:
            await advance_if_exhausted(services, request_id)

    released: list[int] = []
    if release_accepted:
        now = clock.now()
        accepted = await ServiceRequest.filter(worker_id=worker_id, status=RequestStatus.ACCEPTED).values_list(
            "id", flat=True
        )
        for request_id in accepted:
            async with in_transaction():
                moved = await ServiceRequest.filter(
                    id=request_id, worker_id=worker_id, status=RequestStatus.ACCEPTED
                ).update(status=RequestStatus.MATCHING, worker_id=None, accepted_at=None, updated_at=now)
                if moved:
                    await Offer.filter(service_request_id=request_id, worker_id=worker_id).update(
                        status=OfferStatus.WITHDRAWN
                    )
                    await _record_event(request_id, "released", worker_id=worker_id)
            if moved:
                released.append(request_id)
                await run_matching(services, request_id)
    if offered or released:
        log.info(
            "worker released from dispatch worker_id=%s reason=%s offers=%s jobs=%s",
            worker_id, reason, len(offered), len(released),
        )
