"""Request validation, visibility and the state rules of accept, start, complete, rate, cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from backend import service_requests
from backend.errors import Conflict
from backend.geo import wgs84_to_gcj02
from backend.models import Offer, OfferStatus, RequestStatus, Role, ServiceRequest, User
from miniprogram_api.views import distance_band
from tests.factories import (
    AT_DOOR,
    SIMING,
    login_resident,
    make_city,
    make_worker,
    north_of,
    officer_headers,
    request_body,
    worker_headers,
)

BASE = "/api/v1/service-requests"


async def _offered_request(services, client, workers: int = 2):
    agencies = await make_city()
    made = [await make_worker(services, agencies["approved"], north_of(SIMING, 200 * (i + 1))) for i in range(workers)]
    resident, _ = await login_resident(client)
    _, response = await client.post(BASE, json=request_body(), headers=resident)
    assert response.status == 201
    return response.json["id"], resident, made


@pytest.mark.parametrize(
    ("location", "field"),
    [
        (None, "location"),
        ("24.4,118.0", "location"),
        ({"lat": 24.46}, "location.lng"),
        ({"lat": "24.46", "lng": 118.08}, "location.lat"),
        ({"lat": 91, "lng": 118.08}, "location.lat"),
        ({"lat": 24.46, "lng": -181}, "location.lng"),
        ({"lat": True, "lng": 118.08}, "location.lat"),
        ({"lat": 24.46, "lng": 118.08, "coord_system": "bd09"}, "location.coord_system"),
    ],
)
async def test_create_bad_location(services, client, location, field):
    await make_city()
    resident, _ = await login_resident(client)
    _, response = await client.post(BASE, json=request_body(location=location), headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] == field
    assert response.json["error"]["code"] == "invalid_input"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_create_non_finite_coordinate(services, client, literal):
    await make_city()
    resident, _ = await login_resident(client)
    raw = (
        '{"category": "elderly_care", "description": "陪伴", "address": "思明区某路1号",'
        f' "location": {{"lat": {literal}, "lng": 118.08}}}}'
    )
    _, response = await client.post(BASE, content=raw.encode(), headers={**resident, "content-type": "application/json"})
    assert response.status == 400
    assert response.json["error"]["field"] == "location.lat"


@pytest.mark.parametrize(
    "point", [(24.30, 118.20), (39.9042, 116.4074), (24.5, 118.6)]  # sea south of Xiamen, Beijing, Quanzhou side
)
async def test_create_outside_service_area(services, client, point):
    await make_city()
    resident, _ = await login_resident(client)
    _, response = await client.post(BASE, json=request_body(point=point), headers=resident)
    assert response.status == 400
    assert response.json["error"]["code"] == "outside_service_area"
    assert response.json["error"]["field"] == "location"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"category": "gardening"}, "category"),
        ({"category": None}, "category"),
        ({"description": ""}, "description"),
        ({"description": "   "}, "description"),
        ({"description": "长" * 1001}, "description"),
        ({"address": 5}, "address"),
        ({"address": "路" * 201}, "address"),
    ],
)
async def test_create_bad_fields(services, client, overrides, field):
    await make_city()
    resident, _ = await login_resident(client)
    _, response = await client.post(BASE, json=request_body(**overrides), headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] == field


async def test_create_requires_login(services, client):
    _, response = await client.post(BASE, json=request_body())
    assert response.status == 401


async def test_wgs84_location_converted(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    wgs_lat, wgs_lng = 24.4650, 118.0830
    body = request_body(location={"lat": wgs_lat, "lng": wgs_lng, "coord_system": "wgs84"})
    _, response = await client.post(BASE, json=body, headers=resident)
    assert response.status == 201
    expected = wgs84_to_gcj02(wgs_lat, wgs_lng)
    assert math.isclose(response.json["location"]["lat"], expected[0], abs_tol=1e-9)
    assert math.isclose(response.json["location"]["lng"], expected[1], abs_tol=1e-9)
    assert response.json["location"]["coord_system"] == "gcj02"


async def test_other_resident_cannot_read(services, client):
    request_id, _, _ = await _offered_request(services, client)
    other, _ = await login_resident(client, "resident-b")
    _, response = await client.get(f"{BASE}/{request_id}", headers=other)
    assert response.status == 404
    for action in ("cancel", "rating", "accept"):
        _, response = await client.post(f"{BASE}/{request_id}/{action}", json={"stars": 5}, headers=other)
        assert response.status in (403, 404), action
        assert "address" not in response.text


@pytest.mark.parametrize("raw_id", ["abc", "99999999999", "-1", "1.5", "%E4%B8%80"])
async def test_malformed_ids_not_found(services, client, raw_id):
    resident, _ = await login_resident(client)
    _, response = await client.get(f"{BASE}/{raw_id}", headers=resident)
    assert response.status == 404
    assert response.json["error"]["code"] == "not_found"


async def test_offered_worker_sees_no_address(services, client):
    request_id, _, workers = await _offered_request(services, client)
    headers = await worker_headers(services, workers[0])
    _, response = await client.get(f"{BASE}/{request_id}", headers=headers)
    assert response.status == 200
    assert response.json["street"]["name"]
    for hidden in ("address", "description", "location", "resident", "candidates"):
        assert hidden not in response.json
    assert "厦禾路" not in response.text


async def test_resident_sees_offer_summary_only(services, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"], north_of(SIMING, 1234))
    await make_worker(services, agencies["approved"], north_of(SIMING, 2345))
    resident, _ = await login_resident(client)
    expected = {"count": 2, "nearest_band": {"code": "1_to_3km", "label": "1-3 公里"}}

    _, created = await client.post(BASE, json=request_body(), headers=resident)
    _, read = await client.get(f"{BASE}/{created.json['id']}", headers=resident)

    for response in (created, read):
        assert response.json["offers"] == expected
        assert "candidates" not in response.json
        assert "distance_m" not in response.text
        assert "worker_id" not in response.text


async def test_officer_sees_exact_candidate_distances(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], north_of(SIMING, 1234))
    resident, _ = await login_resident(client)
    _, created = await client.post(BASE, json=request_body(), headers=resident)

    _, read = await client.get(f"{BASE}/{created.json['id']}", headers=await officer_headers(services))

    [candidate] = read.json["candidates"]
    assert candidate["worker_id"] == worker.id
    assert abs(candidate["distance_m"] - 1234) <= 1
    assert candidate["offer_status"] == "open"
    assert "offers" not in read.json


@pytest.mark.parametrize(
    ("metres", "code"),
    [(0, "within_1km"), (1000, "within_1km"), (1001, "1_to_3km"), (3000, "1_to_3km"), (4999, "3_to_5km"),
     (5001, "over_5km"), (19_000, "over_5km")],
)
def test_distance_band_edges(metres, code):
    assert distance_band(metres)["code"] == code


async def test_offer_summary_counts_open_offers(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    await client.post(f"{BASE}/{request_id}/decline", headers=await worker_headers(services, workers[0]))

    _, read = await client.get(f"{BASE}/{request_id}", headers=resident)

    assert read.json["offers"]["count"] == 1
    assert read.json["offers"]["nearest_band"]["code"] == "within_1km"


async def test_assigned_worker_sees_address(services, client):
    request_id, _, workers = await _offered_request(services, client)
    headers = await worker_headers(services, workers[0])
    await client.post(f"{BASE}/{request_id}/accept", headers=headers)
    _, response = await client.get(f"{BASE}/{request_id}", headers=headers)
    assert response.json["address"] == request_body()["address"]


async def test_worker_without_offer_cannot_accept(services, client):
    request_id, _, _ = await _offered_request(services, client)
    from backend.models import Agency

    stranger = await make_worker(services, await Agency.get(name="思明第二社工中心"), north_of(SIMING, 9000))
    _, response = await client.post(f"{BASE}/{request_id}/accept", headers=await worker_headers(services, stranger))
    assert response.status == 404


async def test_resident_cannot_accept_or_verify(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    _, accept = await client.post(f"{BASE}/{request_id}/accept", headers=resident)
    assert accept.status == 403
    assert accept.json["error"]["code"] == "not_a_worker"
    _, verify = await client.post(f"/api/v1/admin/workers/{workers[0].id}/verify", headers=resident)
    assert verify.status == 403
    assert verify.json["error"]["code"] == "forbidden"


async def test_accept_retry_by_winner_is_ok(services, client):
    request_id, _, workers = await _offered_request(services, client)
    headers = await worker_headers(services, workers[0])
    _, first = await client.post(f"{BASE}/{request_id}/accept", headers=headers)
    _, again = await client.post(f"{BASE}/{request_id}/accept", headers=headers)
    assert first.status == again.status == 200


async def _make_officer(worker) -> None:
    user = await User.get(id=worker.user_id)
    user.roles = [*user.roles, Role.OFFICER.value]
    await user.save(update_fields=["roles"])


async def test_officer_worker_starts_and_completes(services, client):
    request_id, _, workers = await _offered_request(services, client)
    await _make_officer(workers[0])
    headers = await worker_headers(services, workers[0])

    _, accepted = await client.post(f"{BASE}/{request_id}/accept", headers=headers)
    _, started = await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=headers)
    _, completed = await client.post(
        f"{BASE}/{request_id}/complete", json={"service_minutes": 10, "summary": "陪同就医", **AT_DOOR}, headers=headers
    )

    assert accepted.status == 200, accepted.json
    assert started.status == 200, started.json
    assert completed.status == 200, completed.json
    assert completed.json["status"] == "completed"


async def test_officer_worker_withdraws_and_declines(services, client):
    request_id, _, workers = await _offered_request(services, client)
    await _make_officer(workers[0])
    await _make_officer(workers[1])
    first = await worker_headers(services, workers[0])
    second = await worker_headers(services, workers[1])

    _, declined = await client.post(f"{BASE}/{request_id}/decline", headers=second)
    _, accepted = await client.post(f"{BASE}/{request_id}/accept", headers=first)
    _, withdrawn = await client.post(f"{BASE}/{request_id}/withdraw", headers=first)

    assert declined.status == 200, declined.json
    assert accepted.status == 200, accepted.json
    assert withdrawn.status == 200, withdrawn.json
    offers = {offer.worker_id: offer.status for offer in await Offer.filter(service_request_id=request_id)}
    assert offers == {workers[0].id: OfferStatus.WITHDRAWN, workers[1].id: OfferStatus.DECLINED}


async def test_start_and_complete_only_by_assigned(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    winner = await worker_headers(services, workers[0])
    loser = await worker_headers(services, workers[1])

    _, early = await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=winner)
    assert early.status == 403
    await client.post(f"{BASE}/{request_id}/accept", headers=winner)
    _, by_loser = await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=loser)
    assert by_loser.status == 403
    _, by_resident = await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=resident)
    assert by_resident.status == 403

    _, complete_early = await client.post(
        f"{BASE}/{request_id}/complete", json={"service_minutes": 30, "summary": "完成", **AT_DOOR}, headers=winner
    )
    assert complete_early.status == 409
    _, started = await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=winner)
    assert started.status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"summary": "完成", **AT_DOOR}, "service_minutes"),
        ({"service_minutes": 0, "summary": "完成", **AT_DOOR}, "service_minutes"),
        ({"service_minutes": 1441, "summary": "完成", **AT_DOOR}, "service_minutes"),
        ({"service_minutes": "30", "summary": "完成", **AT_DOOR}, "service_minutes"),
        ({"service_minutes": 30.5, "summary": "完成", **AT_DOOR}, "service_minutes"),
        ({"service_minutes": 30, **AT_DOOR}, "summary"),
    ],
)
async def test_complete_bad_body(services, client, body, field):
    request_id, _, workers = await _offered_request(services, client)
    winner = await worker_headers(services, workers[0])
    await client.post(f"{BASE}/{request_id}/accept", headers=winner)
    await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=winner)
    _, response = await client.post(f"{BASE}/{request_id}/complete", json=body, headers=winner)
    assert response.status == 400
    assert response.json["error"]["field"] == field
    found = await ServiceRequest.get(id=request_id)
    assert found.status == RequestStatus.IN_SERVICE


async def _completed_request(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    winner = await worker_headers(services, workers[0])
    await client.post(f"{BASE}/{request_id}/accept", headers=winner)
    await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=winner)
    _, done = await client.post(
        f"{BASE}/{request_id}/complete", json={"service_minutes": 10, "summary": "陪同就医", **AT_DOOR}, headers=winner
    )
    assert done.status == 200
    return request_id, resident, winner


async def test_rating_only_after_completion(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    _, response = await client.post(f"{BASE}/{request_id}/rating", json={"stars": 5}, headers=resident)
    assert response.status == 409
    assert response.json["error"]["code"] == "invalid_status"


async def test_rating_once(services, client):
    request_id, resident, _ = await _completed_request(services, client)
    _, first = await client.post(f"{BASE}/{request_id}/rating", json={"stars": 4}, headers=resident)
    _, second = await client.post(f"{BASE}/{request_id}/rating", json={"stars": 1}, headers=resident)
    assert first.status == 201
    assert second.status == 409
    assert second.json["error"]["code"] == "already_rated"


async def test_rating_only_by_resident(services, client):
    request_id, _, winner = await _completed_request(services, client)
    _, response = await client.post(f"{BASE}/{request_id}/rating", json={"stars": 5}, headers=winner)
    assert response.status == 403


@pytest.mark.parametrize("body", [{}, {"stars": 0}, {"stars": 6}, {"stars": "5"}, {"stars": 4.5}, {"stars": True},
                                  {"stars": 5, "comment": 3}, {"stars": 5, "comment": "好" * 501}])
async def test_rating_bad_body(services, client, body):
    request_id, resident, _ = await _completed_request(services, client)
    _, response = await client.post(f"{BASE}/{request_id}/rating", json=body, headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] in ("stars", "comment")


async def test_one_rating_moves_credit_a_little(services, client):
    request_id, resident, _ = await _completed_request(services, client)
    await client.post(f"{BASE}/{request_id}/rating", json={"stars": 1}, headers=resident)
    _, credit = await client.get(
        f"/api/v1/agencies/{(await _agency_id(request_id))}/credit", headers=await officer_headers(services)
    )
    assert 70.0 <= credit.json["score"] < 75.0
    assert len(credit.json["history"]) == 1


async def test_credit_components_kept_after_status_change(services, client):
    request_id, resident, _ = await _completed_request(services, client)
    await client.post(f"{BASE}/{request_id}/rating", json={"stars": 1}, headers=resident)
    agency_id = await _agency_id(request_id)
    officer = await officer_headers(services)
    _, rated = await client.get(f"/api/v1/agencies/{agency_id}/credit", headers=officer)

    _, suspended = await client.put(
        f"/api/v1/admin/agencies/{agency_id}/status", json={"status": "suspended"}, headers=officer
    )
    _, after = await client.get(f"/api/v1/agencies/{agency_id}/credit", headers=officer)

    assert suspended.status == 200
    assert after.json["history"][0]["reason_code"] == "status_suspended"
    assert after.json["components"] == rated.json["components"]
    assert after.json["components"]["rating_count"] == 1
    assert after.json["components"]["ratings"] == after.json["score"]


async def _agency_id(request_id: int) -> int:
    request = await ServiceRequest.get(id=request_id).prefetch_related("worker")
    return request.worker.agency_id


async def test_cancel_before_start(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    _, cancelled = await client.post(f"{BASE}/{request_id}/cancel", headers=resident)
    assert cancelled.json["status"] == "cancelled"
    _, accept = await client.post(f"{BASE}/{request_id}/accept", headers=await worker_headers(services, workers[0]))
    assert accept.status == 409
    assert accept.json["error"]["code"] == "request_cancelled"
    _, offers = await client.get("/api/v1/workers/me/offers", headers=await worker_headers(services, workers[1]))
    assert offers.json["items"] == []


async def test_cancel_after_start_rejected(services, client):
    request_id, resident, workers = await _offered_request(services, client)
    winner = await worker_headers(services, workers[0])
    await client.post(f"{BASE}/{request_id}/accept", headers=winner)
    await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=winner)
    _, response = await client.post(f"{BASE}/{request_id}/cancel", headers=resident)
    assert response.status == 409


async def test_concurrent_accepts_one_winner_http(services, client):
    services.settings = dataclasses.replace(services.settings, offer_count=20)
    request_id, _, workers = await _offered_request(services, client, workers=20)
    headers = [await worker_headers(services, worker) for worker in workers]

    responses = await asyncio.gather(*(client.post(f"{BASE}/{request_id}/accept", headers=h) for h in headers))

    statuses = sorted(response.status for _, response in responses)
    assert statuses == [200] + [409] * 19
    assert {response.json["error"]["code"] for _, response in responses if response.status == 409} == {"already_taken"}
    found = await ServiceRequest.get(id=request_id)
    winner_ids = [w.id for w, (_, r) in zip(workers, responses) if r.status == 200]
    assert found.worker_id == winner_ids[0]


async def test_concurrent_accepts_one_winner_service(services, client):
    services.settings = dataclasses.replace(services.settings, offer_count=20)
    request_id, _, workers = await _offered_request(services, client, workers=20)
    users = [await User.get(id=worker.user_id) for worker in workers]

    results = await asyncio.gather(
        *(service_requests.accept_request(services, user, request_id) for user in users), return_exceptions=True
    )

    winners = [r for r in results if not isinstance(r, Exception)]
    conflicts = [r for r in results if isinstance(r, Conflict)]
    assert len(winners) == 1
    assert len(conflicts) == 19


async def test_repeat_ratings_count_once(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    worker_auth = await worker_headers(services, worker)
    resident, _ = await login_resident(client, "repeat-rater")
    officer = await officer_headers(services)

    for stars in (5, 5, 2):
        _, created = await client.post(BASE, json=request_body(), headers=resident)
        request_id = created.json["id"]
        await client.post(f"{BASE}/{request_id}/accept", headers=worker_auth)
        await client.post(f"{BASE}/{request_id}/start", json=AT_DOOR, headers=worker_auth)
        await client.post(
            f"{BASE}/{request_id}/complete", json={"service_minutes": 10, "summary": "陪伴", **AT_DOOR},
            headers=worker_auth,
        )
        _, rated = await client.post(f"{BASE}/{request_id}/rating", json={"stars": stars}, headers=resident)
        assert rated.status == 201

    await worker.refresh_from_db()
    assert worker.rating_count == 1
    assert worker.rating_sum == 2
    _, ratings = await client.get(f"/api/v1/agencies/{agencies['approved'].id}/ratings", headers=officer)
    assert ratings.json["count"] == 1
    assert ratings.json["distribution"]["2"] == 1
