"""Two API processes sharing one database and Redis expire and re-match each request once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from backend.models import DispatchEvent, Offer, ServiceRequest
from tests.conftest import fresh_code
from tests.factories import SIMING, make_city, make_worker, north_of, request_body
from tests.servers import api_processes

OFFER_TTL_S = 2
REQUESTS = 6


@pytest.fixture
def two_servers(settings):
    with api_processes(
        settings,
        count=2,
        OFFER_TTL_S=str(OFFER_TTL_S),
        SCHEDULER_INTERVAL_MS="100",
        RATE_REQUESTS_PER_USER_PER_HOUR="1000",
    ) as servers:
        yield [server.base_url for server in servers]
    for server in servers:
        assert "Traceback" not in server.output, server.output


async def test_two_processes_widen_each_request_once(services, two_servers):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=10_000)

    async with httpx.AsyncClient(timeout=10) as http:
        login = await http.post(f"{two_servers[0]}/api/v1/auth/wechat-login", json={"code": fresh_code("two-procs")})
        headers = {"Authorization": f"Bearer {login.json()['token']}"}
        request_ids = []
        for index in range(REQUESTS):
            base_url = two_servers[index % 2]
            created = await http.post(f"{base_url}/api/v1/service-requests", json=request_body(), headers=headers)
            assert created.status_code == 201, created.text
            request_ids.append(created.json()["id"])

    # Offers expire after OFFER_TTL_S and both schedulers tick every 100 ms, so each request
    # goes ring 1, ring 2, then (nobody left within 20 km) to its station's queue.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        queued = await DispatchEvent.filter(service_request_id__in=request_ids, kind="station_queued").count()
        if queued >= REQUESTS:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # room for a wrong second step to show

    for request_id in request_ids:
        kinds = await DispatchEvent.filter(service_request_id=request_id).values_list("kind", "ring")
        assert kinds.count(("ring_widened", 2)) == 1, kinds
        assert kinds.count(("offers_sent", 2)) == 1, kinds
        assert await Offer.filter(service_request_id=request_id, ring=2).count() == 1
        assert kinds.count(("ring_widened", 3)) == 1, kinds
        assert kinds.count(("station_queued", 3)) == 1, kinds
        request = await ServiceRequest.get(id=request_id)
        assert request.stage.value == "station_queue"
