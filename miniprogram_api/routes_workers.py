"""Worker registration, duty and offers; certificate verification by officers."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import service_requests, workers
from backend.errors import ValidationError
from backend.locations import parse_location
from backend.models import Role
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import MAX_ID, json_body, page_query, path_id, required
from miniprogram_api.schemas import DutyBody, WorkerRegistrationBody
from miniprogram_api.views import offer_view, page_view, worker_profile_view

bp = Blueprint("workers")

MAX_CERTIFICATE_NO_CHARS = 64


@bp.post("/api/v1/workers/me")
@openapi.summary("Register as a social worker (pending verification), or register again after a rejection")
@openapi.body({"application/json": WorkerRegistrationBody})
@authenticated()
async def register_worker(request: Request):
    body = json_body(request)
    agency_id = required(body, "agency_id", int, "服务机构")
    if not 1 <= agency_id <= MAX_ID:
        raise ValidationError("所选服务机构不存在。", field="agency_id", code="agency_not_found")
    name = required(body, "name", str, "姓名")
    certificate_level = required(body, "certificate_level", str, "证书等级")
    certificate_no = required(body, "certificate_no", str, "证书编号").strip()
    if not certificate_no or len(certificate_no) > MAX_CERTIFICATE_NO_CHARS:
        raise ValidationError("证书编号格式不正确。", field="certificate_no")
    service_radius_m = required(body, "service_radius_m", int, "服务半径")
    location = parse_location(body.get("location"))

    worker, created = await workers.register_worker(
        request.app.ctx.services,
        request.ctx.user,
        agency_id=agency_id,
        name=name,
        certificate_level=certificate_level,
        certificate_no=certificate_no,
        categories=body.get("categories"),
        location=location,
        service_radius_m=service_radius_m,
        languages=body.get("languages"),
    )
    return json({"id": worker.id, "status": worker.status.value}, status=201 if created else 200)


@bp.get("/api/v1/workers/me")
@openapi.summary("The logged-in user's own worker profile: review status, rejection reason, agency, duty")
@authenticated()
async def read_own_profile(request: Request):
    worker = await workers.own_profile(request.ctx.user)
    return json(worker_profile_view(worker))


@bp.put("/api/v1/workers/me/duty")
@openapi.summary("Go on or off duty, optionally with the current location")
@openapi.body({"application/json": DutyBody})
@authenticated(Role.WORKER)
async def set_duty(request: Request):
    body = json_body(request)
    on_duty = required(body, "on_duty", bool, "接单状态")
    location = parse_location(body["location"]) if body.get("location") is not None else None
    worker = await workers.set_duty(request.app.ctx.services, request.ctx.user, on_duty=on_duty, location=location)
    return json({"id": worker.id, "on_duty": worker.on_duty, "status": worker.status.value})


@bp.get("/api/v1/workers/me/offers")
@openapi.summary("Open offers for the logged-in worker, newest first: category, street and distance only")
@openapi.parameter("cursor", str, "query")
@openapi.parameter("limit", int, "query")
@authenticated(Role.WORKER)
async def list_offers(request: Request):
    offers = await service_requests.open_offers(request.ctx.user, **page_query(request))
    return json(page_view(offers, lambda row: offer_view(*row)))


@bp.post("/api/v1/admin/workers/<worker_id>/verify")
@openapi.summary("Verify a worker's certificate (civil-affairs officer)")
@authenticated(Role.OFFICER)
async def verify_worker(request: Request, worker_id: str):
    worker = await workers.verify_worker(request.app.ctx.services, path_id(worker_id, "社工"), request.ctx.user)
    return json({"id": worker.id, "status": worker.status.value})
