"""Service requests through their life: create, read, accept, start, complete, rate, cancel."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import clock, rate_limit, service_requests
from backend.locations import parse_location
from backend.models import DispatchEvent, Offer, OfferStatus, Worker
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import json_body, path_id
from miniprogram_api.etag import json_with_etag
from miniprogram_api.idempotency import idempotent
from miniprogram_api.schemas import CheckInBody, CompleteBody, RatingBody, ServiceRequestBody
from miniprogram_api.views import offers_summary, request_view

bp = Blueprint("service_requests", url_prefix="/api/v1/service-requests")


async def _render(request_obj, relation: str, radii_m: tuple[int, ...]) -> dict:
    worker = await Worker.get_or_none(id=request_obj.worker_id) if request_obj.worker_id else None
    events = None
    if relation in ("resident", "officer", "station"):
        events = await DispatchEvent.filter(service_request_id=request_obj.id).order_by("id")
    offers = None
    candidates = None
    if relation == "resident":
        open_distances = await Offer.filter(
            service_request_id=request_obj.id, status=OfferStatus.OPEN, expires_at__gt=clock.now()
        ).values_list("distance_m", flat=True)
        offers = offers_summary(list(open_distances))
    elif relation == "officer":
        offered = await Offer.filter(service_request_id=request_obj.id).order_by("-score", "id")
        candidates = [
            {"worker_id": o.worker_id, "distance_m": o.distance_m, "score": o.score, "offer_status": o.status.value}
            for o in offered
        ]
    return request_view(request_obj, relation, worker=worker, offers=offers, candidates=candidates, events=events,
                        radii_m=radii_m)


@bp.post("")
@openapi.summary("Ask for help: store the request and offer it to the best nearby workers")
@openapi.body({"application/json": ServiceRequestBody})
@authenticated()
@idempotent("service_request_create")
async def create(request: Request):
    services = request.app.ctx.services
    # The resident's hit is taken before the request is created, so simultaneous creates cannot
    # all pass. A form rejected with a 4xx status gives it back, which is safe because
    # create_request raises its client errors before it stores anything.
    async with rate_limit.hit_unless_rejected(services.redis, "request_create_user", str(request.ctx.user.id),
                                              services.settings.rate_requests_per_user_per_hour, 3600):
        await rate_limit.hit(services.redis, "request_create_ip", rate_limit.client_network(request),
                             services.settings.rate_requests_per_ip_per_hour, 3600)
        body = json_body(request)
        location = parse_location(body.get("location"))
        created, candidates = await service_requests.create_request(
            request.app.ctx.services,
            request.ctx.user,
            category=body.get("category"),
            description=body.get("description"),
            address=body.get("address"),
            location=location,
            preferred_start=body.get("preferred_start"),
            preferred_end=body.get("preferred_end"),
            language=body.get("language"),
        )
    offers = offers_summary([candidate.hit.distance_m for candidate in candidates])
    view = request_view(created, "resident", offers=offers, radii_m=services.settings.search_radii_m)
    return json(view, status=201)


@bp.get("/<request_id>")
@openapi.summary("Read a request; offered workers see no address or resident")
@authenticated()
async def read(request: Request, request_id: str):
    found, relation = await service_requests.load_request_for(request.ctx.user, path_id(request_id, "服务需求"))
    return json_with_etag(request, await _render(found, relation, request.app.ctx.services.settings.search_radii_m))


@bp.post("/<request_id>/accept")
@openapi.summary("Accept an offer; the first accept wins, later ones get 409 already_taken")
@authenticated()
@idempotent("service_request_accept")
async def accept(request: Request, request_id: str):
    accepted = await service_requests.accept_request(
        request.app.ctx.services, request.ctx.user, path_id(request_id, "服务需求")
    )
    return json(await _render(accepted, "assigned", request.app.ctx.services.settings.search_radii_m))


@bp.post("/<request_id>/start")
@openapi.summary("Start the service on site: location within CHECKIN_RADIUS_M (assigned worker)")
@openapi.body({"application/json": CheckInBody})
@authenticated()
async def start(request: Request, request_id: str):
    body = json_body(request)
    started = await service_requests.start_request(
        request.app.ctx.services,
        request.ctx.user,
        path_id(request_id, "服务需求"),
        location=parse_location(body.get("location")),
    )
    return json(await _render(started, "assigned", request.app.ctx.services.settings.search_radii_m))


@bp.post("/<request_id>/complete")
@openapi.summary("Complete the service with its duration and a summary (assigned worker)")
@openapi.body({"application/json": CompleteBody})
@authenticated()
@idempotent("service_request_complete")
async def complete(request: Request, request_id: str):
    body = json_body(request)
    completed = await service_requests.complete_request(
        request.app.ctx.services,
        request.ctx.user,
        path_id(request_id, "服务需求"),
        service_minutes=body.get("service_minutes"),
        summary=body.get("summary"),
        location=parse_location(body.get("location")),
    )
    return json(await _render(completed, "assigned", request.app.ctx.services.settings.search_radii_m))


@bp.post("/<request_id>/rating")
@openapi.summary("Rate a completed service once, 1 to 5 stars (the resident)")
@openapi.body({"application/json": RatingBody})
@authenticated()
@idempotent("service_request_rating")
async def rate(request: Request, request_id: str):
    body = json_body(request)
    rating = await service_requests.rate_request(
        request.app.ctx.services,
        request.ctx.user,
        path_id(request_id, "服务需求"),
        stars=body.get("stars"),
        comment=body.get("comment"),
    )
    return json(
        {"id": rating.id, "request_id": rating.service_request_id, "stars": rating.stars, "comment": rating.comment},
        status=201,
    )


@bp.post("/<request_id>/cancel")
@openapi.summary("Cancel a request before the service starts (the resident)")
@authenticated()
async def cancel(request: Request, request_id: str):
    cancelled = await service_requests.cancel_request(
        request.app.ctx.services, request.ctx.user, path_id(request_id, "服务需求")
    )
    return json(await _render(cancelled, "resident", request.app.ctx.services.settings.search_radii_m))


@bp.post("/<request_id>/decline")
@openapi.summary("Decline an offer (offered worker); the request moves on when no offer is left")
@authenticated()
async def decline(request: Request, request_id: str):
    await service_requests.decline_offer(request.app.ctx.services, request.ctx.user, path_id(request_id, "服务需求"))
    return json({"request_id": int(request_id), "offer_status": "declined"})


@bp.post("/<request_id>/withdraw")
@openapi.summary("Give an accepted job back before it starts (assigned worker)")
@authenticated()
async def withdraw(request: Request, request_id: str):
    withdrawn = await service_requests.withdraw_request(
        request.app.ctx.services, request.ctx.user, path_id(request_id, "服务需求")
    )
    return json({"request_id": withdrawn.id, "status": "withdrawn"})
