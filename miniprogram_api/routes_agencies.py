"""Agency ratings and credit, readable by officers and the agency's own managers."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import credit
from backend.errors import Forbidden, NotFound
from backend.models import Agency, Role, User
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import path_id

bp = Blueprint("agencies", url_prefix="/api/v1/agencies")


async def _readable_agency(user: User, raw_id: str) -> Agency:
    agency = await Agency.get_or_none(id=path_id(raw_id, "服务机构"))
    if agency is None:
        raise NotFound("找不到该服务机构。")
    is_officer = Role.OFFICER.value in user.roles
    is_manager = Role.AGENCY_MANAGER.value in user.roles and user.agency_id == agency.id
    if not (is_officer or is_manager):
        raise Forbidden("只有民政部门和本机构管理员可以查看。")
    return agency


@bp.get("/<agency_id>/ratings")
@openapi.summary("Rating count, average and distribution of an agency's workers")
@authenticated()
async def ratings(request: Request, agency_id: str):
    agency = await _readable_agency(request.ctx.user, agency_id)
    return json(await credit.ratings_summary(agency))


@bp.get("/<agency_id>/credit")
@openapi.summary("An agency's credit_score with its components and history")
@authenticated()
async def credit_view(request: Request, agency_id: str):
    agency = await _readable_agency(request.ctx.user, agency_id)
    return json(await credit.credit_report(agency))
