"""Rendering of models into the JSON the mini-program reads, per viewer."""

from __future__ import annotations

from collections.abc import Callable

from backend import clock, workers
from backend.catalog import CATEGORIES_BY_CODE
from backend.matching import smoothed_rating
from backend.models import DispatchEvent, DispatchStage, Offer, RequestStatus, ServiceRequest, User, Worker
from backend.paging import Page


def page_view(page: Page, render: Callable[..., dict]) -> dict:
    """Render a page of a list endpoint. A client passes `next_cursor` back as `cursor` for the next page."""
    return {"items": [render(item) for item in page.items], "next_cursor": page.next_cursor}


def user_view(user: User) -> dict:
    return {"id": user.id, "roles": list(user.roles)}


# An offered worker sees their distance to the request rounded to this many metres. They get
# one offer per request, from the position they registered, and the street is shown anyway.
SHOWN_DISTANCE_STEP_M = 100

# Residents see no distance of any one worker, because exact or rounded distances from a few
# requests placed apart locate a worker by trilateration. They see how many workers were offered
# and the band of the nearest one. Each band is (upper bound in metres or None, code, label).
# NOTE: requests moved step by step across a band edge can still find where that edge lies. The
# per-resident request limit and the real offers that each request sends make this slow and visible.
NEAREST_DISTANCE_BANDS = (
    (1000, "within_1km", "1 公里内"),
    (3000, "1_to_3km", "1-3 公里"),
    (5000, "3_to_5km", "3-5 公里"),
    (None, "over_5km", "5 公里以上"),
)


def shown_distance(metres: float) -> int:
    return max(SHOWN_DISTANCE_STEP_M, round(metres / SHOWN_DISTANCE_STEP_M) * SHOWN_DISTANCE_STEP_M)


def distance_band(metres: float) -> dict:
    for upper_m, code, label in NEAREST_DISTANCE_BANDS:
        if upper_m is None or metres <= upper_m:
            return {"code": code, "label": label}
    raise AssertionError("the last band has no upper bound")


def offers_summary(distances_m: list[float]) -> dict:
    """Summarise a request's open offers for its resident as the worker count and the band of the nearest."""
    return {
        "count": len(distances_m),
        "nearest_band": distance_band(min(distances_m)) if distances_m else None,
    }


def mask_address(address: str) -> str:
    """Keep the first few characters (district and road) and hide the house number."""
    visible = min(6, max(0, len(address) - 4))
    return address[:visible] + "*" * 4


def _street(request: ServiceRequest) -> dict | None:
    station = request.station
    if station is None:
        return None
    return {"code": station.street_code, "name": station.street_name, "station_id": station.id}


def stage_view(request: ServiceRequest, radii_m: tuple[int, ...]) -> dict | None:
    """Describe where an unassigned request is being searched for, in words a resident can read."""
    if request.status not in (RequestStatus.MATCHING, RequestStatus.OFFERED):
        return None
    if request.stage == DispatchStage.STATION_QUEUE:
        station_name = request.station.name if request.station else "所在街道服务站"
        return {"name": "station_queue", "label": f"附近暂无社工接单，已转交{station_name}为您人工安排"}
    ring = min(request.search_ring, len(radii_m))
    radius_km = radii_m[ring - 1] / 1000
    return {
        "name": "ring",
        "ring": ring,
        "rings": len(radii_m),
        "radius_m": radii_m[ring - 1],
        "label": f"正在为您联系 {radius_km:g} 公里内的社工",
    }


def request_view(request: ServiceRequest, relation: str, *, worker: Worker | None = None,
                 offers: dict | None = None, candidates: list[dict] | None = None,
                 events: list[DispatchEvent] | None = None, radii_m: tuple[int, ...] = (5000,)) -> dict:
    """Render a request for one viewer.

    Offered workers see the category, street, district and preferred time only: never the
    address, the description or the resident. The resident, the assigned worker, officers and,
    once the request has reached their queue, the staff of its station see it all. `offers` is the resident's summary from
    offers_summary(), and `candidates` the officers' list of offered workers.
    """
    category = CATEGORIES_BY_CODE[request.category]
    view = {
        "id": request.id,
        "status": request.status.value,
        "category": request.category,
        "category_name": category.name,
        "language": request.language,
        "district_code": request.district_id,
        "street": _street(request),
        "preferred_start": clock.to_local_iso(request.preferred_start),
        "preferred_end": clock.to_local_iso(request.preferred_end),
        "created_at": clock.to_local_iso(request.created_at),
        "updated_at": clock.to_local_iso(request.updated_at),
    }
    if relation == "offered":
        return view

    view["stage"] = stage_view(request, radii_m)

    view.update(
        {
            "description": request.description,
            "address": request.address,
            "location": {"lat": request.lat, "lng": request.lng, "coord_system": "gcj02"},
            "accepted_at": clock.to_local_iso(request.accepted_at),
            "started_at": clock.to_local_iso(request.started_at),
            "completed_at": clock.to_local_iso(request.completed_at),
            "cancelled_at": clock.to_local_iso(request.cancelled_at),
            "service_minutes": request.service_minutes,
            "summary": request.summary,
            "worker": None,
        }
    )
    if worker is not None:
        view["worker"] = {
            "id": worker.id,
            "name": worker.name,
            "certificate_level": worker.certificate_level.value,
            "agency_id": worker.agency_id,
            "languages": list(worker.languages),
            "rating": round(smoothed_rating(worker.rating_sum, worker.rating_count), 2),
        }
    if offers is not None:
        view["offers"] = offers
    if candidates is not None:
        view["candidates"] = candidates
    if events is not None:
        view["events"] = [
            {"kind": event.kind, "ring": event.ring, "at": clock.to_local_iso(event.at)} for event in events
        ]
    return view


def worker_profile_view(worker: Worker) -> dict:
    """Render a worker's own profile, for that worker only: it has the certificate number and location."""
    agency = worker.agency
    return {
        "id": worker.id,
        "status": worker.status.value,
        "rejection_reason": worker.rejection_reason,
        "name": worker.name,
        "certificate_level": worker.certificate_level.value,
        "certificate_no": workers.shown_certificate_no(worker),
        "categories": list(worker.categories),
        "languages": list(worker.languages),
        "agency": {"id": agency.id, "name": agency.name, "status": agency.status.value},
        "on_duty": worker.on_duty,
        "service_radius_m": worker.service_radius_m,
        "district_code": worker.district_id,
        "location": {"lat": worker.lat, "lng": worker.lng, "coord_system": "gcj02"},
        "rating": round(smoothed_rating(worker.rating_sum, worker.rating_count), 2),
        "rating_count": worker.rating_count,
        "verified_at": clock.to_local_iso(worker.verified_at),
        "created_at": clock.to_local_iso(worker.created_at),
    }


def offer_view(offer: Offer, request: ServiceRequest) -> dict:
    category = CATEGORIES_BY_CODE[request.category]
    return {
        "request_id": request.id,
        "category": request.category,
        "category_name": category.name,
        "district_code": request.district_id,
        "street": _street(request),
        "distance_m": shown_distance(offer.distance_m),
        "preferred_start": clock.to_local_iso(request.preferred_start),
        "preferred_end": clock.to_local_iso(request.preferred_end),
        "offered_at": clock.to_local_iso(offer.created_at),
        "expires_at": clock.to_local_iso(offer.expires_at),
    }
