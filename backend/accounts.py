"""Accounts, logins and opaque bearer tokens kept in Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets

import redis.asyncio as redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from tortoise.exceptions import IntegrityError

from backend.context import Services
from backend.errors import Unauthorized, ValidationError
from backend.models import Role, User

log = logging.getLogger(__name__)

TOKEN_KEY_PREFIX = "linli:token:"
_password_hasher = PasswordHasher()
# Verified against when the username is unknown, so a login takes as long either way.
_DUMMY_HASH = _password_hasher.hash("linli-no-such-user")


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    message = "用户名或密码错误，请重新输入。"


def _token_key(token: str) -> str:
    # Only a digest of the token is stored, so a Redis dump does not leak live tokens.
    return TOKEN_KEY_PREFIX + hashlib.sha256(token.encode()).hexdigest()


async def issue_token(client: redis.Redis, user_id: int, ttl_s: int) -> str:
    token = secrets.token_urlsafe(32)
    await client.set(_token_key(token), str(user_id), ex=ttl_s)
    return token


async def revoke_token(client: redis.Redis, token: str) -> None:
    await client.delete(_token_key(token))


async def user_for_token(client: redis.Redis, token: str) -> User:
    """Return the token's user, read fresh so roles granted after login apply at once."""
    user_id = await client.get(_token_key(token))
    if user_id is None:
        raise Unauthorized()
    user = await User.get_or_none(id=int(user_id))
    if user is None:
        raise Unauthorized()
    return user


async def login_with_wechat(services: Services, code: str) -> tuple[str, User]:
    session = await services.wechat.code_to_session(code)

    user = await User.get_or_none(openid=session.openid)
    if user is None:
        try:
            user = await User.create(openid=session.openid, roles=[Role.RESIDENT.value])
        except IntegrityError:
            # Two first logins of the same person raced; the other one created the row.
            user = await User.get(openid=session.openid)
    token = await issue_token(services.redis, user.id, services.settings.token_ttl_s)
    log.info("wechat login user_id=%s", user.id)
    return token, user


async def hash_password(password: str) -> str:
    # argon2 is deliberately slow: keep it off the event loop.
    return await asyncio.to_thread(_password_hasher.hash, password)


async def _verify_password(password_hash: str, password: str) -> bool:
    try:
        return await asyncio.to_thread(_password_hasher.verify, password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


async def login_with_password(services: Services, username: str, password: str) -> tuple[str, User]:
    user = await User.get_or_none(username=username)
    if user is None or not user.password_hash:
        await _verify_password(_DUMMY_HASH, password)
        raise InvalidCredentials(field="password")
    if not await _verify_password(user.password_hash, password):
        log.info("password login failed user_id=%s", user.id)
        raise InvalidCredentials(field="password")
    token = await issue_token(services.redis, user.id, services.settings.token_ttl_s)
    log.info("password login user_id=%s", user.id)
    return token, user


async def ensure_officer(username: str, password: str) -> User:
    """Create the civil-affairs officer account, or reset its password and role."""
    if not username.strip():
        raise ValidationError("用户名不能为空。", field="username")
    password_hash = await hash_password(password)
    user = await User.get_or_none(username=username)
    if user is None:
        return await User.create(username=username, password_hash=password_hash, roles=[Role.OFFICER.value])
    roles = list(user.roles)
    if Role.OFFICER.value not in roles:
        roles.append(Role.OFFICER.value)
    user.password_hash = password_hash
    user.roles = roles
    await user.save(update_fields=["password_hash", "roles"])
    return user


async def grant_role(user: User, role: Role) -> None:
    if role.value in user.roles:
        return
    user.roles = [*user.roles, role.value]
    await user.save(update_fields=["roles"])


def has_role(user: User, role: Role) -> bool:
    return role.value in user.roles
