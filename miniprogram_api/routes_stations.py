"""Service stations: the queue of requests nobody nearby took, and direct assignment."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import service_requests
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import json_body, page_query, path_id
from miniprogram_api.schemas import AssignBody
from miniprogram_api.views import page_view, request_view

bp = Blueprint("stations")


@bp.get("/api/v1/stations/<station_id>/queue")
@openapi.summary("Requests waiting at a station for manual assignment, oldest first (station staff, officers)")
@openapi.parameter("cursor", str, "query")
@openapi.parameter("limit", int, "query")
@authenticated()
async def queue(request: Request, station_id: str):
    waiting = await service_requests.station_queue(
        request.ctx.user, path_id(station_id, "服务站"), **page_query(request)
    )
    radii = request.app.ctx.services.settings.search_radii_m
    return json(page_view(waiting, lambda item: request_view(item, "station", radii_m=radii)))


@bp.post("/api/v1/admin/service-requests/<request_id>/assign")
@openapi.summary("Assign a worker to a request directly (its station's staff, officers)")
@openapi.body({"application/json": AssignBody})
@authenticated()
async def assign(request: Request, request_id: str):
    body = json_body(request)
    assigned = await service_requests.assign_worker(
        request.app.ctx.services, request.ctx.user, path_id(request_id, "服务需求"), body.get("worker_id")
    )
    await assigned.fetch_related("station", "worker")
    radii = request.app.ctx.services.settings.search_radii_m
    return json(request_view(assigned, "officer", worker=assigned.worker, radii_m=radii))
