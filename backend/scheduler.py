"""The background loop that expires offers, widens searches and sends notifications.

Every API process runs one, but only the holder of a Redis lease does the work, so several
Sanic workers or hosts do each step once. The steps are also safe to run twice (see
backend.dispatch), so a lease that lapses while its holder is still busy costs only time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

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

    async def acquire(self) -> bool:
        """Take the lease, or keep it when this process already holds it."""
        if await self._renew(keys=[self._key], args=[self._token, self._ttl_ms]):
            return True
        return bool(await self._redis.set(self._key, self._token, nx=True, px=self._ttl_ms))

    async def release(self) -> None:
        await self._release(keys=[self._key], args=[self._token])


async def run_once(services: Services) -> dict[str, int]:
    """Run every step once; returns how much each one did."""
    return {
        # Index changes go first, so a recovered index is current before matching retries.
        "index_changes_applied": await outbox.apply_pending(services),
        "offers_expired": await dispatch.expire_offers(services),
        "stalled_retried": await dispatch.retry_stalled(services),
        "notifications_sent": await notifications.deliver_due(services),
    }


async def run_forever(services: Services, interval_s: float) -> None:
    lease = Lease(services.redis)
    try:
        while True:
            try:
                if await lease.acquire():
                    done = await run_once(services)
                    if any(done.values()):
                        log.info("scheduler step %s", " ".join(f"{k}={v}" for k, v in done.items()))
            except (RedisError, BaseORMException, OSError) as exc:
                # Redis or the database is down: log it and try again at the next tick.
                log.error("scheduler step failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(interval_s)
    finally:
        try:
            await lease.release()
        except RedisError:
            pass
