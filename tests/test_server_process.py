"""The API as it runs in production: a real Sanic server process, reached over loopback HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from backend.models import ServiceRequest
from backend.settings import PROJECT_ROOT
from tests.conftest import fresh_code
from tests.factories import SIMING, make_city, make_worker, north_of, request_body, token_for_user

START_TIMEOUT_S = 30.0
CONCURRENT_ACCEPTS = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(settings):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "WECHAT_API_BASE_URL": settings.wechat_api_base_url,
            "WECHAT_SECRET": settings.wechat_secret,
            "OFFER_COUNT": str(CONCURRENT_ACCEPTS),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "miniprogram_api"], cwd=PROJECT_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"server did not start: {process.stdout.read()}")
    yield base_url
    process.terminate()
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert "Traceback" not in output, output


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
        assert len(created.json()["candidates"]) == CONCURRENT_ACCEPTS

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
