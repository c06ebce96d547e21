"""Cursor paging of the list endpoints: every row reachable, in order, with checked inputs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backend import clock, paging
from backend.models import (
    DispatchStage,
    Offer,
    RequestStatus,
    Role,
    ServiceRequest,
    ServiceStation,
    User,
    Worker,
    WorkerStatus,
)
from tests.factories import SIMING, SIMING_CODE, make_city, make_worker, officer_headers, worker_headers


async def _read_all_pages(client, path: str, headers: dict, limit: int | None = None) -> list[list[int]]:
    """Follow next_cursor from the first page to the last and return the ids of each page."""
    pages = []
    cursor = None
    while True:
        query = []
        if limit is not None:
            query.append(f"limit={limit}")
        if cursor is not None:
            query.append(f"cursor={cursor}")
        separator = "&" if "?" in path else "?"
        _, response = await client.get(path + (separator + "&".join(query) if query else ""), headers=headers)
        assert response.status == 200, response.json
        pages.append([item.get("id", item.get("request_id")) for item in response.json["items"]])
        cursor = response.json["next_cursor"]
        if cursor is None:
            return pages


async def _pending_workers(agency, count: int) -> list[int]:
    await User.bulk_create(
        [User(openid=f"paging-worker-{index}", roles=[Role.RESIDENT.value]) for index in range(count)]
    )
    users = await User.filter(openid__startswith="paging-worker-").order_by("id")
    await Worker.bulk_create(
        [
            Worker(
                user_id=user.id,
                agency_id=agency.id,
                name=f"待审社工{index}",
                certificate_level="assistant",
                certificate_no=f"PAGE{index:05d}",
                categories=["elderly_care"],
                lat=SIMING[0],
                lng=SIMING[1],
                district_id=SIMING_CODE,
                service_radius_m=3000,
            )
            for index, user in enumerate(users)
        ]
    )
    return list(await Worker.filter(status=WorkerStatus.PENDING).order_by("id").values_list("id", flat=True))


async def _requests(count: int, **fields) -> list[int]:
    resident = await User.create(openid="paging-resident", roles=[Role.RESIDENT.value])
    now = clock.now()
    await ServiceRequest.bulk_create(
        [
            ServiceRequest(
                resident_id=resident.id,
                category="elderly_care",
                description="需要上门陪伴",
                address="思明区厦禾路100号",
                lat=SIMING[0],
                lng=SIMING[1],
                district_id=SIMING_CODE,
                created_at=now,
                updated_at=now,
                **fields,
            )
            for _ in range(count)
        ]
    )
    return list(await ServiceRequest.filter(resident_id=resident.id).order_by("id").values_list("id", flat=True))


async def test_pending_workers_reachable_past_200(services, client):
    agencies = await make_city()
    pending_ids = await _pending_workers(agencies["approved"], 205)
    officer = await officer_headers(services)

    pages = await _read_all_pages(client, "/api/v1/admin/workers?status=pending", officer, limit=paging.MAX_PAGE_SIZE)

    assert [len(page) for page in pages] == [200, 5]
    assert [worker_id for page in pages for worker_id in page] == pending_ids


async def test_workers_default_page_size(services, client):
    agencies = await make_city()
    pending_ids = await _pending_workers(agencies["approved"], paging.DEFAULT_PAGE_SIZE + 1)

    _, response = await client.get("/api/v1/admin/workers", headers=await officer_headers(services))

    assert [item["id"] for item in response.json["items"]] == pending_ids[: paging.DEFAULT_PAGE_SIZE]
    assert response.json["next_cursor"] == str(pending_ids[paging.DEFAULT_PAGE_SIZE - 1])


async def test_last_page_has_no_cursor(services, client):
    agencies = await make_city()
    pending_ids = await _pending_workers(agencies["approved"], 3)

    _, response = await client.get("/api/v1/admin/workers?limit=3", headers=await officer_headers(services))

    assert [item["id"] for item in response.json["items"]] == pending_ids
    assert response.json["next_cursor"] is None


async def test_station_queue_reachable_past_200(services, client):
    await make_city()
    station = await ServiceStation.get(district_id=SIMING_CODE)
    queued_ids = await _requests(
        205, station_id=station.id, stage=DispatchStage.STATION_QUEUE, status=RequestStatus.MATCHING
    )
    officer = await officer_headers(services)

    pages = await _read_all_pages(client, f"/api/v1/stations/{station.id}/queue", officer, limit=100)

    assert [len(page) for page in pages] == [100, 100, 5]
    assert [request_id for page in pages for request_id in page] == queued_ids


async def test_open_offers_reachable_past_first_page(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    request_ids = await _requests(60, status=RequestStatus.OFFERED)
    expires_at = clock.now() + timedelta(minutes=10)
    await Offer.bulk_create(
        [
            Offer(service_request_id=request_id, worker_id=worker.id, distance_m=300, score=1.0,
                  created_at=clock.now(), expires_at=expires_at)
            for request_id in request_ids
        ]
    )

    pages = await _read_all_pages(client, "/api/v1/workers/me/offers", await worker_headers(services, worker))

    assert [len(page) for page in pages] == [50, 10]
    assert [request_id for page in pages for request_id in page] == request_ids[::-1]


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten", "１０", "1.5", "9" * 4301, "0" * 4300 + "5"])
async def test_bad_limit_rejected(services, client, limit):
    _, response = await client.get(f"/api/v1/admin/workers?limit={limit}", headers=await officer_headers(services))

    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_input"
    assert response.json["error"]["field"] == "limit"


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/api/v1/admin/workers", "abc"),
        ("/api/v1/admin/workers", "0"),
        ("/api/v1/admin/workers", "99999999999"),
        ("/api/v1/admin/workers", "١٢"),
        ("/api/v1/admin/content-flags", "12"),
        ("/api/v1/admin/content-flags", "pending.12"),
        ("/api/v1/admin/content-flags", "resolved.x"),
    ],
)
async def test_bad_cursor_rejected(services, client, path, cursor):
    _, response = await client.get(f"{path}?cursor={cursor}", headers=await officer_headers(services))

    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_input"
    assert response.json["error"]["field"] == "cursor"
