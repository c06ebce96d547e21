"""Dispatch in the field, on a controlled clock: expiry, widening rings, the station queue,
decline and withdrawal, check-in distance, schedules and job limits, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest

from backend import clock, notifications, scheduler
from backend.models import (
    DispatchEvent,
    Notification,
    Offer,
    OfferStatus,
    RequestStatus,
    Role,
    ServiceRequest,
    User,
)
from backend.wechat import WeChatGateway
from scripts.wechat_standin import make_server
from tests.factories import (
    AT_DOOR,
    SIMING,
    login_resident,
    make_city,
    make_worker,
    north_of,
    officer_headers,
    request_body,
    token_for_user,
    worker_headers,
)

BASE = "/api/v1/service-requests"
T0 = datetime(2026, 12, 7, 1, 0, tzinfo=timezone.utc)  # 09:00 in Xiamen


@pytest.fixture(autouse=True)
def frozen_clock(services):
    clock.freeze(T0)
    yield
    clock.freeze(None)


def advance(seconds: float) -> None:
    clock.freeze(clock.now() + timedelta(seconds=seconds))


async def _create(client, headers, **overrides) -> dict:
    _, response = await client.post(BASE, json=request_body(**overrides), headers=headers)
    assert response.status == 201, response.json
    return response.json


async def _offered_ids(request_id: int) -> set[int]:
    return set(
        await Offer.filter(service_request_id=request_id, status=OfferStatus.OPEN).values_list("worker_id", flat=True)
    )


async def test_offers_expire_then_ring_widens(services, client):
    agencies = await make_city()
    near = await make_worker(services, agencies["approved"], north_of(SIMING, 1000), radius_m=20_000)
    middle = await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=20_000)
    far = await make_worker(services, agencies["approved"], north_of(SIMING, 15_000), radius_m=20_000)
    resident, _ = await login_resident(client)

    created = await _create(client, resident)
    assert created["stage"]["ring"] == 1
    assert await _offered_ids(created["id"]) == {near.id}

    advance(services.settings.offer_ttl_s - 1)
    assert (await scheduler.run_once(services))["offers_expired"] == 0
    advance(2)
    assert (await scheduler.run_once(services))["offers_expired"] == 1

    request = await ServiceRequest.get(id=created["id"])
    assert request.search_ring == 2
    assert request.status == RequestStatus.OFFERED
    assert await _offered_ids(request.id) == {middle.id}

    advance(services.settings.offer_ttl_s + 1)
    await scheduler.run_once(services)
    request = await ServiceRequest.get(id=created["id"])
    assert request.search_ring == 3
    assert await _offered_ids(request.id) == {far.id}
    _, view = await client.get(f"{BASE}/{request.id}", headers=resident)
    assert view.json["stage"] == {"name": "ring", "ring": 3, "rings": 3, "radius_m": 20_000,
                                  "label": "正在为您联系 20 公里内的社工"}
    kinds = [event["kind"] for event in view.json["events"]]
    assert kinds == ["offers_sent", "ring_widened", "offers_sent", "ring_widened", "offers_sent"]


async def test_last_ring_goes_to_station_queue(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)

    advance(services.settings.offer_ttl_s + 1)
    await scheduler.run_once(services)

    request = await ServiceRequest.get(id=created["id"]).prefetch_related("station")
    assert request.status == RequestStatus.MATCHING
    assert request.stage.value == "station_queue"
    _, view = await client.get(f"{BASE}/{request.id}", headers=resident)
    assert view.json["stage"]["name"] == "station_queue"
    assert request.station.name in view.json["stage"]["label"]
    queued = await Notification.filter(user_id=request.resident_id, kind="request_station_queued").count()
    assert queued == 1

    officer = await officer_headers(services)
    _, queue = await client.get(f"/api/v1/stations/{request.station_id}/queue", headers=officer)
    assert [item["id"] for item in queue.json["items"]] == [request.id]
    assert queue.json["items"][0]["address"] == request_body()["address"]
    assert worker.id not in await _offered_ids(request.id)


async def test_nobody_anywhere_queues_immediately(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    assert created["status"] == "matching"
    assert created["stage"]["name"] == "station_queue"
    events = await DispatchEvent.filter(service_request_id=created["id"]).values_list("kind", flat=True)
    assert events == ["ring_widened", "ring_widened", "station_queued"]


async def test_station_staff_assigns_worker(services, client):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    request = await ServiceRequest.get(id=created["id"])
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000), radius_m=1000)

    staff = await User.create(username="station-1", roles=[Role.STATION_STAFF.value], station_id=request.station_id)
    staff_headers = {"Authorization": f"Bearer {await token_for_user(services, staff)}"}
    _, queue = await client.get(f"/api/v1/stations/{request.station_id}/queue", headers=staff_headers)
    assert [item["id"] for item in queue.json["items"]] == [request.id]

    _, assigned = await client.post(
        f"/api/v1/admin/service-requests/{request.id}/assign", json={"worker_id": worker.id}, headers=staff_headers
    )
    assert assigned.status == 200, assigned.json
    assert assigned.json["status"] == "accepted"
    assert assigned.json["worker"]["id"] == worker.id

    _, view = await client.get(f"{BASE}/{request.id}", headers=await worker_headers(services, worker))
    assert view.json["address"] == request_body()["address"]
    assert await Notification.filter(user_id=worker.user_id, kind="offer_new").count() == 1
    assert await Notification.filter(user_id=request.resident_id, kind="request_accepted").count() == 1

    _, again = await client.post(
        f"/api/v1/admin/service-requests/{request.id}/assign", json={"worker_id": worker.id}, headers=staff_headers
    )
    assert again.status == 409


async def _station_staff_headers(services, station_id: int) -> dict[str, str]:
    staff = await User.create(username=f"station-staff-{station_id}", roles=[Role.STATION_STAFF.value],
                              station_id=station_id)
    return {"Authorization": f"Bearer {await token_for_user(services, staff)}"}


async def test_station_staff_reads_request_once_queued(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    staff = await _station_staff_headers(services, created["street"]["station_id"])

    _, while_offered = await client.get(f"{BASE}/{created['id']}", headers=staff)
    advance(services.settings.offer_ttl_s + 1)
    await scheduler.run_once(services)
    _, once_queued = await client.get(f"{BASE}/{created['id']}", headers=staff)

    assert while_offered.status == 404
    assert while_offered.json["error"]["code"] == "not_found"
    assert "厦禾路" not in while_offered.text
    assert once_queued.status == 200
    assert once_queued.json["address"] == request_body()["address"]


async def test_station_staff_cannot_read_officer_assigned(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    staff = await _station_staff_headers(services, created["street"]["station_id"])

    _, assigned = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": worker.id},
        headers=await officer_headers(services),
    )
    _, read = await client.get(f"{BASE}/{created['id']}", headers=staff)

    assert assigned.status == 200, assigned.json
    assert read.status == 404
    assert "厦禾路" not in read.text


async def test_station_staff_cannot_assign_while_offered(services, client):
    agencies = await make_city()
    offered = await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    spare = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    staff = await _station_staff_headers(services, created["street"]["station_id"])

    _, response = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": spare.id}, headers=staff
    )

    assert response.status == 409
    assert response.json["error"]["code"] == "not_in_station_queue"
    assert "待派队列" in response.json["error"]["message"]
    request = await ServiceRequest.get(id=created["id"])
    assert request.status == RequestStatus.OFFERED
    assert request.worker_id is None
    assert await _offered_ids(request.id) == {offered.id}


async def test_other_station_staff_cannot_assign(services, client):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    request = await ServiceRequest.get(id=created["id"])
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000))
    from backend.models import ServiceStation

    other_station = await ServiceStation.exclude(id=request.station_id).first()
    staff = await User.create(username="station-2", roles=[Role.STATION_STAFF.value], station_id=other_station.id)
    headers = {"Authorization": f"Bearer {await token_for_user(services, staff)}"}

    _, assign = await client.post(
        f"/api/v1/admin/service-requests/{request.id}/assign", json={"worker_id": worker.id}, headers=headers
    )
    assert assign.status == 404
    _, queue = await client.get(f"/api/v1/stations/{request.station_id}/queue", headers=headers)
    assert queue.status == 403
    resident_queue = await client.get(f"/api/v1/stations/{request.station_id}/queue", headers=resident)
    assert resident_queue[1].status == 403


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"verified": False}, "worker_not_matchable"),
        ({"verified": False, "on_duty": False}, "worker_not_matchable"),
        ({"categories": ("medical_escort",)}, "worker_not_qualified"),
    ],
)
async def test_assign_unfit_worker_rejected(services, client, overrides, code):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000), **overrides)
    _, response = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": worker.id},
        headers=await officer_headers(services),
    )
    assert response.status == 409
    assert response.json["error"]["code"] == code


async def test_assign_off_duty_worker_rejected(services, client):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000), on_duty=False)

    _, response = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": worker.id},
        headers=await officer_headers(services),
    )

    assert response.status == 409
    assert response.json["error"]["code"] == "worker_off_duty"
    assert response.json["error"]["field"] == "worker_id"
    assert "未开启接单" in response.json["error"]["message"]
    request = await ServiceRequest.get(id=created["id"])
    assert request.status == RequestStatus.MATCHING
    assert request.worker_id is None
    assert not await DispatchEvent.filter(service_request_id=request.id, kind="assigned").exists()
    assert not await Notification.filter(user_id=worker.user_id).exists()


async def test_all_decline_widens(services, client):
    agencies = await make_city()
    first = await make_worker(services, agencies["approved"], north_of(SIMING, 500))
    second = await make_worker(services, agencies["approved"], north_of(SIMING, 900))
    farther = await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=10_000)
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    assert await _offered_ids(created["id"]) == {first.id, second.id}

    _, declined = await client.post(f"{BASE}/{created['id']}/decline", headers=await worker_headers(services, first))
    assert declined.status == 200
    assert (await ServiceRequest.get(id=created["id"])).search_ring == 1
    await client.post(f"{BASE}/{created['id']}/decline", headers=await worker_headers(services, second))

    request = await ServiceRequest.get(id=created["id"])
    assert request.search_ring == 2
    assert await _offered_ids(request.id) == {farther.id}
    _, stale = await client.post(f"{BASE}/{request.id}/accept", headers=await worker_headers(services, first))
    assert stale.status == 409
    assert stale.json["error"]["code"] == "offer_expired"


async def _two_offers(services, client):
    agencies = await make_city()
    first = await make_worker(services, agencies["approved"], north_of(SIMING, 500))
    second = await make_worker(services, agencies["approved"], north_of(SIMING, 900))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    return created["id"], resident, await worker_headers(services, first), await worker_headers(services, second)


async def test_decline_after_assignment_conflicts(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    _, first_decline = await client.post(f"{BASE}/{created['id']}/decline", headers=headers)
    _, assigned = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": worker.id},
        headers=await officer_headers(services),
    )

    _, response = await client.post(f"{BASE}/{created['id']}/decline", headers=headers)

    assert first_decline.status == 200
    assert assigned.status == 200, assigned.json
    assert response.status == 409
    assert response.json["error"]["code"] == "already_accepted"


async def test_decline_after_other_accepted_conflicts(services, client):
    request_id, _, first, second = await _two_offers(services, client)
    await client.post(f"{BASE}/{request_id}/accept", headers=first)

    _, response = await client.post(f"{BASE}/{request_id}/decline", headers=second)

    assert response.status == 409
    assert response.json["error"]["code"] == "already_taken"
    assert not await DispatchEvent.filter(service_request_id=request_id, kind="declined").exists()


async def test_decline_after_cancel_conflicts(services, client):
    request_id, resident, first, _ = await _two_offers(services, client)
    await client.post(f"{BASE}/{request_id}/cancel", headers=resident)

    _, response = await client.post(f"{BASE}/{request_id}/decline", headers=first)

    assert response.status == 409
    assert response.json["error"]["code"] == "request_cancelled"


async def test_decline_after_expiry_conflicts(services, client):
    request_id, _, first, second = await _two_offers(services, client)
    advance(services.settings.offer_ttl_s + 1)  # the scheduler has not run yet

    _, before_scheduler = await client.post(f"{BASE}/{request_id}/decline", headers=first)
    await scheduler.run_once(services)
    _, after_scheduler = await client.post(f"{BASE}/{request_id}/decline", headers=second)

    for response in (before_scheduler, after_scheduler):
        assert response.status == 409
        assert response.json["error"]["code"] == "offer_expired"
    assert not await DispatchEvent.filter(service_request_id=request_id, kind="declined").exists()


async def test_decline_by_assigned_worker_conflicts(services, client):
    request_id, _, first, _ = await _two_offers(services, client)
    await client.post(f"{BASE}/{request_id}/accept", headers=first)

    _, response = await client.post(f"{BASE}/{request_id}/decline", headers=first)

    assert response.status == 409
    assert response.json["error"]["code"] == "already_accepted"
    assert (await ServiceRequest.get(id=request_id)).status == RequestStatus.ACCEPTED


async def test_decline_repeated_is_ok(services, client):
    request_id, _, first, _ = await _two_offers(services, client)

    _, once = await client.post(f"{BASE}/{request_id}/decline", headers=first)
    _, again = await client.post(f"{BASE}/{request_id}/decline", headers=first)

    assert once.status == again.status == 200
    assert await DispatchEvent.filter(service_request_id=request_id, kind="declined").count() == 1


async def test_withdraw_twice_conflicts(services, client):
    request_id, _, first, _ = await _two_offers(services, client)
    await client.post(f"{BASE}/{request_id}/accept", headers=first)

    _, once = await client.post(f"{BASE}/{request_id}/withdraw", headers=first)
    _, again = await client.post(f"{BASE}/{request_id}/withdraw", headers=first)

    assert once.status == 200
    assert again.status == 409
    assert again.json["error"]["code"] == "already_withdrawn"


async def test_directly_assigned_worker_withdraws_once(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    stranger = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": stranger.id},
        headers=await officer_headers(services),
    )
    headers = await worker_headers(services, stranger)

    _, once = await client.post(f"{BASE}/{created['id']}/withdraw", headers=headers)
    _, again = await client.post(f"{BASE}/{created['id']}/withdraw", headers=headers)

    assert once.status == 200, once.json
    assert again.status == 409
    assert again.json["error"]["code"] == "already_withdrawn"


async def test_concurrent_withdraws_one_succeeds(services, client):
    request_id, _, first, _ = await _two_offers(services, client)
    await client.post(f"{BASE}/{request_id}/accept", headers=first)

    responses = await asyncio.gather(*(client.post(f"{BASE}/{request_id}/withdraw", headers=first) for _ in range(2)))

    assert sorted(response.status for _, response in responses) == [200, 409]
    assert {response.json["error"]["code"] for _, response in responses if response.status == 409} == {
        "already_withdrawn"
    }
    assert await DispatchEvent.filter(service_request_id=request_id, kind="withdrawn").count() == 1


async def test_expired_offer_cannot_be_accepted(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    advance(services.settings.offer_ttl_s + 1)  # the scheduler has not run yet
    _, response = await client.post(f"{BASE}/{created['id']}/accept", headers=await worker_headers(services, worker))
    assert response.status == 409
    assert response.json["error"]["code"] == "offer_expired"
    assert (await ServiceRequest.get(id=created["id"])).status == RequestStatus.OFFERED


async def test_withdraw_rematches_without_worker(services, client):
    agencies = await make_city()
    first = await make_worker(services, agencies["approved"], north_of(SIMING, 500))
    second = await make_worker(services, agencies["approved"], north_of(SIMING, 900))
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    first_headers = await worker_headers(services, first)
    await client.post(f"{BASE}/{created['id']}/accept", headers=first_headers)

    _, withdrawn = await client.post(f"{BASE}/{created['id']}/withdraw", headers=first_headers)
    assert withdrawn.status == 200, withdrawn.json

    request = await ServiceRequest.get(id=created["id"])
    assert request.status == RequestStatus.OFFERED
    assert request.worker_id is None
    assert await _offered_ids(request.id) == {second.id}
    _, view = await client.get(f"{BASE}/{request.id}", headers=first_headers)
    assert "address" not in view.json
    _, accept = await client.post(f"{BASE}/{request.id}/accept", headers=await worker_headers(services, second))
    assert accept.status == 200


async def test_withdraw_after_start_rejected(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)
    await client.post(f"{BASE}/{created['id']}/start", json=AT_DOOR, headers=headers)
    _, response = await client.post(f"{BASE}/{created['id']}/withdraw", headers=headers)
    assert response.status == 409


@pytest.mark.parametrize(("metres", "status"), [(450, 200), (650, 409)])
async def test_checkin_distance(services, client, metres, status):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)

    lat, lng = north_of(SIMING, metres)
    _, response = await client.post(
        f"{BASE}/{created['id']}/start", json={"location": {"lat": lat, "lng": lng}}, headers=headers
    )
    assert response.status == status
    request = await ServiceRequest.get(id=created["id"])
    if status == 200:
        assert request.checkin_lat == pytest.approx(lat)
        assert request.started_at == T0
    else:
        assert response.json["error"]["code"] == "too_far_to_check_in"
        assert response.json["error"]["field"] == "location"
        assert request.status == RequestStatus.ACCEPTED


async def test_start_without_location_rejected(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)
    _, response = await client.post(f"{BASE}/{created['id']}/start", json={}, headers=headers)
    assert response.status == 400
    assert response.json["error"]["field"] == "location"


async def test_rating_needs_proof_of_service(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, resident_id = await login_resident(client)
    created = await _create(client, resident)
    # A completion without a check-in, as an import or a manual fix could leave it.
    await ServiceRequest.filter(id=created["id"]).update(
        status=RequestStatus.COMPLETED, worker_id=worker.id, completed_at=clock.now()
    )
    _, response = await client.post(f"{BASE}/{created['id']}/rating", json={"stars": 5}, headers=resident)
    assert response.status == 409
    assert response.json["error"]["code"] == "service_not_verified"


def _local(hour: int, day_offset: int = 0) -> str:
    moment = T0.replace(hour=hour - 8) + timedelta(days=day_offset)
    return moment.astimezone(clock.LOCAL_TZ).isoformat()


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("2026-12-07T10:00:00", None, "preferred_start"),
        ("tomorrow morning", None, "preferred_start"),
        (12, None, "preferred_start"),
        ("2026-12-06T10:00:00+08:00", None, "preferred_start"),
        ("2027-01-20T10:00:00+08:00", None, "preferred_start"),
        ("2026-12-07T12:00:00+08:00", "2026-12-07T11:00:00+08:00", "preferred_end"),
        ("2026-12-07T12:00:00+08:00", "2026-12-07T13:00:00", "preferred_end"),
        (None, "2026-12-07T13:00:00+08:00", "preferred_start"),
    ],
)
async def test_bad_preferred_times(services, client, start, end, field):
    await make_city()
    resident, _ = await login_resident(client)
    body = request_body(preferred_start=start, preferred_end=end)
    _, response = await client.post(BASE, json=body, headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] == field
    assert await ServiceRequest.all().count() == 0


async def test_preferred_times_rendered_local(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    created = await _create(client, resident, preferred_start="2026-12-08T02:00:00Z", preferred_end=None)
    assert created["preferred_start"] == "2026-12-08T10:00:00+08:00"
    assert created["preferred_end"] == "2026-12-08T12:00:00+08:00"


async def test_overlapping_job_rejected(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    headers = await worker_headers(services, worker)
    resident, _ = await login_resident(client)
    first = await _create(client, resident, preferred_start="2026-12-07T14:00:00+08:00",
                          preferred_end="2026-12-07T16:00:00+08:00")
    overlapping = await _create(client, resident, preferred_start="2026-12-07T15:00:00+08:00",
                                preferred_end="2026-12-07T17:00:00+08:00")
    separate = await _create(client, resident, preferred_start="2026-12-07T16:00:00+08:00",
                             preferred_end="2026-12-07T18:00:00+08:00")

    _, accepted = await client.post(f"{BASE}/{first['id']}/accept", headers=headers)
    assert accepted.status == 200
    _, clash = await client.post(f"{BASE}/{overlapping['id']}/accept", headers=headers)
    assert clash.status == 409
    assert clash.json["error"]["code"] == "schedule_conflict"
    _, later = await client.post(f"{BASE}/{separate['id']}/accept", headers=headers)
    assert later.status == 200


async def test_active_job_limit(services, client):
    services.settings = dataclasses.replace(services.settings, max_active_jobs=2)
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    headers = await worker_headers(services, worker)
    resident, _ = await login_resident(client)
    created = [
        await _create(client, resident, preferred_start=f"2026-12-{8 + day:02d}T10:00:00+08:00") for day in range(3)
    ]
    statuses = []
    for item in created:
        _, response = await client.post(f"{BASE}/{item['id']}/accept", headers=headers)
        statuses.append(response.status)
    assert statuses == [200, 200, 409]


async def test_concurrent_accepts_by_one_worker_respect_limit(services, client):
    services.settings = dataclasses.replace(services.settings, max_active_jobs=1)
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    headers = await worker_headers(services, worker)
    resident, _ = await login_resident(client)
    created = [
        await _create(client, resident, preferred_start=f"2026-12-{10 + day}T10:00:00+08:00") for day in range(5)
    ]
    responses = await asyncio.gather(*(client.post(f"{BASE}/{item['id']}/accept", headers=headers) for item in created))
    assert sorted(response.status for _, response in responses) == [200, 409, 409, 409, 409]
    assert await ServiceRequest.filter(worker_id=worker.id).count() == 1


async def test_cancel_notifies_assigned_worker(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    await client.post(f"{BASE}/{created['id']}/accept", headers=await worker_headers(services, worker))

    _, cancelled = await client.post(f"{BASE}/{created['id']}/cancel", headers=resident)
    assert cancelled.json["status"] == "cancelled"
    assert await Notification.filter(user_id=worker.user_id, kind="request_cancelled").count() == 1


async def test_offer_notifications_enqueued(services, client):
    agencies = await make_city()
    workers = [await make_worker(services, agencies["approved"], north_of(SIMING, 300 * (i + 1))) for i in range(3)]
    resident, _ = await login_resident(client)
    await _create(client, resident)
    for worker in workers:
        assert await Notification.filter(user_id=worker.user_id, kind="offer_new").count() == 1


class _StatementCounter(logging.Handler):
    """Counts the SQL statements Tortoise logs at DEBUG level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _statements_to_create(client, headers) -> tuple[int, int]:
    counter = _StatementCounter()
    db_log = logging.getLogger("tortoise.db_client")
    level = db_log.level
    db_log.setLevel(logging.DEBUG)
    db_log.addHandler(counter)
    try:
        created = await _create(client, headers)
    finally:
        db_log.removeHandler(counter)
        db_log.setLevel(level)
    return counter.count, len(await _offered_ids(created["id"]))


async def test_offer_statements_independent_of_count(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    resident, _ = await login_resident(client)
    await _create(client, resident)  # reads the stations once, which later creates skip
    one_offer = await _statements_to_create(client, resident)
    for i in range(4):
        await make_worker(services, agencies["approved"], north_of(SIMING, 600 + 300 * i))

    five_offers = await _statements_to_create(client, resident)

    assert one_offer[1] == 1
    assert five_offers[1] == 5
    assert five_offers[0] == one_offer[0]


async def test_two_schedulers_step_once(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=10_000)
    resident, _ = await login_resident(client)
    created = [await _create(client, resident) for _ in range(5)]

    advance(services.settings.offer_ttl_s + 1)
    # No lease here: two steps racing must still widen each request once.
    await asyncio.gather(scheduler.run_once(services), scheduler.run_once(services))

    for item in created:
        widened = await DispatchEvent.filter(service_request_id=item["id"], kind="ring_widened").count()
        assert widened == 1
        request = await ServiceRequest.get(id=item["id"])
        assert request.search_ring == 2
        assert await Offer.filter(service_request_id=item["id"], ring=2).count() == 1


async def test_lease_held_by_one_process(services):
    first = scheduler.Lease(services.redis, ttl_ms=1000)
    second = scheduler.Lease(services.redis, ttl_ms=1000)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.acquire()  # renewal
    await first.release()
    assert await second.acquire()


@pytest.fixture
def slow_wechat_services(services):
    """The test services on a stand-in WeChat server that takes 3 s to hand out an access token."""
    server = make_server("127.0.0.1", 0, token_delay_s=3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    settings = dataclasses.replace(
        services.settings,
        wechat_api_base_url=f"http://{host}:{port}/",
        wechat_timeout_s=5.0,
        template_request_status="tpl-status",
    )
    gateway = WeChatGateway(settings)
    yield dataclasses.replace(services, settings=settings, wechat=gateway)
    gateway.close()
    server.shutdown()
    server.server_close()


async def test_expiry_not_held_up_by_slow_notifications(slow_wechat_services, client):
    services = slow_wechat_services
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    resident, resident_id = await login_resident(client)
    created = await _create(client, resident)
    await notifications.enqueue(resident_id, "request_accepted", dedupe_key="slow-send")

    loops = asyncio.create_task(scheduler.run_forever(services, interval_s=0.05))
    try:
        await asyncio.sleep(0.3)  # the notification loop is now waiting for its token
        advance(services.settings.offer_ttl_s + 1)
        for _ in range(20):  # 1 s, well inside the 3 s the send waits for its token
            if not await _offered_ids(created["id"]):
                break
            await asyncio.sleep(0.05)
        assert not await Offer.filter(service_request_id=created["id"], ring=1, status=OfferStatus.OPEN).exists()
        # The send has not finished, so the expiry above did not wait for it.
        assert await Notification.get(dedupe_key="slow-send").values_list("status", flat=True) == "pending"
    finally:
        loops.cancel()
        await asyncio.gather(loops, return_exceptions=True)


async def test_rejected_worker_loses_offers_and_jobs(services, client):
    agencies = await make_city()
    rejected = await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    other = await make_worker(services, agencies["approved"], north_of(SIMING, 600))
    resident, _ = await login_resident(client)
    offered = await _create(client, resident)
    accepted = await _create(client, resident, preferred_start="2026-12-08T10:00:00+08:00")
    rejected_headers = await worker_headers(services, rejected)
    _, taken = await client.post(f"{BASE}/{accepted['id']}/accept", headers=rejected_headers)
    assert taken.status == 200

    officer = await officer_headers(services)
    _, response = await client.post(f"/api/v1/admin/workers/{rejected.id}/reject", json={"reason": "证书已注销"},
                                    headers=officer)
    assert response.status == 200

    _, late = await client.post(f"{BASE}/{offered['id']}/accept", headers=rejected_headers)
    assert late.status == 409
    released = await ServiceRequest.get(id=accepted["id"])
    assert released.worker_id is None
    assert released.status == RequestStatus.OFFERED
    assert await _offered_ids(released.id) == {other.id}
    kinds = await DispatchEvent.filter(service_request_id=released.id).values_list("kind", flat=True)
    assert "released" in kinds


async def test_suspended_agency_worker_cannot_accept(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    from backend.models import Agency, AgencyStatus

    # Suspended behind the API's back, so the open offer is still there.
    await Agency.filter(id=agencies["approved"].id).update(status=AgencyStatus.SUSPENDED)
    _, response = await client.post(f"{BASE}/{created['id']}/accept", headers=await worker_headers(services, worker))
    assert response.status == 409
    assert response.json["error"]["code"] == "worker_not_matchable"


async def test_service_minutes_bounded_by_elapsed(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)
    await client.post(f"{BASE}/{created['id']}/start", json=AT_DOOR, headers=headers)
    advance(30 * 60)

    _, inflated = await client.post(
        f"{BASE}/{created['id']}/complete", json={"service_minutes": 120, "summary": "陪伴", **AT_DOOR}, headers=headers
    )
    assert inflated.status == 400
    assert inflated.json["error"]["field"] == "service_minutes"
    _, honest = await client.post(
        f"{BASE}/{created['id']}/complete", json={"service_minutes": 35, "summary": "陪伴", **AT_DOOR}, headers=headers
    )
    assert honest.status == 200


async def _started_job(services, client) -> tuple[int, dict[str, str]]:
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)
    await client.post(f"{BASE}/{created['id']}/start", json=AT_DOOR, headers=headers)
    advance(30 * 60)
    return created["id"], headers


async def test_complete_twice_conflicts(services, client):
    request_id, headers = await _started_job(services, client)
    body = {"service_minutes": 30, "summary": "陪伴聊天", **AT_DOOR}

    _, first = await client.post(f"{BASE}/{request_id}/complete", json=body, headers=headers)
    _, same = await client.post(f"{BASE}/{request_id}/complete", json=body, headers=headers)
    _, changed = await client.post(
        f"{BASE}/{request_id}/complete", json={**body, "summary": "协助洗浴"}, headers=headers
    )

    assert first.status == 200
    for repeat in (same, changed):
        assert repeat.status == 409
        assert repeat.json["error"]["code"] == "already_completed"
    assert (await ServiceRequest.get(id=request_id)).summary == "陪伴聊天"


async def test_complete_retry_with_key_replays(services, client):
    request_id, headers = await _started_job(services, client)
    keyed = {**headers, "Idempotency-Key": "complete-once"}
    body = {"service_minutes": 30, "summary": "陪伴聊天", **AT_DOOR}

    _, first = await client.post(f"{BASE}/{request_id}/complete", json=body, headers=keyed)
    _, retried = await client.post(f"{BASE}/{request_id}/complete", json=body, headers=keyed)

    assert first.status == retried.status == 200
    assert retried.json == first.json


async def test_concurrent_completes_keep_one_summary(services, client):
    request_id, headers = await _started_job(services, client)
    summaries = ["陪伴聊天", "协助洗浴"]

    responses = await asyncio.gather(*(
        client.post(f"{BASE}/{request_id}/complete", json={"service_minutes": 30, "summary": summary, **AT_DOOR},
                    headers=headers)
        for summary in summaries
    ))

    statuses = [response.status for _, response in responses]
    assert sorted(statuses) == [200, 409]
    winner = summaries[statuses.index(200)]
    assert (await ServiceRequest.get(id=request_id)).summary == winner
    assert [response.json["error"]["code"] for _, response in responses if response.status == 409] == [
        "already_completed"
    ]


async def test_start_long_before_preferred_time_rejected(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    resident, _ = await login_resident(client)
    created = await _create(client, resident, preferred_start="2026-12-09T10:00:00+08:00")
    headers = await worker_headers(services, worker)
    await client.post(f"{BASE}/{created['id']}/accept", headers=headers)

    _, early = await client.post(f"{BASE}/{created['id']}/start", json=AT_DOOR, headers=headers)
    assert early.status == 409
    assert early.json["error"]["code"] == "too_early_to_start"
    clock.freeze(datetime(2026, 12, 9, 1, 0, tzinfo=timezone.utc))  # 09:00 local, an hour before
    _, on_time = await client.post(f"{BASE}/{created['id']}/start", json=AT_DOOR, headers=headers)
    assert on_time.status == 200


async def test_assign_resident_own_worker_rejected(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 30_000))
    user = await User.get(id=worker.user_id)
    headers = {"Authorization": f"Bearer {await token_for_user(services, user)}"}
    created = await _create(client, headers)
    _, response = await client.post(
        f"/api/v1/admin/service-requests/{created['id']}/assign", json={"worker_id": worker.id},
        headers=await officer_headers(services),
    )
    assert response.status == 409
    assert response.json["error"]["code"] == "worker_conflict_of_interest"


async def test_failed_creates_do_not_use_hourly_budget(services, client):
    services.settings = dataclasses.replace(services.settings, rate_requests_per_user_per_hour=2)
    await make_city()
    resident, _ = await login_resident(client)
    for _ in range(5):
        _, bad = await client.post(BASE, json=request_body(category="gardening"), headers=resident)
        assert bad.status == 400
    statuses = []
    for _ in range(3):
        _, response = await client.post(BASE, json=request_body(), headers=resident)
        statuses.append(response.status)
    assert statuses == [201, 201, 429]


async def test_offered_request_without_open_offers_recovers(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1000))
    farther = await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=10_000)
    resident, _ = await login_resident(client)
    created = await _create(client, resident)
    # A crash between expiring the offers and moving the request on leaves exactly this state.
    await Offer.filter(service_request_id=created["id"]).update(status=OfferStatus.EXPIRED)

    done = await scheduler.run_once(services)

    assert done["offers_expired"] == 0
    request = await ServiceRequest.get(id=created["id"])
    assert request.search_ring == 2
    assert await _offered_ids(request.id) == {farther.id}
