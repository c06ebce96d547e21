"""The whole journey through HTTP: ask, match, accept, start, complete, rate, credit moves."""

from __future__ import annotations

from tests.factories import (
    AT_DOOR,
    SIMING,
    login_resident,
    make_city,
    make_worker,
    north_of,
    offered_worker_ids,
    officer_headers,
    request_body,
    worker_headers,
)


async def test_request_matched_accepted_completed_rated(services, client):
    agencies = await make_city()
    near = await make_worker(services, agencies["approved"], north_of(SIMING, 800))
    far = await make_worker(services, agencies["approved"], north_of(SIMING, 3000))
    resident, _ = await login_resident(client)

    _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=resident)
    assert created.status == 201, created.json
    assert created.json["status"] == "offered"
    assert created.json["offers"] == {"count": 2, "nearest_band": {"code": "within_1km", "label": "1 公里内"}}
    assert await offered_worker_ids(created.json["id"]) == [near.id, far.id]
    request_id = created.json["id"]

    near_headers = await worker_headers(services, near)
    _, offers = await client.get("/api/v1/workers/me/offers", headers=near_headers)
    assert offers.status == 200
    assert [o["request_id"] for o in offers.json["items"]] == [request_id]
    assert "address" not in offers.json["items"][0]

    _, accepted = await client.post(f"/api/v1/service-requests/{request_id}/accept", headers=near_headers)
    assert accepted.status == 200, accepted.json
    assert accepted.json["status"] == "accepted"
    assert accepted.json["address"] == request_body()["address"]

    _, late = await client.post(
        f"/api/v1/service-requests/{request_id}/accept", headers=await worker_headers(services, far)
    )
    assert late.status == 409
    assert late.json["error"]["code"] == "already_taken"

    _, started = await client.post(f"/api/v1/service-requests/{request_id}/start", json=AT_DOOR, headers=near_headers)
    assert started.json["status"] == "in_service"
    _, completed = await client.post(
        f"/api/v1/service-requests/{request_id}/complete",
        json={"service_minutes": 10, "summary": "协助老人洗浴并陪同聊天", **AT_DOOR},
        headers=near_headers,
    )
    assert completed.json["status"] == "completed", completed.json

    _, rated = await client.post(
        f"/api/v1/service-requests/{request_id}/rating", json={"stars": 5, "comment": "很耐心"}, headers=resident
    )
    assert rated.status == 201, rated.json

    officer = await officer_headers(services)
    agency_id = agencies["approved"].id
    _, credit = await client.get(f"/api/v1/agencies/{agency_id}/credit", headers=officer)
    assert credit.status == 200
    assert credit.json["score"] > 75.0
    assert credit.json["history"][0]["reason_code"] == "rating"
    assert credit.json["history"][0]["reason"] == f"服务需求 {request_id} 获得 5 星评价"
    _, ratings = await client.get(f"/api/v1/agencies/{agency_id}/ratings", headers=officer)
    assert ratings.json == {"count": 1, "average": 5.0, "distribution": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1}}
