"""Sliding-window rate limits in the real Redis-protocol server, and the 429s of the API."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from sanic import Request, Sanic
from sanic.response import json

from backend import clock, rate_limit
from backend.models import ServiceRequest
from backend.rate_limit import RateLimitExceeded
from tests.conftest import fresh_code
from tests.factories import login_resident, make_city, request_body

START = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def _advance(seconds: float) -> None:
    clock.freeze(clock.now() + timedelta(seconds=seconds))


async def _hit_outcome(client, scope: str, identity: str, limit: int, window_s: int) -> int | None:
    """Hit once; return None when allowed, else the Retry-After in seconds."""
    try:
        await rate_limit.hit(client, scope, identity, limit, window_s)
    except RateLimitExceeded as error:
        return error.retry_after_s
    return None


def _app_with(services, **limits):
    from miniprogram_api.app import create_app

    settings = dataclasses.replace(services.settings, **limits)
    return create_app(services=dataclasses.replace(services, settings=settings))


async def test_hit_allows_limit_then_rejects(services):
    clock.freeze(START)
    outcomes = [await _hit_outcome(services.redis, "test", "user-1", 3, 60) for _ in range(4)]
    assert outcomes == [None, None, None, 60]


async def test_hit_error_is_429_envelope(services):
    clock.freeze(START)
    await rate_limit.hit(services.redis, "test", "user-1", 1, 60)
    with pytest.raises(RateLimitExceeded) as caught:
        await rate_limit.hit(services.redis, "test", "user-1", 1, 60)
    assert caught.value.status == 429
    assert caught.value.code == "rate_limited"
    assert "1 分钟" in caught.value.message
    assert caught.value.to_envelope()["error"]["code"] == "rate_limited"


async def test_hit_resets_after_window(services):
    clock.freeze(START)
    for _ in range(2):
        await rate_limit.hit(services.redis, "test", "user-1", 2, 60)

    _advance(59)
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) == 1
    _advance(1)
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) is None


async def test_hit_window_slides(services):
    clock.freeze(START)
    await rate_limit.hit(services.redis, "test", "user-1", 2, 60)
    _advance(30)
    await rate_limit.hit(services.redis, "test", "user-1", 2, 60)

    _advance(15)
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) == 15
    # At 60 s the first hit leaves the window, but the one at 30 s still counts.
    _advance(15)
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) is None
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) == 30


async def test_hit_rejections_not_counted(services):
    clock.freeze(START)
    await rate_limit.hit(services.redis, "test", "user-1", 1, 10)
    for _ in range(5):
        _advance(1)
        assert await _hit_outcome(services.redis, "test", "user-1", 1, 10) is not None
    _advance(5)
    assert await _hit_outcome(services.redis, "test", "user-1", 1, 10) is None


async def test_hit_retry_after_rounds_up(services):
    clock.freeze(START)
    await rate_limit.hit(services.redis, "test", "user-1", 1, 10)
    _advance(8.5)
    assert await _hit_outcome(services.redis, "test", "user-1", 1, 10) == 2


async def test_hit_lowered_limit_waits_for_right_hit(services):
    clock.freeze(START)
    for _ in range(4):
        await rate_limit.hit(services.redis, "test", "user-1", 4, 60)
        _advance(10)
    # The hits were at 0, 10, 20 and 30 s. At 40 s a limit of 2 needs the hits at 0, 10 and
    # 20 s to leave the window, and the last of them leaves it at 80 s.
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) == 40


async def test_hit_identities_and_scopes_separate(services):
    clock.freeze(START)
    await rate_limit.hit(services.redis, "test", "user-1", 1, 60)
    assert await _hit_outcome(services.redis, "test", "user-2", 1, 60) is None
    assert await _hit_outcome(services.redis, "other", "user-1", 1, 60) is None
    assert await _hit_outcome(services.redis, "test", "user-1", 1, 60) == 60


async def test_hit_concurrent_allows_exactly_limit(services):
    clock.freeze(START)
    outcomes = await asyncio.gather(
        *(_hit_outcome(services.redis, "test", "user-1", 5, 60) for _ in range(30))
    )
    assert outcomes.count(None) == 5
    assert len(outcomes) - outcomes.count(None) == 25


async def test_refund_frees_reserved_slot(services):
    clock.freeze(START)
    first = await rate_limit.reserve(services.redis, "test", "user-1", 2, 60)
    await rate_limit.reserve(services.redis, "test", "user-1", 2, 60)
    with pytest.raises(RateLimitExceeded):
        await rate_limit.reserve(services.redis, "test", "user-1", 2, 60)

    await rate_limit.refund(services.redis, "test", "user-1", first)

    assert await rate_limit.reserve(services.redis, "test", "user-1", 2, 60)
    assert await _hit_outcome(services.redis, "test", "user-1", 2, 60) == 60


async def test_hit_key_hashed_and_expires(services):
    phone = "13800138000"
    await rate_limit.hit(services.redis, "test", phone, 5, 60)
    keys = [key async for key in services.redis.scan_iter(match=f"{rate_limit.KEY_PREFIX}*")]
    assert len(keys) == 1
    assert phone not in keys[0]
    assert 0 < await services.redis.pttl(keys[0]) <= 60_000


@pytest.mark.parametrize(("limit", "window_s"), [(0, 60), (5, 0), (-1, 60)])
async def test_hit_rejects_bad_arguments(services, limit, window_s):
    with pytest.raises(ValueError):
        await rate_limit.hit(services.redis, "test", "user-1", limit, window_s)


def _address_app(**proxy_config) -> Sanic:
    app = Sanic("rate_limit_addresses")
    app.config.update(proxy_config)

    @app.get("/address")
    async def address(request: Request):
        return json({"ip": rate_limit.client_ip(request), "network": rate_limit.client_network(request)})

    return app


@pytest.mark.parametrize(
    ("forwarded_for", "network"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.9", "198.51.100.9"),
    ],
)
async def test_client_network_behind_trusted_proxy(forwarded_for, network):
    app = _address_app(PROXIES_COUNT=1)
    _, response = await app.asgi_client.get("/address", headers={"X-Forwarded-For": forwarded_for})
    assert response.json["network"] == network


async def test_client_ip_ignores_untrusted_forwarded_for():
    app = _address_app()
    _, response = await app.asgi_client.get("/address", headers={"X-Forwarded-For": "203.0.113.7"})
    # sanic-testing's ASGI client connects as the host "mockserver".
    assert response.json["ip"] == "mockserver"
    assert response.json["network"] == "mockserver"


async def test_client_ip_from_real_ip_header():
    app = _address_app(REAL_IP_HEADER="x-real-ip")
    _, response = await app.asgi_client.get("/address", headers={"X-Real-IP": "198.51.100.20"})
    assert response.json["ip"] == "198.51.100.20"


async def test_login_limited_per_ip(services):
    clock.freeze(START)
    client = _app_with(services, rate_login_per_ip_per_min=3).asgi_client
    for _ in range(3):
        _, allowed = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})
        assert allowed.status == 200

    _, rejected = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})

    assert rejected.status == 429
    assert rejected.json["error"]["code"] == "rate_limited"
    assert rejected.headers["retry-after"] == "60"


async def test_login_limit_resets_after_window(services):
    clock.freeze(START)
    client = _app_with(services, rate_login_per_ip_per_min=2).asgi_client
    for _ in range(2):
        await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})

    _advance(59)
    _, early = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})
    _advance(1)
    _, later = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})

    assert early.status == 429
    assert early.headers["retry-after"] == "1"
    assert later.status == 200


async def test_password_login_shares_login_budget(services):
    clock.freeze(START)
    client = _app_with(services, rate_login_per_ip_per_min=2).asgi_client
    _, wechat = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("limited")})
    _, wrong = await client.post("/api/v1/auth/password-login", json={"username": "nobody", "password": "guess"})
    _, limited = await client.post("/api/v1/auth/password-login", json={"username": "nobody", "password": "guess"})

    assert wechat.status == 200
    assert wrong.status == 401
    assert limited.status == 429
    assert limited.headers["retry-after"] == "60"


async def test_create_limited_per_user(services):
    await make_city()
    clock.freeze(START)
    client = _app_with(services, rate_requests_per_user_per_hour=2).asgi_client
    alice, _ = await login_resident(client, "alice")
    bob, _ = await login_resident(client, "bob")
    for _ in range(2):
        _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=alice)
        assert created.status == 201

    _, limited = await client.post("/api/v1/service-requests", json=request_body(), headers=alice)
    _, other_user = await client.post("/api/v1/service-requests", json=request_body(), headers=bob)

    assert limited.status == 429
    assert limited.headers["retry-after"] == "3600"
    assert other_user.status == 201


async def test_create_concurrent_allows_exactly_limit(services):
    await make_city()
    clock.freeze(START)
    limit = 5
    client = _app_with(services, rate_requests_per_user_per_hour=limit).asgi_client
    alice, _ = await login_resident(client, "alice")

    responses = await asyncio.gather(
        *(client.post("/api/v1/service-requests", json=request_body(), headers=alice) for _ in range(limit + 10))
    )

    statuses = [response.status for _, response in responses]
    assert statuses.count(201) == limit
    assert statuses.count(429) == 10
    assert await ServiceRequest.all().count() == limit


async def test_create_rejected_forms_not_counted(services):
    await make_city()
    clock.freeze(START)
    client = _app_with(services, rate_requests_per_user_per_hour=2).asgi_client
    alice, _ = await login_resident(client, "alice")
    for bad_body in (request_body(category="gardening"), request_body(point=(39.9042, 116.4074)), [1, 2]):
        _, rejected = await client.post("/api/v1/service-requests", json=bad_body, headers=alice)
        assert rejected.status == 400

    statuses = []
    for _ in range(3):
        _, response = await client.post("/api/v1/service-requests", json=request_body(), headers=alice)
        statuses.append(response.status)

    assert statuses == [201, 201, 429]


async def test_create_limited_per_ip(services):
    await make_city()
    clock.freeze(START)
    client = _app_with(services, rate_requests_per_ip_per_hour=2).asgi_client
    alice, _ = await login_resident(client, "alice")
    bob, _ = await login_resident(client, "bob")
    _, first = await client.post("/api/v1/service-requests", json=request_body(), headers=alice)
    _advance(600)
    _, second = await client.post("/api/v1/service-requests", json=request_body(), headers=bob)
    _, limited = await client.post("/api/v1/service-requests", json=request_body(), headers=bob)

    assert first.status == 201
    assert second.status == 201
    assert limited.status == 429
    assert limited.headers["retry-after"] == "3000"

    _advance(3000)
    _, after_window = await client.post("/api/v1/service-requests", json=request_body(), headers=bob)
    assert after_window.status == 201


async def test_limited_create_not_stored_for_idempotency(services):
    await make_city()
    clock.freeze(START)
    client = _app_with(services, rate_requests_per_user_per_hour=1).asgi_client
    alice, _ = await login_resident(client, "alice")
    await client.post("/api/v1/service-requests", json=request_body(), headers=alice)
    retry_headers = {**alice, "Idempotency-Key": "create-after-limit"}

    _, limited = await client.post("/api/v1/service-requests", json=request_body(), headers=retry_headers)
    _advance(3600)
    _, retried = await client.post("/api/v1/service-requests", json=request_body(), headers=retry_headers)

    assert limited.status == 429
    assert retried.status == 201
    assert "idempotent-replayed" not in retried.headers


@pytest.mark.parametrize(("seconds", "phrase"), [(1, "1 秒"), (59, "59 秒"), (60, "1 分钟"), (61, "2 分钟"), (3584, "60 分钟")])
def test_wait_phrase_minutes_from_one_minute(seconds: int, phrase: str) -> None:
    assert rate_limit.wait_phrase(seconds) == phrase
