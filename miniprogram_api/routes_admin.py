"""Officers' review of workers and agencies, and the accounts of agency managers and station staff."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import admin, clock, workers
from backend.models import Role, User, Worker
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import json_body, page_query, path_id
from miniprogram_api.views import page_view

bp = Blueprint("admin", url_prefix="/api/v1/admin")


@bp.get("/workers")
@openapi.summary("Workers for certificate review, oldest first, optionally by status (officers)")
@openapi.parameter("status", str, "query")
@openapi.parameter("cursor", str, "query")
@openapi.parameter("limit", int, "query")
@authenticated(Role.OFFICER)
async def list_workers(request: Request):
    page = await admin.list_workers(request.args.get("status"), **page_query(request))
    return json(page_view(page, _review_view))


def _review_view(worker: Worker) -> dict:
    return {
        "id": worker.id,
        "name": worker.name,
        "agency_id": worker.agency_id,
        "certificate_level": worker.certificate_level.value,
        "certificate_no": workers.shown_certificate_no(worker),
        "categories": worker.categories,
        "status": worker.status.value,
        "rejection_reason": worker.rejection_reason,
        "created_at": clock.to_local_iso(worker.created_at),
    }


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


async def _create_staff_account(
    request: Request,
    create_account: Callable[..., Awaitable[User]],
    *,
    link_field: str,
    raw_link_id: str,
    link_label: str,
):
    """Create a staff account with `create_account`, one of backend.admin's staff-account functions.

    `raw_link_id` is the agency or station id from the path, and `link_label` names that kind of
    place in the 404 message. `link_field` is the user's column that ties the account to it, and
    the response carries it under that name.
    """
    body = json_body(request)
    user = await create_account(
        request.ctx.user, path_id(raw_link_id, link_label), body.get("username"), body.get("password")
    )
    return json(
        {"id": user.id, "username": user.username, "roles": user.roles, link_field: getattr(user, link_field)},
        status=201,
    )


@bp.post("/agencies/<agency_id>/managers")
@openapi.summary("Create an agency manager account (officers)")
@authenticated(Role.OFFICER)
async def create_manager(request: Request, agency_id: str):
    return await _create_staff_account(
        request, admin.create_agency_manager, link_field="agency_id", raw_link_id=agency_id, link_label="服务机构"
    )


@bp.post("/stations/<station_id>/staff")
@openapi.summary("Create a service-station staff account (officers)")
@authenticated(Role.OFFICER)
async def create_station_staff(request: Request, station_id: str):
    return await _create_staff_account(
        request, admin.create_station_staff, link_field="station_id", raw_link_id=station_id, link_label="服务站"
    )
