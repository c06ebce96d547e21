"""The API as it runs in production: a real Sanic server process, reached over loopback HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from backend.models import ServiceRequest
from tests.conftest import fresh_code
from tests.factories import SIMING, make_city, make_worker, north_of, request_body, token_for_user
from tests.servers import api_processes

CONCURRENT_ACCEPTS = 20


@pytest.fixture
def server(settings):
    with api_processes(settings, OFFER_COUNT=str(CONCURRENT_ACCEPTS)) as [api]:
        yield api.base_url
    assert "Traceback" not in api.output, api.output


async def test_server_oversized_body_rejected(services, server):
    async with httpx.AsyncClient(base_url=server, timeout=10) as http:
        login = await http.post("/api/v1/auth/wechat-login", json={"code": fresh_code("big-body")})
        headers = {"Authorization": f"Bearer {login.json()['token']}"}
        response = await http.post(
            "/api/v1/service-requests", json=request_body(description="长" * 40_000), headers=headers
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_server_concurrent_accepts_one_winner(services, server):
    agencies = await make_city()
    workers = [
        await make_worker(services, agencies["approved"], north_of(SIMING, 100 * (i + 1)))
        for i in range(CONCURRENT_ACCEPTS)
    ]
    # The server rebuilt its index at start, before these workers existed; make_worker wrote
    # them to the shared Redis index directly.
    from backend.models import User

    tokens = [await token_for_user(services, await User.get(id=w.user_id)) for w in workers]

    async with httpx.AsyncClient(base_url=server, timeout=30) as http:
        login = await http.post("/api/v1/auth/wechat-login", json={"code": fresh_code("race-resident")})
        resident = {"Authorization": f"Bearer {login.json()['token']}"}
        created = await http.post("/api/v1/service-requests", json=request_body(), headers=resident)
        assert created.status_code == 201, created.text
        request_id = created.json()["id"]
        assert created.json()["offers"]["count"] == CONCURRENT_ACCEPTS

        responses = await asyncio.gather(
            *(
                http.post(f"/api/v1/service-requests/{request_id}/accept", headers={"Authorization": f"Bearer {t}"})
                for t in tokens
            )
        )

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * (CONCURRENT_ACCEPTS - 1)
    winner_index = next(i for i, r in enumerate(responses) if r.status_code == 200)
    stored = await ServiceRequest.get(id=request_id)
    assert stored.worker_id == workers[winner_index].id


async def test_server_client_disconnect_not_an_error(services, settings):
    # A login with a "slow" code waits on the stand-in WeChat server, so the client can hang up
    # while the handler still runs.
    body = b'{"code": "slow-hang-up.1"}'
    raw_request = (
        b"POST /api/v1/auth/wechat-login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nX-Request-ID: hang-up-1\r\n\r\n%b" % (len(body), body)
    )
    with api_processes(settings) as [api]:
        port = int(api.base_url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw_request)
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.5)

    assert "client disconnected" in api.output, api.output
    assert "hang-up-1" in api.output, api.output
    assert "unhandled error" not in api.output, api.output
    assert "Traceback" not in api.output, api.output
