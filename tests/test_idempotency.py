"""Safe retries: Idempotency-Key replays, and WeChat logins retried with the same code."""

from __future__ import annotations

import asyncio
import collections
import functools
import json as jsonlib
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from sanic import Request, Sanic
from sanic.response import json

from backend import clock
from backend.accounts import LOGIN_RETRY_KEY_PREFIX, LOGIN_RETRY_TTL_S
from backend.errors import Conflict, RateLimited
from backend.models import ServiceRequest, User
from miniprogram_api.auth import authenticated
from miniprogram_api.errors import EnvelopeErrorHandler
from miniprogram_api.idempotency import IN_PROGRESS_TTL_S, KEY_PREFIX, RECORD_TTL_S, idempotent
from tests.conftest import fresh_code
from tests.factories import (
    SIMING,
    login_resident,
    make_city,
    make_worker,
    north_of,
    request_body,
    token_for_user,
    worker_headers,
)
from tests.servers import api_processes

BASE = "/api/v1/service-requests"
CONCURRENT_CREATES = 10
WAIT_STEP_S = 0.01
WAIT_LIMIT_S = 5.0


async def _wait_until(condition, description: str) -> None:
    """Poll `condition` (sync or async) until it is true, failing after WAIT_LIMIT_S."""
    for _ in range(int(WAIT_LIMIT_S / WAIT_STEP_S)):
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(WAIT_STEP_S)
    pytest.fail(f"timed out after {WAIT_LIMIT_S} s waiting for {description}")


async def _records(redis) -> dict[str, dict]:
    keys = [key async for key in redis.scan_iter(match=f"{KEY_PREFIX}*")]
    return {key: jsonlib.loads(await redis.get(key)) for key in keys}


def _released_together(barrier: asyncio.Barrier):
    """Hold each request until `barrier` is full, so all reach the next decorator at once."""

    def decorator(handler):
        @functools.wraps(handler)
        async def wrapper(request: Request, *args, **kwargs):
            await asyncio.wait_for(barrier.wait(), timeout=WAIT_LIMIT_S)
            return await handler(request, *args, **kwargs)

        return wrapper

    return decorator


def _test_app(services) -> Sanic:
    """An app whose handlers count their calls and fail in chosen ways."""
    app = Sanic("idempotency_test", error_handler=EnvelopeErrorHandler())
    app.ctx.services = services
    app.ctx.calls = collections.Counter()
    app.ctx.gate = asyncio.Event()
    barrier = asyncio.Barrier(CONCURRENT_CREATES)

    @app.post("/things")
    @authenticated()
    @idempotent("things")
    async def create_thing(request: Request):
        app.ctx.calls["things"] += 1
        number = await services.redis.incr("test:things")
        return json({"number": number, "echo": request.body.decode()}, status=201)

    @app.post("/raced-things")
    @authenticated()
    @_released_together(barrier)
    @idempotent("raced_things")
    async def create_raced_thing(request: Request):
        app.ctx.calls["raced_things"] += 1
        return json({"raced": True}, status=201)

    @app.post("/other-things")
    @authenticated()
    @idempotent("other_things")
    async def create_other_thing(request: Request):
        app.ctx.calls["other_things"] += 1
        return json({"other": True}, status=201)

    @app.post("/slow")
    @authenticated()
    @idempotent("slow")
    async def slow(request: Request):
        app.ctx.calls["slow"] += 1
        await app.ctx.gate.wait()
        return json({"finished": True}, status=201)

    @app.post("/crash")
    @authenticated()
    @idempotent("crash")
    async def crash(request: Request):
        app.ctx.calls["crash"] += 1
        raise RuntimeError("handler crashed on purpose")

    @app.post("/unavailable")
    @authenticated()
    @idempotent("unavailable")
    async def unavailable(request: Request):
        app.ctx.calls["unavailable"] += 1
        return json({"error": {"code": "service_unavailable"}}, status=503)

    @app.post("/conflict")
    @authenticated()
    @idempotent("conflict")
    async def conflict(request: Request):
        app.ctx.calls["conflict"] += 1
        raise Conflict("这件事已经办过了。", code="already_done", field="thing")

    @app.post("/limited")
    @authenticated()
    @idempotent("limited")
    async def limited(request: Request):
        app.ctx.calls["limited"] += 1
        raise RateLimited()

    return app


async def _bearer(services, openid: str) -> dict[str, str]:
    user = await User.create(openid=openid, roles=["resident"])
    return {"Authorization": f"Bearer {await token_for_user(services, user)}"}


@pytest.fixture
async def test_app(services):
    return _test_app(services)


@pytest.fixture
async def alice(services):
    return await _bearer(services, "test-idempotency-alice")


async def test_no_key_runs_every_time(test_app, alice):
    for _ in range(2):
        _, response = await test_app.asgi_client.post("/things", content=b"{}", headers=alice)
        assert response.status == 201
        assert "idempotent-replayed" not in response.headers
    assert test_app.ctx.calls["things"] == 2


async def test_replay_returns_first_response(test_app, alice):
    headers = {**alice, "Idempotency-Key": "key-1"}
    _, first = await test_app.asgi_client.post("/things", content=b'{"n": 1}', headers=headers)
    _, replay = await test_app.asgi_client.post("/things", content=b'{"n": 1}', headers=headers)

    assert first.status == 201
    assert "idempotent-replayed" not in first.headers
    assert replay.status == 201
    assert replay.body == first.body
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert test_app.ctx.calls["things"] == 1


async def test_replay_record_expires_after_a_day(services, test_app, alice):
    await test_app.asgi_client.post("/things", content=b"{}", headers={**alice, "Idempotency-Key": "key-1"})
    [key] = await _records(services.redis)
    assert RECORD_TTL_S - 60 < await services.redis.ttl(key) <= RECORD_TTL_S


DEEP_JSON_BODY = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError at the default limit


@pytest.mark.parametrize(
    ("first_body", "retry_body"),
    [
        (b'{"n": 1, "tags": ["a", "b"]}', b'{"tags":["a","b"],"n":1}'),
        (b'{"n": 1.5, "name": "\\u6797"}', b'{"name": "\xe6\x9e\x97", "n": 1.50}'),
        (b"name=a&n=1", b"name=a&n=1"),
        (DEEP_JSON_BODY, DEEP_JSON_BODY),
    ],
    ids=["reordered-keys", "escaped-text", "same-non-json", "too-deep-json"],
)
async def test_equivalent_body_replays(test_app, alice, first_body, retry_body):
    headers = {**alice, "Idempotency-Key": "key-1"}
    _, first = await test_app.asgi_client.post("/things", content=first_body, headers=headers)
    _, retry = await test_app.asgi_client.post("/things", content=retry_body, headers=headers)

    assert first.status == 201
    assert retry.status == 201
    assert retry.body == first.body
    assert retry.headers["idempotent-replayed"] == "true"
    assert test_app.ctx.calls["things"] == 1


@pytest.mark.parametrize(
    ("first_body", "retry_body"),
    [
        (b'{"n": 1}', b'{"n": 2}'),
        (b'{"n": 1, "tags": ["a", "b"]}', b'{"tags":["b","a"],"n":1}'),
        (b"name=a&n=1", b"n=1&name=a"),
    ],
    ids=["other-value", "reordered-list", "reordered-non-json"],
)
async def test_different_body_rejected(test_app, alice, first_body, retry_body):
    headers = {**alice, "Idempotency-Key": "key-1"}
    await test_app.asgi_client.post("/things", content=first_body, headers=headers)
    _, response = await test_app.asgi_client.post("/things", content=retry_body, headers=headers)

    assert response.status == 422
    assert response.json["error"]["code"] == "idempotency_key_reused"
    assert response.json["error"]["field"] == "Idempotency-Key"
    assert response.json["error"]["message"]
    assert test_app.ctx.calls["things"] == 1


async def test_different_query_rejected(test_app, alice):
    headers = {**alice, "Idempotency-Key": "key-1"}
    await test_app.asgi_client.post("/things", content=b"{}", headers=headers)
    _, response = await test_app.asgi_client.post("/things?copy=2", content=b"{}", headers=headers)
    assert response.status == 422
    assert test_app.ctx.calls["things"] == 1


async def test_same_key_other_scope_runs(test_app, alice):
    headers = {**alice, "Idempotency-Key": "key-1"}
    await test_app.asgi_client.post("/things", content=b"{}", headers=headers)
    _, other = await test_app.asgi_client.post("/other-things", content=b"{}", headers=headers)
    assert other.status == 201
    assert test_app.ctx.calls["other_things"] == 1


async def test_same_key_other_user_runs(services, test_app, alice):
    bob = await _bearer(services, "test-idempotency-bob")
    _, first = await test_app.asgi_client.post("/things", content=b"{}", headers={**alice, "Idempotency-Key": "k"})
    _, second = await test_app.asgi_client.post("/things", content=b"{}", headers={**bob, "Idempotency-Key": "k"})

    assert first.json["number"] == 1
    assert second.json["number"] == 2
    assert "idempotent-replayed" not in second.headers


async def test_key_checked_after_authentication(test_app):
    _, response = await test_app.asgi_client.post("/things", content=b"{}", headers={"Idempotency-Key": "k"})
    assert response.status == 401
    assert test_app.ctx.calls["things"] == 0


async def test_in_progress_conflicts_then_replays(services, test_app, alice):
    headers = {**alice, "Idempotency-Key": "slow-1"}
    first = asyncio.create_task(test_app.asgi_client.post("/slow", content=b"{}", headers=headers))
    await _wait_until(lambda: test_app.ctx.calls["slow"] == 1, "the first request to enter the handler")

    _, during = await test_app.asgi_client.post("/slow", content=b"{}", headers=headers)
    [marker_key] = await _records(services.redis)
    marker_ttl_s = await services.redis.ttl(marker_key)
    test_app.ctx.gate.set()
    _, finished = await first
    _, after = await test_app.asgi_client.post("/slow", content=b"{}", headers=headers)

    assert during.status == 409
    assert during.json["error"]["code"] == "idempotency_in_progress"
    assert during.headers["retry-after"] == "1"
    assert 0 < marker_ttl_s <= IN_PROGRESS_TTL_S
    assert finished.status == 201
    assert after.status == 201
    assert after.body == finished.body
    assert after.headers["idempotent-replayed"] == "true"
    assert test_app.ctx.calls["slow"] == 1


async def test_in_progress_with_other_body_is_reuse(test_app, alice):
    headers = {**alice, "Idempotency-Key": "slow-1"}
    first = asyncio.create_task(test_app.asgi_client.post("/slow", content=b"{}", headers=headers))
    await _wait_until(lambda: test_app.ctx.calls["slow"] == 1, "the first request to enter the handler")

    _, during = await test_app.asgi_client.post("/slow", content=b'{"other": 1}', headers=headers)
    test_app.ctx.gate.set()
    await first

    assert during.status == 422
    assert during.json["error"]["code"] == "idempotency_key_reused"


async def test_client_gone_handler_finishes_and_stores(services, test_app, alice):
    headers = {**alice, "Idempotency-Key": "gone-1"}
    first = asyncio.create_task(test_app.asgi_client.post("/slow", content=b"{}", headers=headers))
    await _wait_until(lambda: test_app.ctx.calls["slow"] == 1, "the first request to enter the handler")

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    test_app.ctx.gate.set()

    async def stored() -> bool:
        return [record["state"] for record in (await _records(services.redis)).values()] == ["done"]

    await _wait_until(stored, "the abandoned handler to store its response")
    _, retry = await test_app.asgi_client.post("/slow", content=b"{}", headers=headers)

    assert retry.status == 201
    assert retry.json == {"finished": True}
    assert retry.headers["idempotent-replayed"] == "true"
    assert test_app.ctx.calls["slow"] == 1


async def test_exception_not_stored(services, test_app, alice):
    headers = {**alice, "Idempotency-Key": "crash-1"}
    statuses = []
    for _ in range(2):
        _, response = await test_app.asgi_client.post("/crash", content=b"{}", headers=headers)
        statuses.append(response.status)

    assert statuses == [500, 500]
    assert test_app.ctx.calls["crash"] == 2
    assert await _records(services.redis) == {}


async def test_5xx_response_not_stored(services, test_app, alice):
    headers = {**alice, "Idempotency-Key": "unavailable-1"}
    for _ in range(2):
        _, response = await test_app.asgi_client.post("/unavailable", content=b"{}", headers=headers)
        assert response.status == 503
        assert "idempotent-replayed" not in response.headers

    assert test_app.ctx.calls["unavailable"] == 2
    assert await _records(services.redis) == {}


async def test_domain_error_stored_and_replayed(test_app, alice):
    headers = {**alice, "Idempotency-Key": "conflict-1"}
    _, first = await test_app.asgi_client.post("/conflict", content=b"{}", headers=headers)
    _, replay = await test_app.asgi_client.post("/conflict", content=b"{}", headers=headers)

    assert first.status == 409
    assert first.json == {"error": {"code": "already_done", "message": "这件事已经办过了。", "field": "thing"}}
    assert replay.status == 409
    assert replay.body == first.body
    assert replay.headers["idempotent-replayed"] == "true"
    assert test_app.ctx.calls["conflict"] == 1


async def test_rate_limited_error_not_stored(services, test_app, alice):
    headers = {**alice, "Idempotency-Key": "limited-1"}
    for _ in range(2):
        _, response = await test_app.asgi_client.post("/limited", content=b"{}", headers=headers)
        assert response.status == 429

    assert test_app.ctx.calls["limited"] == 2
    assert await _records(services.redis) == {}


@pytest.mark.parametrize(
    "key",
    ["", "x" * 129, "键".encode(), "tab\there", "del\x7fhere", "é".encode("latin-1")],
)
async def test_invalid_key_rejected(test_app, alice, key):
    _, response = await test_app.asgi_client.post("/things", content=b"{}", headers={**alice, "Idempotency-Key": key})

    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_idempotency_key"
    assert response.json["error"]["field"] == "Idempotency-Key"
    assert test_app.ctx.calls["things"] == 0


@pytest.mark.parametrize("key", ["x" * 128, "a", "with spaces ~!@#$%^&*()", "550e8400-e29b-41d4-a716-446655440000"])
async def test_valid_key_accepted(test_app, alice, key):
    _, response = await test_app.asgi_client.post("/things", content=b"{}", headers={**alice, "Idempotency-Key": key})
    assert response.status == 201


async def test_concurrent_same_key_runs_once(test_app, alice):
    headers = {**alice, "Idempotency-Key": "burst-1"}
    responses = await asyncio.gather(
        *(test_app.asgi_client.post("/raced-things", content=b"{}", headers=headers) for _ in range(CONCURRENT_CREATES))
    )

    originals = [r for _, r in responses if r.status == 201 and "idempotent-replayed" not in r.headers]
    replays = [r for _, r in responses if r.status == 201 and "idempotent-replayed" in r.headers]
    in_progress = [r for _, r in responses if r.status == 409]
    assert test_app.ctx.calls["raced_things"] == 1
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(in_progress) == CONCURRENT_CREATES
    assert all(replay.body == originals[0].body for replay in replays)
    assert all(r.json["error"]["code"] == "idempotency_in_progress" for r in in_progress)


# The real API routes.


async def test_create_replay_returns_same_request(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    headers = {**resident, "Idempotency-Key": "create-1"}

    _, first = await client.post(BASE, json=request_body(), headers=headers)
    _, replay = await client.post(BASE, json=request_body(), headers=headers)

    assert first.status == 201
    assert replay.status == 201
    assert replay.body == first.body
    assert replay.headers["idempotent-replayed"] == "true"
    assert await ServiceRequest.all().count() == 1


async def test_create_without_key_creates_twice(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    for _ in range(2):
        _, response = await client.post(BASE, json=request_body(), headers=resident)
        assert response.status == 201
    assert await ServiceRequest.all().count() == 2


async def test_create_concurrent_same_key_one_row(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    headers = {**resident, "Idempotency-Key": "create-burst"}

    responses = await asyncio.gather(
        *(client.post(BASE, json=request_body(), headers=headers) for _ in range(CONCURRENT_CREATES))
    )

    statuses = [response.status for _, response in responses]
    created_ids = {response.json["id"] for _, response in responses if response.status == 201}
    assert set(statuses) <= {201, 409}, statuses
    assert len(created_ids) == 1
    assert await ServiceRequest.all().count() == 1


async def test_create_reserialised_body_replays(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    headers = {**resident, "Idempotency-Key": "create-1", "content-type": "application/json"}
    body = request_body()
    reversed_body = dict(reversed(list(body.items())))

    _, first = await client.post(BASE, content=jsonlib.dumps(body).encode(), headers=headers)
    _, replay = await client.post(BASE, content=jsonlib.dumps(reversed_body, indent=2).encode(), headers=headers)

    assert first.status == 201
    assert replay.status == 201
    assert replay.body == first.body
    assert replay.headers["idempotent-replayed"] == "true"
    assert await ServiceRequest.all().count() == 1


async def test_create_changed_body_rejected(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    headers = {**resident, "Idempotency-Key": "create-1"}
    await client.post(BASE, json=request_body(), headers=headers)

    _, changed = await client.post(BASE, json=request_body(description="另一件事，需要帮忙买药"), headers=headers)

    assert changed.status == 422
    assert changed.json["error"]["code"] == "idempotency_key_reused"
    assert await ServiceRequest.all().count() == 1


async def test_create_invalid_body_replayed(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    headers = {**resident, "Idempotency-Key": "create-bad"}
    body = request_body(category="no_such_category")

    _, first = await client.post(BASE, json=body, headers=headers)
    _, replay = await client.post(BASE, json=body, headers=headers)

    assert first.status == 400
    assert first.json["error"]["field"] == "category"
    assert replay.body == first.body
    assert replay.headers["idempotent-replayed"] == "true"


async def test_accept_replay_and_other_request(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 200))
    resident, _ = await login_resident(client)
    _, first_request = await client.post(BASE, json=request_body(), headers=resident)
    _, second_request = await client.post(BASE, json=request_body(), headers=resident)
    headers = {**await worker_headers(services, worker), "Idempotency-Key": "accept-1"}

    _, accepted = await client.post(f"{BASE}/{first_request.json['id']}/accept", headers=headers)
    _, replay = await client.post(f"{BASE}/{first_request.json['id']}/accept", headers=headers)
    _, other = await client.post(f"{BASE}/{second_request.json['id']}/accept", headers=headers)

    assert accepted.status == 200
    assert replay.status == 200
    assert replay.body == accepted.body
    assert replay.headers["idempotent-replayed"] == "true"
    assert other.status == 422
    assert other.json["error"]["code"] == "idempotency_key_reused"


async def test_rating_conflict_replayed(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    _, created = await client.post(BASE, json=request_body(), headers=resident)
    headers = {**resident, "Idempotency-Key": "rate-too-early"}
    path = f"{BASE}/{created.json['id']}/rating"

    _, first = await client.post(path, json={"stars": 5}, headers=headers)
    _, replay = await client.post(path, json={"stars": 5}, headers=headers)

    assert first.status == 409
    assert replay.status == 409
    assert replay.body == first.body
    assert replay.headers["idempotent-replayed"] == "true"


@pytest.fixture
def api_server(settings):
    with api_processes(settings) as [api]:
        yield api.base_url


async def test_server_concurrent_creates_one_row(services, api_server):
    await make_city()
    async with httpx.AsyncClient(base_url=api_server, timeout=30) as http:
        login = await http.post("/api/v1/auth/wechat-login", json={"code": fresh_code("burst-resident")})
        headers = {"Authorization": f"Bearer {login.json()['token']}", "Idempotency-Key": "server-burst"}

        responses = await asyncio.gather(
            *(http.post(BASE, json=request_body(), headers=headers) for _ in range(CONCURRENT_CREATES))
        )

    statuses = [response.status_code for response in responses]
    created_ids = {response.json()["id"] for response in responses if response.status_code == 201}
    assert set(statuses) <= {201, 409}, statuses
    assert len(created_ids) == 1
    assert await ServiceRequest.all().count() == 1


# WeChat logins retried with the same code.

LOGIN = "/api/v1/auth/wechat-login"


async def _code_exchanges(wechat_standin: str) -> int:
    async with httpx.AsyncClient(base_url=wechat_standin, timeout=5) as http:
        calls = (await http.get("__standin__/calls")).json()
    return sum(1 for call in calls if call["path"] == "/sns/jscode2session")


async def test_login_retry_same_code_same_session(client):
    code = fresh_code("retrying")
    _, first = await client.post(LOGIN, json={"code": code})
    _, retry = await client.post(LOGIN, json={"code": code})

    assert first.status == 200
    assert retry.status == 200
    assert retry.json["token"] == first.json["token"]
    assert retry.json["user"] == first.json["user"]
    _, me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {retry.json['token']}"})
    assert me.status == 200


async def test_login_retry_after_five_minutes_rejected(client):
    clock.freeze(datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc))
    code = fresh_code("late-retry")
    _, first = await client.post(LOGIN, json={"code": code})

    clock.freeze(clock.now() + timedelta(seconds=LOGIN_RETRY_TTL_S - 1))
    _, in_time = await client.post(LOGIN, json={"code": code})
    clock.freeze(clock.now() + timedelta(seconds=1))
    _, too_late = await client.post(LOGIN, json={"code": code})

    assert first.status == 200
    assert in_time.status == 200
    assert too_late.status == 401
    assert too_late.json["error"]["code"] == "wechat_code_invalid"


async def test_login_retry_entry_hides_code_and_token(services, client):
    code = fresh_code("stored-entry")
    _, response = await client.post(LOGIN, json={"code": code})

    keys = [key async for key in services.redis.scan_iter(match="linli:wechat-login*")]
    assert len(keys) == 1, keys
    assert keys[0].startswith(LOGIN_RETRY_KEY_PREFIX)
    assert code not in keys[0]
    value = await services.redis.get(keys[0])
    assert code not in value
    assert response.json["token"] not in value
    assert 0 < await services.redis.ttl(keys[0]) <= LOGIN_RETRY_TTL_S


async def test_login_retry_after_logout_rejected(client):
    code = fresh_code("logged-out")
    _, first = await client.post(LOGIN, json={"code": code})
    await client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {first.json['token']}"})

    _, retry = await client.post(LOGIN, json={"code": code})

    assert retry.status == 401
    assert retry.json["error"]["code"] == "wechat_code_invalid"


async def test_login_failed_code_not_remembered(client, wechat_standin):
    code = fresh_code("busy")
    before = await _code_exchanges(wechat_standin)
    _, first = await client.post(LOGIN, json={"code": code})
    _, retry = await client.post(LOGIN, json={"code": code})

    assert first.status == 503
    assert retry.status == 503
    assert await _code_exchanges(wechat_standin) - before == 2


async def test_login_concurrent_same_code_one_exchange(client, wechat_standin):
    code = fresh_code("double-tap")
    before = await _code_exchanges(wechat_standin)

    responses = await asyncio.gather(*(client.post(LOGIN, json={"code": code}) for _ in range(5)))

    assert [response.status for _, response in responses] == [200] * 5
    assert len({response.json["token"] for _, response in responses}) == 1
    assert len({response.json["user"]["id"] for _, response in responses}) == 1
    assert await _code_exchanges(wechat_standin) - before == 1
