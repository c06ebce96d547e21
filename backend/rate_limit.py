"""Sliding-window rate limits kept in Redis, shared by every API process.

Each (scope, identity) pair has one sorted set whose members are the allowed hits and whose
scores are their times in milliseconds. One Lua script drops the hits older than the window,
counts the rest and adds the new hit, so concurrent callers cannot both take the last slot.
Rejected hits are not recorded, so a client that keeps retrying is let through again as soon
as its oldest allowed hit leaves the window.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import math
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.exceptions import RedisError

from backend import clock
from backend.errors import DomainError, RateLimited

log = logging.getLogger(__name__)

KEY_PREFIX = "linli:rate:"
# One subscriber is usually given a whole IPv6 /64, so limits apply to the prefix and not to
# each of its addresses, which the client can change at will.
IPV6_PREFIX_LENGTH = 64
UNKNOWN_CLIENT = "unknown"

# KEYS[1]: sorted set of hits. ARGV: now in ms, window in ms, limit, and a unique member for
# this hit. Returns 0 when the hit is allowed and recorded, else the milliseconds until one
# would be.
_HIT_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
    redis.call('ZADD', KEYS[1], now, ARGV[4])
    redis.call('PEXPIRE', KEYS[1], window)
    return 0
end
-- After a lowered limit the set may hold more hits than the limit, so the hit that has to
-- leave the window is the (count - limit + 1)-th oldest, not always the oldest.
local blocking = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return math.max(1, tonumber(blocking[2]) + window - now)
"""


def wait_phrase(seconds: int) -> str:
    """Say a wait in seconds under a minute, else in whole minutes rounded up, such as "60 分钟"."""
    if seconds < 60:
        return f"{seconds} 秒"
    return f"{math.ceil(seconds / 60)} 分钟"


class RateLimitExceeded(RateLimited):
    code = "rate_limited"

    def __init__(self, retry_after_s: int, *, scope: str):
        super().__init__(f"操作太频繁，请 {wait_phrase(retry_after_s)}后再试。")
        self.retry_after_s = retry_after_s
        self.scope = scope


def _unique_member(now_ms: int) -> str:
    # Unique, so two hits in the same millisecond both count.
    return f"{now_ms}:{secrets.token_hex(6)}"


def _key(scope: str, identity: str) -> str:
    # Identities may be phone numbers, openids or user ids, so only a digest goes into Redis.
    # NOTE: an unkeyed SHA-256 of a small space (IPv4 addresses, phone numbers) can be reversed
    # by trying every value, so the digest only keeps raw values out of casual reads of a dump.
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}{scope}:{digest}"


async def _run(client: redis.Redis, scope: str, identity: str, limit: int, window_s: int) -> str:
    """Check the limit and add a hit. Return the hit's member."""
    if limit < 1 or window_s < 1:
        raise ValueError(f"limit and window_s must be at least 1, got limit={limit} window_s={window_s}")

    now_ms = int(clock.now().timestamp() * 1000)
    member = _unique_member(now_ms)
    wait_ms = await client.eval(_HIT_SCRIPT, 1, _key(scope, identity), now_ms, window_s * 1000, limit, member)
    if not wait_ms:
        return member

    # A hit recorded by a host whose clock ran ahead would give a wait longer than the window.
    retry_after_s = min(window_s, max(1, math.ceil(int(wait_ms) / 1000)))
    log.info("rate limit exceeded scope=%s limit=%d window_s=%d retry_after_s=%d", scope, limit, window_s, retry_after_s)
    raise RateLimitExceeded(retry_after_s, scope=scope)


async def hit(client: redis.Redis, scope: str, identity: str, limit: int, window_s: int) -> None:
    """Record one hit of `identity` in `scope`, or raise RateLimitExceeded if `limit` hits
    were already allowed in the last `window_s` seconds.

    Times come from backend.clock, so tests can move them, and every API host must keep its
    clock in sync (NTP) because the hits of all hosts share one window.
    """
    await _run(client, scope, identity, limit, window_s)


async def reserve(client: redis.Redis, scope: str, identity: str, limit: int, window_s: int) -> str:
    """Record one hit as hit() does and return its member, which refund() takes to remove it.

    Use it to count only some attempts, such as failed passwords. Reserve before the attempt and
    refund the attempts that turn out not to count. Because the slot is taken before the attempt runs,
    concurrent attempts cannot all pass the limit, as a check followed by a record could.
    """
    return await _run(client, scope, identity, limit, window_s)


async def refund(client: redis.Redis, scope: str, identity: str, member: str) -> None:
    """Remove a hit that reserve() recorded. A Redis failure is logged, and the hit then leaves the
    window on its own."""
    await _remove_hit(client, scope, identity, member)


@contextlib.asynccontextmanager
async def hit_unless_rejected(
    client: redis.Redis, scope: str, identity: str, limit: int, window_s: int
) -> AsyncIterator[None]:
    """Record one hit as hit() does before the block runs, and remove it again when the block
    raises a client error (a DomainError with a 4xx status).

    Taking the hit first means concurrent callers cannot all pass a check before any of them
    records, and removing it means input that the service rejects uses up no slot. The block
    must raise client errors only before its work takes effect. A server error or a cancelled
    task keeps the hit, because the work may have been done before it failed.
    """
    member = await _run(client, scope, identity, limit, window_s)
    try:
        yield
    except DomainError as error:
        if error.status < 500:
            await _remove_hit(client, scope, identity, member)
        raise


async def _remove_hit(client: redis.Redis, scope: str, identity: str, member: str) -> None:
    try:
        await client.zrem(_key(scope, identity), member)
    except RedisError as error:
        # Keep the caller's own error. The hit leaves the window on its own.
        log.warning("rate limit hit not removed scope=%s error=%s", scope, type(error).__name__)


def client_ip(request) -> str:
    """Return the IP address of the client that sent `request` (a sanic.Request).

    request.remote_addr is non-empty only when Sanic trusts a reverse proxy, which it does once
    one of the settings FORWARDED_SECRET, REAL_IP_HEADER or PROXIES_COUNT is configured. Then it
    is the address that proxy reports. Otherwise request.ip, the TCP peer, is the client.
    Behind a proxy that Sanic does not trust, every client therefore shares the proxy's address.
    """
    return request.remote_addr or request.ip or UNKNOWN_CLIENT


def client_network(request) -> str:
    """Return the identity for per-IP limits: the IPv4 address, or the IPv6 /64 prefix.

    IPv4-mapped IPv6 addresses count as IPv4. A value that is no IP address (a UNIX socket
    name, or whatever a proxy wrote) is returned unchanged.
    """
    raw = client_ip(request).strip("[]")
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX_LENGTH}", strict=False))
    return str(address)
