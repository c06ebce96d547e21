"""Rendering of models into the JSON the mini-program reads, per viewer."""

from __future__ import annotations

from backend import clock
from backend.catalog import CATEGORIES_BY_CODE
from backend.matching import Candidate, smoothed_rating
from backend.models import Offer, ServiceRequest, User, Worker


def user_view(user: User) -> dict:
    return {"id": user.id, "roles": list(user.roles)}


def candidate_view(candidate: Candidate) -> dict:
    document = candidate.hit.document
    return {
        "worker_id": document.worker_id,
        "distance_m": round(candidate.hit.distance_m),
        "certificate_level": ("assistant", "intermediate", "senior")[document.certificate_rank],
        "rating": round(document.rating, 2),
        "agency_id": document.agency_id,
        "score": round(candidate.score, 4),
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


def request_view(request: ServiceRequest, relation: str, *, worker: Worker | None = None,
                 candidates: list[dict] | None = None) -> dict:
    """Render a request for one viewer.

    Offered workers see the category, street and district only: never the address, the
    description or the resident. The resident, the assigned worker and officers see it all.
    """
    category = CATEGORIES_BY_CODE[request.category]
    view = {
        "id": request.id,
        "status": request.status.value,
        "category": request.category,
        "category_name": category.name,
        "district_code": request.district_id,
        "street": _street(request),
        "created_at": clock.to_local_iso(request.created_at),
        "updated_at": clock.to_local_iso(request.updated_at),
    }
    if relation == "offered":
        return view

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
            "rating": round(smoothed_rating(worker.rating_sum, worker.rating_count), 2),
        }
    if candidates is not None:
        view["candidates"] = candidates
    return view


def offer_view(offer: Offer, request: ServiceRequest) -> dict:
    category = CATEGORIES_BY_CODE[request.category]
    return {
        "request_id": request.id,
        "category": request.category,
        "category_name": category.name,
        "district_code": request.district_id,
        "street": _street(request),
        "distance_m": offer.distance_m,
        "offered_at": clock.to_local_iso(offer.created_at),
    }
