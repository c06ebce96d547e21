"""Officers' review of workers and agencies, and the accounts of agency managers and station staff."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import admin, clock
from backend.models import Role
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import json_body, path_id

bp = Blueprint("admin", url_prefix="/api/v1/admin")


@bp.get("/workers")
@openapi.summary("Workers for certificate review, optionally by status (officers)")
@openapi.parameter("status", str, "query")
@authenticated(Role.OFFICER)
async def list_workers(request: Request):
    workers = await admin.list_workers(request.args.get("status"))
    items = [
        {
            "id": w.id,
            "name": w.name,
            "agency_id": w.agency_id,
            "certificate_level": w.certificate_level.value,
            "certificate_no": w.certificate_no,
            "categories": w.categories,
            "status": w.status.value,
            "rejection_reason": w.rejection_reason,
            "created_at": clock.to_local_iso(w.created_at),
        }
        for w in workers
    ]
    return json({"items": items})


@bp.post("/workers/<worker_id>/reject")
@openapi.summary("Reject a worker's certificate with a reason (officers)")
@authenticated(Role.OFFICER)
async def reject_worker(request: Request, worker_id: str):
    body = json_body(request)
    worker = await admin.reject_worker(
        request.app.ctx.services, request.ctx.user, path_id(worker_id, "社工"), body.get("reason")
    )
    return json({"id": worker.id, "status": worker.status.value})


@bp.put("/agencies/<agency_id>/status")
@openapi.summary("Approve, suspend or reopen review of an agency (officers)")
@authenticated(Role.OFFICER)
async def set_agency_status(request: Request, agency_id: str):
    body = json_body(request)
    agency = await admin.set_agency_status(
        request.app.ctx.services, request.ctx.user, path_id(agency_id, "服务机构"), body.get("status")
    )
    return json({"id": agency.id, "status": agency.status.value})


@bp.post("/agencies/<agency_id>/managers")
@openapi.summary("Create an agency manager account (officers)")
@authenticated(Role.OFFICER)
async def create_manager(request: Request, agency_id: str):
    body = json_body(request)
    user = await admin.create_agency_manager(
        request.ctx.user, path_id(agency_id, "服务机构"), body.get("username"), body.get("password")
    )
    return json({"id": user.id, "username": user.username, "roles": user.roles, "agency_id": user.agency_id}, status=201)


@bp.post("/stations/<station_id>/staff")
@openapi.summary("Create a service-station staff account (officers)")
@authenticated(Role.OFFICER)
async def create_station_staff(request: Request, station_id: str):
    body = json_body(request)
    user = await admin.create_station_staff(
        request.ctx.user, path_id(station_id, "服务站"), body.get("username"), body.get("password")
    )
    return json({"id": user.id, "username": user.username, "roles": user.roles, "station_id": user.station_id}, status=201)
