"""Officers' review of user text that WeChat's content check flagged or could not check."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import clock, content_check
from backend.models import ContentFlag, Role
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import page_query, path_id
from miniprogram_api.views import page_view

bp = Blueprint("content_flags")


def _flag_view(content_flag: ContentFlag) -> dict:
    return {
        "id": content_flag.id,
        "target": content_flag.target,
        "target_id": content_flag.target_id,
        "verdict": content_flag.verdict,
        "created_at": clock.to_local_iso(content_flag.created_at),
        "resolved_at": clock.to_local_iso(content_flag.resolved_at),
    }


@bp.get("/api/v1/admin/content-flags")
@openapi.summary("Flagged user text, unresolved first, newest first (officers)")
@openapi.parameter("cursor", str, "query")
@openapi.parameter("limit", int, "query")
@authenticated(Role.OFFICER)
async def list_flags(request: Request):
    page = await content_check.list_flags(**page_query(request))
    return json(page_view(page, _flag_view))


@bp.get("/api/v1/admin/content-flags/<flag_id>")
@openapi.summary("A flag with the text it points at and the id of its author, for review (officers)")
@authenticated(Role.OFFICER)
async def read_flag(request: Request, flag_id: str):
    content_flag, text = await content_check.read_flag(path_id(flag_id, "内容标记"))
    return json({**_flag_view(content_flag), "user_id": content_flag.user_id, "text": text})


@bp.post("/api/v1/admin/content-flags/<flag_id>/resolve")
@openapi.summary("Mark a content flag as reviewed (officers)")
@authenticated(Role.OFFICER)
async def resolve_flag(request: Request, flag_id: str):
    content_flag = await content_check.resolve_flag(path_id(flag_id, "内容标记"), request.ctx.user)
    return json(_flag_view(content_flag))
