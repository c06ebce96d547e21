"""Accounts, logins and opaque bearer tokens kept in Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import secrets
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis.asyncio as redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
# cryptography is installed through the wechatpy[cryptography] dependency.
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tortoise.exceptions import IntegrityError

from backend import clock, rate_limit
from backend.context import Services
from backend.errors import Unauthorized, ValidationError
from backend.models import Role, User
from backend.text import has_hidden_characters
from backend.wechat import DEADLINE_MARGIN_S, WeChatUnavailable

log = logging.getLogger(__name__)

TOKEN_KEY_PREFIX = "linli:token:"
LOGIN_RETRY_KEY_PREFIX = "linli:wechat-login:"
LOGIN_LOCK_KEY_PREFIX = "linli:wechat-login-lock:"
# WeChat rejects a wx.login code the second time (errcode 40163), but the mini-program resends
# a login whose response was lost on a weak network. A retry with the same code within this many
# seconds gets the session of the first login instead.
LOGIN_RETRY_TTL_S = 300
# Seconds the per-code lock outlives the deadline of one code2Session exchange, to cover the
# user lookup and the token issue that follow it.
LOGIN_LOCK_EXTRA_S = 5
LOGIN_LOCK_POLL_S = 0.05
_AES_GCM_NONCE_BYTES = 12
# Tokens are base64url text from secrets.token_urlsafe(). Anything else in the Authorization
# header, such as bytes that are no UTF-8, is rejected before it is hashed or sent to Redis.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
# KEYS[1]: the lock. ARGV[1]: its owner. Deletes the lock only if this owner still holds it.
_RELEASE_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
_password_hasher = PasswordHasher()
# argon2 is slow on purpose and runs in threads of its own, apart from WeChat calls.
_HASH_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="argon2")
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
    if not _TOKEN_PATTERN.fullmatch(token):
        raise Unauthorized()
    user_id = await client.get(_token_key(token))
    if user_id is None:
        raise Unauthorized()
    user = await User.get_or_none(id=int(user_id))
    if user is None:
        raise Unauthorized()
    return user


@dataclass(frozen=True)
class _LoginRetryKeys:
    cache: str  # Redis key of the remembered session
    lock: str  # Redis key of the lock held while one login exchanges the code
    cipher: bytes = field(repr=False)  # AES-256-GCM key of the remembered token


def _login_retry_keys(code: str) -> _LoginRetryKeys:
    # The code is never stored. One digest of it names the Redis keys, and a second digest,
    # which the first does not reveal, encrypts the remembered token. So a Redis dump contains
    # no code and no live token, only what someone who still has the code could decrypt.
    name = hashlib.sha256(b"linli login retry name\0" + code.encode()).hexdigest()
    cipher = hashlib.sha256(b"linli login retry cipher\0" + code.encode()).digest()
    return _LoginRetryKeys(cache=LOGIN_RETRY_KEY_PREFIX + name, lock=LOGIN_LOCK_KEY_PREFIX + name, cipher=cipher)


async def _remember_login(client: redis.Redis, keys: _LoginRetryKeys, user_id: int, token: str) -> None:
    nonce = secrets.token_bytes(_AES_GCM_NONCE_BYTES)
    sealed = AESGCM(keys.cipher).encrypt(nonce, token.encode(), str(user_id).encode())
    entry = {
        "user_id": user_id,
        "issued_at": clock.now().timestamp(),
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "token": base64.b64encode(sealed).decode("ascii"),
    }
    await client.set(keys.cache, json.dumps(entry), ex=LOGIN_RETRY_TTL_S)


async def _recall_login(client: redis.Redis, keys: _LoginRetryKeys) -> tuple[str, User] | None:
    """Return the remembered session of this code, or None if there is none still valid."""
    raw = await client.get(keys.cache)
    if raw is None:
        return None
    entry = json.loads(raw)
    # Redis expires the entry by its own clock. This applies the same limit by backend.clock.
    if clock.now().timestamp() - entry["issued_at"] >= LOGIN_RETRY_TTL_S:
        return None

    try:
        token = AESGCM(keys.cipher).decrypt(
            base64.b64decode(entry["nonce"]), base64.b64decode(entry["token"]), str(entry["user_id"]).encode()
        ).decode()
    except InvalidTag:
        log.warning("remembered wechat login failed to decrypt, ignored user_id=%s", entry["user_id"])
        return None
    # A token revoked by logout since must not come back through a retry.
    if not await client.exists(_token_key(token)):
        return None
    user = await User.get_or_none(id=entry["user_id"])
    if user is None:
        return None
    return token, user


async def _exchange_code(services: Services, code: str, keys: _LoginRetryKeys) -> tuple[str, User]:
    """Log in with a code that has no remembered session. The caller must hold the code's lock."""
    # The previous holder of the lock may have finished between the caller's last look and now.
    remembered = await _recall_login(services.redis, keys)
    if remembered is not None:
        return remembered

    session = await services.wechat.code_to_session(code)

    user = await User.get_or_none(openid=session.openid)
    if user is None:
        try:
            user = await User.create(openid=session.openid, roles=[Role.RESIDENT.value])
        except IntegrityError:
            # Two first logins of the same person raced; the other one created the row.
            user = await User.get(openid=session.openid)
    token = await issue_token(services.redis, user.id, services.settings.token_ttl_s)
    await _remember_login(services.redis, keys, user.id, token)
    log.info("wechat login user_id=%s", user.id)
    return token, user


async def login_with_wechat(services: Services, code: str) -> tuple[str, User]:
    """Exchange a wx.login code for a new session token, and return it with its user.

    A login retried with the same code within LOGIN_RETRY_TTL_S gets the first login's token
    and user. Concurrent logins with one code take turns on a Redis lock per code: the first
    calls WeChat and the others then read its session, so WeChat receives the code only once.
    """
    client = services.redis
    keys = _login_retry_keys(code)
    lock_ttl_s = math.ceil(services.settings.wechat_timeout_s + DEADLINE_MARGIN_S) + LOGIN_LOCK_EXTRA_S
    owner = secrets.token_hex(8)

    # Waiting one lock TTL is enough: by then the holder has finished or its lock has expired.
    for _ in range(math.ceil(lock_ttl_s / LOGIN_LOCK_POLL_S) + 1):
        remembered = await _recall_login(client, keys)
        if remembered is not None:
            log.info("wechat login retried with the same code, session reused user_id=%s", remembered[1].id)
            return remembered
        if await client.set(keys.lock, owner, nx=True, ex=lock_ttl_s):
            try:
                return await _exchange_code(services, code, keys)
            finally:
                await client.eval(_RELEASE_LOCK_SCRIPT, 1, keys.lock, owner)
        await asyncio.sleep(LOGIN_LOCK_POLL_S)

    log.warning("wechat login gave up waiting for a concurrent login with the same code after %d s", lock_ttl_s)
    raise WeChatUnavailable()


async def hash_password(password: str) -> str:
    # argon2 is deliberately slow: keep it off the event loop.
    return await asyncio.get_running_loop().run_in_executor(_HASH_EXECUTOR, _password_hasher.hash, password)


async def _verify_password(password_hash: str, password: str) -> bool:
    try:
        return await asyncio.get_running_loop().run_in_executor(
            _HASH_EXECUTOR, _password_hasher.verify, password_hash, password
        )
    except (VerificationError, InvalidHashError):
        return False


# Limits that apply both when an account is created and when it logs in, so every username
# and password that can be set can also be used to log in.
MAX_USERNAME_CHARS = 64  # the column's length
# Caps the text that an anonymous login request can make argon2 hash.
MAX_PASSWORD_CHARS = 256


def normalize_username(raw: str) -> str:
    """Fold full-width and other compatibility forms (NFKC) and trim spaces.

    Creation and login apply the same steps, so a username typed with a phone's full-width
    input or a trailing space still finds its account. Case is kept as typed, and matching
    ignores it (find_by_username).
    """
    return unicodedata.normalize("NFKC", raw).strip()


def parse_new_username(raw: object) -> str:
    """Normalise the username of a new account, or raise ValidationError on `username`."""
    username = normalize_username(raw) if isinstance(raw, str) else ""
    if not username or len(username) > MAX_USERNAME_CHARS:
        raise ValidationError(f"用户名需为 1 到 {MAX_USERNAME_CHARS} 个字符。", field="username")
    # Officers read usernames, and an invisible character could make one look like another's.
    if has_hidden_characters(username):
        raise ValidationError("用户名中含有不可见的字符或控制字符，请删除后重新输入。", field="username")
    return username


def check_new_password(password: object, *, min_chars: int) -> str:
    """Return a new account's password if it has min_chars to MAX_PASSWORD_CHARS characters."""
    if not isinstance(password, str) or not min_chars <= len(password) <= MAX_PASSWORD_CHARS:
        raise ValidationError(f"密码需为 {min_chars} 到 {MAX_PASSWORD_CHARS} 个字符。", field="password")
    return password


async def find_by_username(username: str) -> User | None:
    """Find the account of a normalised username, ignoring case.

    The exact spelling is tried first, through the column's unique index. Only a miss compares
    without case, which scans the users table.
    NOTE: that comparison is SQL UPPER(), which folds only ASCII letters in SQLite but all
    letters in PostgreSQL, so non-ASCII usernames match case-insensitively only on PostgreSQL.
    """
    user = await User.get_or_none(username=username)
    if user is not None:
        return user
    matches = await User.filter(username__iexact=username).order_by("id").limit(2)
    if len(matches) > 1:
        # Accounts created before usernames ignored case, or by two officers at the same moment,
        # may differ only in case. Neither is picked, because it could be the wrong person's.
        user_ids = [match.id for match in matches]
        log.warning("username matches several accounts by case, login rejected user_ids=%s", user_ids)
        return None
    return matches[0] if matches else None


async def username_taken(username: str) -> bool:
    """Check whether an account already has this normalised username in any case."""
    return await User.filter(username__iexact=username).exists()


# Failed passwords allowed per (username, client network) in the window. Counting them per
# network means a client that guesses wrong locks only itself out, never the owner elsewhere.
PASSWORD_FAILURES_PER_NETWORK = 10
PASSWORD_FAILURE_WINDOW_S = 15 * 60
# Failed passwords allowed per username from all networks together. It is ten times the
# per-network limit over four times the window, so it only slows a guesser who spreads out over
# many networks. Reaching it still locks the owner out until the oldest failure leaves the hour.
PASSWORD_FAILURES_PER_USERNAME = 100
PASSWORD_USERNAME_WINDOW_S = 60 * 60
_NETWORK_SCOPE = "password-login-user-network"
_USERNAME_SCOPE = "password-login-user"


@dataclass(frozen=True)
class _PasswordAttempt:
    """The two rate-limit hits that one password attempt reserves."""

    username: str  # the casefolded username, the identity of the per-username limit
    network_identity: str  # the identity of the per-network limit
    network_member: str
    username_member: str


async def _reserve_password_attempt(client: redis.Redis, username: str, network_identity: str) -> _PasswordAttempt:
    """Take a slot of both password limits before the password is verified, or raise
    RateLimitExceeded.

    The slot is taken first, in one Lua script per limit, so concurrent wrong passwords cannot
    all pass a check before any failure is recorded. A request turned away by the username limit
    gives its network slot back, because no password was verified for it.
    """
    network_member = await rate_limit.reserve(
        client, _NETWORK_SCOPE, network_identity, PASSWORD_FAILURES_PER_NETWORK, PASSWORD_FAILURE_WINDOW_S
    )
    try:
        username_member = await rate_limit.reserve(
            client, _USERNAME_SCOPE, username, PASSWORD_FAILURES_PER_USERNAME, PASSWORD_USERNAME_WINDOW_S
        )
    except rate_limit.RateLimitExceeded:
        await rate_limit.refund(client, _NETWORK_SCOPE, network_identity, network_member)
        raise
    return _PasswordAttempt(username, network_identity, network_member, username_member)


async def _refund_password_attempt(client: redis.Redis, attempt: _PasswordAttempt) -> None:
    await rate_limit.refund(client, _NETWORK_SCOPE, attempt.network_identity, attempt.network_member)
    await rate_limit.refund(client, _USERNAME_SCOPE, attempt.username, attempt.username_member)


async def login_with_password(
    services: Services, username: str, password: str, *, client_network: str
) -> tuple[str, User]:
    """Check a password login and return a new token with its user.

    `client_network` is rate_limit.client_network() of the request. Every attempt takes a slot
    of the limits before its password is verified, and a correct password gives the slot back,
    so only failures count and successful logins never add up to a lockout. An attempt that
    fails with a server error keeps its slot.
    """
    username = normalize_username(username)
    # Nothing longer can have been stored, so it is a wrong login and is not worth a hash.
    if not username or len(username) > MAX_USERNAME_CHARS or len(password) > MAX_PASSWORD_CHARS:
        raise InvalidCredentials(field="password")
    # Usernames match without case, so failures under any spelling count toward one limit.
    limited_name = username.casefold()
    # JSON keeps the pair unambiguous whatever characters the username contains.
    network_identity = json.dumps([limited_name, client_network])
    attempt = await _reserve_password_attempt(services.redis, limited_name, network_identity)

    user = await find_by_username(username)
    if user is None or not user.password_hash:
        await _verify_password(_DUMMY_HASH, password)
        raise InvalidCredentials(field="password")
    if not await _verify_password(user.password_hash, password):
        log.info("password login failed user_id=%s", user.id)
        raise InvalidCredentials(field="password")

    await _refund_password_attempt(services.redis, attempt)
    token = await issue_token(services.redis, user.id, services.settings.token_ttl_s)
    log.info("password login user_id=%s", user.id)
    return token, user


async def ensure_officer(username: str, password: str) -> User:
    """Create the civil-affairs officer account, or reset its password and role.

    The account is found the way a login finds it, so its username is normalised and matched
    without case. Settings checks the password's minimum length for APP_ENV=prod.
    """
    username = parse_new_username(username)
    password = check_new_password(password, min_chars=1)
    password_hash = await hash_password(password)
    user = await find_by_username(username)
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
