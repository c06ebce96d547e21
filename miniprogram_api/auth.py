"""Bearer-token authentication and role checks for handlers."""

from __future__ import annotations

from functools import wraps

from sanic import Request

from backend import accounts
from backend.errors import Forbidden, Unauthorized
from backend.models import Role


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("请先登录。", code="unauthorized")
    return token.strip()


def authenticated(*roles: Role):
    """Require a valid token, and one of `roles` when given; the user lands in request.ctx.user."""

    def decorator(handler):
        @wraps(handler)
        async def wrapper(request: Request, *args, **kwargs):
            token = _bearer_token(request)
            user = await accounts.user_for_token(request.app.ctx.services.redis, token)
            if roles and not any(role.value in user.roles for role in roles):
                raise Forbidden()
            request.ctx.user = user
            request.ctx.token = token
            return await handler(request, *args, **kwargs)

        return wrapper

    return decorator
