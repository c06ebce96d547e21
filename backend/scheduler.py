"""The background loops that expire offers, widen searches and send notifications.

Every API process runs them, but only the holder of a Redis lease does the work, so several
Sanic workers or hosts do each step once. The steps are also safe to run twice (see
backend.dispatch), so a lease that lapses while its holder is still busy costs only time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import redis.asyncio as redis
from redis.exceptions import RedisError
from tortoise.exceptions import BaseORMException

from backend import dispatch, notifications, outbox
from backend.context import Services

log = logging.getLogger(__name__)

LEASE_KEY = "linli:scheduler:lease"
LEASE_TTL_MS = 15_000

# Extend the lease only while this process still holds it.
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, client: redis.Redis, key: str = LEASE_KEY, ttl_ms: int = LEASE_TTL_MS):
        self._redis = client
        self._key = key
        self._ttl_ms = ttl_ms
        self._token = secrets.token_hex(16)
        self._renew = client.register_script(_RENEW_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._held_until = 0.0  # time.monotonic() until which this process surely holds the lease

    async def acquire(self) -> bool:
        """Take the lease, or keep it when this process already holds it."""
        started_at = time.monotonic()
        held = bool(await self._renew(keys=[self._key], args=[self._token, self._ttl_ms]))
        if not held:
            held = bool(await self._redis.set(self._key, self._token, nx=True, px=self._ttl_ms))
        # Counted from before the call, so a slow reply cannot stretch the lease past Redis's.
        self._held_until = started_at + self._ttl_ms / 1000 if held else 0.0
        return held

    @property
    def held(self) -> bool:
        return time.monotonic() < self._held_until

    async def release(self) -> None:
        self._held_until = 0.0
        await self._release(keys=[self._key], args=[self._token])


async def _move_requests_on(services: Services) -> dict[str, int]:
    return {
        # Index changes go first, so a recovered index is current before matching retries.
        "index_changes_applied": await outbox.apply_pending(services),
        "requests_advanced": await dispatch.advance_exhausted(services),
        "stalled_retried": await dispatch.retry_stalled(services),
    }


async def _expire(services: Services) -> dict[str, int]:
    return {"offers_expired": await dispatch.expire_due_offers()}


async def _send_notifications(services: Services) -> dict[str, int]:
    return {"notifications_sent": await notifications.deliver_due(services)}


async def run_once(services: Services) -> dict[str, int]:
    """Run every step once, in order; returns how much each one did."""
    return await _expire(services) | await _move_requests_on(services) | await _send_notifications(services)


async def _step(name: str, step, services: Services) -> None:
    try:
        done = await step(services)
    except (RedisError, BaseORMException, OSError) as exc:
        # Redis or the database is down: log it and try again at the next tick.
        log.error("scheduler step failed step=%s: %s: %s", name, type(exc).__name__, exc)
        return
    if any(done.values()):
        log.info("scheduler step %s", " ".join(f"{k}={v}" for k, v in done.items()))


async def _expire_and_keep_lease(services: Services, lease: Lease, interval_s: float) -> None:
    while True:
        try:
            held = await lease.acquire()
        except RedisError as exc:
            log.error("scheduler lease failed: %s: %s", type(exc).__name__, exc)
            held = False
        if held:
            await _step("expire", _expire, services)
        await asyncio.sleep(interval_s)


async def _while_leased(name: str, step, services: Services, lease: Lease, interval_s: float) -> None:
    while True:
        if lease.held:
            await _step(name, step, services)
        await asyncio.sleep(interval_s)


async def run_forever(services: Services, interval_s: float) -> None:
    """Run the steps while this process holds the lease, until cancelled.

    Three loops share the lease. Expiring offers is one UPDATE, so it runs on every tick. Moving
    requests on (a search each) and sending notifications (a WeChat call each) can take many
    ticks under load, so each has a loop of its own and neither delays expiry.
    """
    lease = Lease(services.redis)
    loops = [
        asyncio.create_task(_expire_and_keep_lease(services, lease, interval_s)),
        asyncio.create_task(_while_leased("move_on", _move_requests_on, services, lease, interval_s)),
        asyncio.create_task(_while_leased("notify", _send_notifications, services, lease, interval_s)),
    ]
    try:
        await asyncio.gather(*loops)
    except asyncio.CancelledError:
        log.info("scheduler stopped")
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        try:
            await lease.release()
        except RedisError:
            pass
