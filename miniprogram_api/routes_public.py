"""Public reads and logins: health, categories, agencies, WeChat and password login."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json
from sanic_ext import openapi

from backend import accounts, rate_limit
from backend.catalog import CATEGORIES
from backend.errors import ValidationError
from backend.models import Agency
from miniprogram_api.auth import authenticated
from miniprogram_api.bodies import json_body, required
from miniprogram_api.schemas import PasswordLoginBody, WeChatLoginBody
from miniprogram_api.views import user_view

bp = Blueprint("public")

MAX_CODE_CHARS = 128


async def _limit_logins(request: Request) -> None:
    # WeChat and password logins share one budget per client IP, so guessing passwords
    # cannot borrow the allowance of the other login.
    services = request.app.ctx.services
    await rate_limit.hit(services.redis, "login_ip", rate_limit.client_network(request),
                         services.settings.rate_login_per_ip_per_min, 60)


@bp.get("/healthz")
@openapi.summary("Liveness check")
async def healthz(request: Request):
    return json({"status": "ok"})


@bp.get("/api/v1/categories")
@openapi.summary("Service categories with the minimum certificate level each needs")
async def list_categories(request: Request):
    items = [
        {"code": c.code, "name": c.name, "min_certificate_level": c.min_certificate_level}
        for c in CATEGORIES
    ]
    return json({"items": items})


@bp.get("/api/v1/agencies")
@openapi.summary("Service agencies, optionally of one district")
@openapi.parameter("district_code", str, "query")
async def list_agencies(request: Request):
    query = Agency.all().order_by("id")
    district_code = request.args.get("district_code")
    if district_code is not None:
        if not district_code.isascii() or not district_code.isdigit() or len(district_code) != 6:
            raise ValidationError("区划代码应为 6 位数字。", field="district_code")
        query = query.filter(district_id=district_code)
    agencies = await query
    items = [
        {
            "id": a.id,
            "name": a.name,
            "district_code": a.district_id,
            "status": a.status.value,
            "credit_score": a.credit_score,
        }
        for a in agencies
    ]
    return json({"items": items})


@bp.post("/api/v1/auth/wechat-login")
@openapi.summary("Log in with the code from wx.login(); every WeChat user is a resident")
@openapi.body({"application/json": WeChatLoginBody})
async def wechat_login(request: Request):
    await _limit_logins(request)
    body = json_body(request)
    code = required(body, "code", str, "登录凭证（code）")
    if not code or len(code) > MAX_CODE_CHARS:
        raise ValidationError("登录凭证 code 格式不正确。", field="code")
    token, user = await accounts.login_with_wechat(request.app.ctx.services, code)
    return json({"token": token, "user": user_view(user)})


@bp.post("/api/v1/auth/password-login")
@openapi.summary("Log in as a civil-affairs officer or agency manager")
@openapi.body({"application/json": PasswordLoginBody})
async def password_login(request: Request):
    await _limit_logins(request)
    body = json_body(request)
    username = required(body, "username", str, "用户名")
    password = required(body, "password", str, "密码")
    token, user = await accounts.login_with_password(
        request.app.ctx.services, username, password, client_network=rate_limit.client_network(request)
    )
    return json({"token": token, "user": user_view(user)})


@bp.post("/api/v1/auth/logout")
@openapi.summary("Revoke the token of this request")
@authenticated()
async def logout(request: Request):
    await accounts.revoke_token(request.app.ctx.services.redis, request.ctx.token)
    return json({"status": "logged_out"})


@bp.get("/api/v1/me")
@openapi.summary("The logged-in user and roles")
@authenticated()
async def me(request: Request):
    return json({"user": user_view(request.ctx.user)})
