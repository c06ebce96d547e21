"""Idempotency keys: a POST retried with the same Idempotency-Key header runs only once.

Residents on weak mobile networks resend a request when the response is slow, and press a button
twice. The mini-program sends one random Idempotency-Key per user action and the same key on
each retry of it. The first request runs the handler; its response is stored in Redis for
RECORD_TTL_S and later requests with that key get the stored bytes back.

One Redis string per (scope, user, key) moves through two states:

    in_progress  set with SET NX before the handler runs, so only one request runs it. It
                 expires after IN_PROGRESS_TTL_S in case the process dies meanwhile.
    done         the stored response: status, content type and body

A request whose key is in_progress gets 409 idempotency_in_progress. A request whose method,
path, query or body differ from those of the first request gets 422 idempotency_key_reused. JSON
bodies are compared after serialising them again with sorted keys, so key order and spacing
make no difference.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import logging
import secrets
from functools import wraps

import redis.asyncio as redis
from redis.exceptions import RedisError
from sanic import Request
from sanic.response import HTTPResponse

from backend.errors import Conflict, DomainError, ValidationError

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 128
KEY_PREFIX = "linli:idempotency:"
RECORD_TTL_S = 24 * 3600
# Sanic cancels a response after RESPONSE_TIMEOUT, 60 s by default, so a handler still running
# after this long is rare. The marker must expire on its own when the process dies mid-request.
IN_PROGRESS_TTL_S = 60
# Statuses that mean "try again later": the retry must run the handler again, so they are not
# stored. Every status of 500 and above is treated the same way.
RETRY_LATER_STATUSES = frozenset({408, 429})

_STATE_IN_PROGRESS = "in_progress"
_STATE_DONE = "done"

# KEYS[1]: the record. ARGV[1]: our in_progress marker. ARGV[2]: the done record. ARGV[3]: TTL.
# The record is written only while the key still contains our marker, or nothing after the
# marker expired, so a slow request never overwrites the record of a later one.
_STORE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
    return 1
end
return 0
"""
# KEYS[1]: the record. ARGV[1]: our in_progress marker, deleted only if it is still there.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class InvalidIdempotencyKey(ValidationError):
    code = "invalid_idempotency_key"
    message = "请求头 Idempotency-Key 应为 1 到 128 个可打印的 ASCII 字符。"


class IdempotencyKeyReused(DomainError):
    status = 422
    code = "idempotency_key_reused"
    message = "该请求编号已用于另一项不同的提交，请刷新页面后重新操作。"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    message = "上一次提交仍在处理中，请稍候刷新查看结果。"
    retry_after_s = 1


def _validate_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all(" " <= char <= "~" for char in key):
        raise InvalidIdempotencyKey(field=IDEMPOTENCY_HEADER)


def _record_key(scope: str, user_id: int, key: str) -> str:
    # The client picks the key, so a digest keeps colons and odd characters out of Redis keys.
    return f"{KEY_PREFIX}{scope}:{user_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def _canonical_body(body: bytes) -> bytes:
    """Return the bytes that stand for `body` in the fingerprint, behind a tag for its kind.

    A JSON body is parsed and serialised again with sorted keys and no spaces, because a client
    that serialises the same object again may order its keys or space them differently. Any other
    body is kept as sent.
    """
    try:
        parsed = json.loads(body)
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        # Not JSON, or nested deeper than the parser and the encoder can follow.
        return b"raw:" + body
    return b"json:" + canonical.encode()


def _fingerprint(request: Request) -> str:
    body_digest = hashlib.sha256(_canonical_body(request.body or b"")).hexdigest()
    parts = (request.method, request.path, request.query_string, body_digest)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _is_storable(status: int) -> bool:
    return status < 500 and status not in RETRY_LATER_STATUSES


async def _claim(client: redis.Redis, record_key: str, marker: str) -> dict | None:
    """Store `marker` unless the key has a record. Return that record, or None once `marker` is stored."""
    # Two attempts: the record can expire between the failed SET and the GET.
    for _ in range(2):
        if await client.set(record_key, marker, nx=True, ex=IN_PROGRESS_TTL_S):
            return None
        raw = await client.get(record_key)
        if raw is not None:
            return json.loads(raw)
    raise IdempotencyInProgress()


def _replay(record: dict, fingerprint: str) -> HTTPResponse:
    """Return the stored response of a done record, or raise for a mismatch or a running request."""
    if record["fingerprint"] != fingerprint:
        raise IdempotencyKeyReused(field=IDEMPOTENCY_HEADER)
    if record["state"] != _STATE_DONE:
        raise IdempotencyInProgress()
    return HTTPResponse(
        body=base64.b64decode(record["body"]),
        status=record["status"],
        content_type=record["content_type"],
        headers={REPLAYED_HEADER: "true"},
    )


async def _release(client: redis.Redis, record_key: str, marker: str) -> None:
    try:
        await client.eval(_RELEASE_SCRIPT, 1, record_key, marker)
    except RedisError as error:
        # The marker expires after IN_PROGRESS_TTL_S, and the caller's own error matters more.
        log.error("idempotency marker not released, it expires in %d s: %s: %s",
                  IN_PROGRESS_TTL_S, type(error).__name__, error)


async def _store(client: redis.Redis, record_key: str, marker: str, fingerprint: str, response: HTTPResponse) -> None:
    record = {
        "state": _STATE_DONE,
        "fingerprint": fingerprint,
        "status": response.status,
        "content_type": response.content_type,
        "body": base64.b64encode(response.body or b"").decode("ascii"),
    }
    try:
        await client.eval(_STORE_SCRIPT, 1, record_key, marker, json.dumps(record), RECORD_TTL_S)
    except RedisError as error:
        # The handler's work is done and the client gets its response. A retry gets 409 until
        # the marker expires and then runs the handler again.
        log.error("idempotent response not stored status=%s: %s: %s", response.status, type(error).__name__, error)


async def _render_error(request: Request, error: DomainError) -> HTTPResponse:
    """Render `error` exactly as the app's error handler would have."""
    response = request.app.error_handler.response(request, error)
    if inspect.isawaitable(response):
        response = await response
    return response


async def _run_and_store(handler, request: Request, args, kwargs, client: redis.Redis,
                         record_key: str, marker: str, fingerprint: str):
    """Run the handler, then store its response, or release the marker when it must not be stored.

    A DomainError with a status that _is_storable accepts is rendered here, through the app's
    error handler, and stored like a normal response, so a replay gets the same 4xx response.
    Any other exception releases the marker and propagates to the error handler as usual.
    """
    try:
        response = await handler(request, *args, **kwargs)
    except DomainError as error:
        if not _is_storable(error.status):
            await _release(client, record_key, marker)
            raise
        response = await _render_error(request, error)
    except BaseException:
        await _release(client, record_key, marker)
        raise

    # A streaming response (sanic.response.ResponseStream) has no body to store.
    if not isinstance(response, HTTPResponse) or not _is_storable(response.status):
        await _release(client, record_key, marker)
        return response

    await _store(client, record_key, marker, fingerprint, response)
    return response


def _log_orphan_failure(work: asyncio.Task) -> None:
    # No caller awaits the handler task once its client is gone, so its error would otherwise go unlogged.
    if not work.cancelled() and work.exception() is not None:
        error = work.exception()
        log.error("idempotent handler failed after its client was gone: %s: %s", type(error).__name__, error)


def idempotent(scope: str):
    """Make a handler honour the Idempotency-Key header. A request without one runs as usual.

    Place it under @authenticated(), which sets request.ctx.user, because keys are per user
    and per `scope`. So two users, or two endpoints, never share a key.

    The handler runs in its own task, shielded from cancellation. Sanic cancels a handler when
    the client disconnects, and on a weak network that often happens after the row was written.
    The shield lets the handler finish and store its response, so the retry gets that response
    instead of creating a second row.
    """

    def decorator(handler):
        @wraps(handler)
        async def wrapper(request: Request, *args, **kwargs):
            key = request.headers.get(IDEMPOTENCY_HEADER)
            if key is None:
                return await handler(request, *args, **kwargs)
            _validate_key(key)

            client = request.app.ctx.services.redis
            user_id = request.ctx.user.id
            record_key = _record_key(scope, user_id, key)
            fingerprint = _fingerprint(request)
            marker = json.dumps(
                {"state": _STATE_IN_PROGRESS, "fingerprint": fingerprint, "owner": secrets.token_hex(8)}
            )

            record = await _claim(client, record_key, marker)
            if record is not None:
                response = _replay(record, fingerprint)
                log.info("idempotent replay scope=%s user_id=%s status=%s", scope, user_id, response.status)
                return response

            work = asyncio.ensure_future(
                _run_and_store(handler, request, args, kwargs, client, record_key, marker, fingerprint)
            )
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                log.info("client gone, idempotent handler left running scope=%s user_id=%s", scope, user_id)
                work.add_done_callback(_log_orphan_failure)
                raise

        return wrapper

    return decorator
