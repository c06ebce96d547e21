"""Who is matched: the matchable-worker rules, radius edges and the ranking order."""

from __future__ import annotations

import dataclasses

from backend.models import Agency, AgencyStatus
from backend.workers import sync_agency_workers
from tests.factories import SIMING, login_resident, make_city, make_worker, north_of, offered_worker_ids, request_body


async def _candidate_ids(client, headers, **overrides) -> list[int]:
    _, response = await client.post("/api/v1/service-requests", json=request_body(**overrides), headers=headers)
    assert response.status == 201, response.json
    return await offered_worker_ids(response.json["id"])


async def test_only_matchable_workers_are_offered(services, client):
    agencies = await make_city()
    point = north_of(SIMING, 500)
    good = await make_worker(services, agencies["approved"], point)
    await make_worker(services, agencies["approved"], point, verified=False, on_duty=False)
    await make_worker(services, agencies["approved"], point, on_duty=False)
    await make_worker(services, agencies["pending"], point)
    await make_worker(services, agencies["approved"], point, categories=("medical_escort",))
    headers, _ = await login_resident(client)

    assert await _candidate_ids(client, headers) == [good.id]


async def test_certificate_level_below_minimum_not_offered(services, client):
    agencies = await make_city()
    assistant = await make_worker(services, agencies["approved"], categories=("child_care",), level="assistant")
    senior = await make_worker(services, agencies["approved"], categories=("child_care",), level="senior")
    headers, _ = await login_resident(client)

    ids = await _candidate_ids(client, headers, category="child_care")
    assert senior.id in ids
    assert assistant.id not in ids


async def test_worker_service_radius_limits_offers(services, client):
    agencies = await make_city()
    short_reach = await make_worker(services, agencies["approved"], north_of(SIMING, 2000), radius_m=1500)
    long_reach = await make_worker(services, agencies["approved"], north_of(SIMING, 2000), radius_m=2500)
    headers, _ = await login_resident(client)

    ids = await _candidate_ids(client, headers)
    assert long_reach.id in ids
    assert short_reach.id not in ids


async def test_search_radius_edge(services, client):
    agencies = await make_city()
    inside = await make_worker(services, agencies["approved"], north_of(SIMING, 4900), radius_m=10_000)
    outside = await make_worker(services, agencies["approved"], north_of(SIMING, 5100), radius_m=10_000)
    headers, _ = await login_resident(client)

    ids = await _candidate_ids(client, headers)
    assert inside.id in ids
    assert outside.id not in ids


async def test_top_k_offers_only(services, client):
    agencies = await make_city()
    workers = [await make_worker(services, agencies["approved"], north_of(SIMING, 100 * i)) for i in range(1, 9)]
    headers, _ = await login_resident(client)

    ids = await _candidate_ids(client, headers)
    assert len(ids) == services.settings.offer_count == 5
    assert ids == [w.id for w in workers[:5]]


async def test_no_candidates_stays_matching(services, client):
    await make_city()
    headers, _ = await login_resident(client)
    _, response = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)
    assert response.status == 201
    assert response.json["status"] == "matching"
    assert response.json["offers"] == {"count": 0, "nearest_band": None}


async def test_agency_suspension_removes_its_workers(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    await Agency.filter(id=agencies["approved"].id).update(status=AgencyStatus.SUSPENDED)
    await sync_agency_workers(services.index, agencies["approved"].id)
    headers, _ = await login_resident(client)

    assert worker.id not in await _candidate_ids(client, headers)


async def test_rating_breaks_tie_at_same_distance(services, client):
    agencies = await make_city()
    point = north_of(SIMING, 1000)
    plain = await make_worker(services, agencies["approved"], point)
    liked = await make_worker(services, agencies["approved"], point)
    disliked = await make_worker(services, agencies["approved"], point)
    liked.rating_sum, liked.rating_count = 50, 10
    disliked.rating_sum, disliked.rating_count = 15, 10
    await liked.save()
    await disliked.save()
    from backend.workers import sync_worker

    await sync_worker(services.index, liked.id)
    await sync_worker(services.index, disliked.id)
    headers, _ = await login_resident(client)

    # A new worker sits between the well rated and the badly rated one.
    assert await _candidate_ids(client, headers) == [liked.id, plain.id, disliked.id]


async def test_resident_never_offered_own_request(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    other = await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    from backend.models import User
    from tests.factories import token_for_user

    user = await User.get(id=worker.user_id)
    headers = {"Authorization": f"Bearer {await token_for_user(services, user)}"}
    assert await _candidate_ids(client, headers) == [other.id]


async def test_offer_count_setting(services, client, app):
    agencies = await make_city()
    for i in range(1, 4):
        await make_worker(services, agencies["approved"], north_of(SIMING, 100 * i))
    services.settings = dataclasses.replace(services.settings, offer_count=2)
    headers, _ = await login_resident(client)
    assert len(await _candidate_ids(client, headers)) == 2


async def test_language_preferred_when_spoken(services, client):
    agencies = await make_city()
    mandarin = await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    minnan = await make_worker(services, agencies["approved"], north_of(SIMING, 2000))
    minnan.languages = ["普通话", "闽南语"]
    await minnan.save()
    from backend.workers import sync_worker

    await sync_worker(services.index, minnan.id)
    headers, _ = await login_resident(client)

    assert await _candidate_ids(client, headers, language="闽南语") == [minnan.id]
    assert await _candidate_ids(client, headers) == [mandarin.id, minnan.id]


async def test_unspoken_language_falls_back(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    headers, _ = await login_resident(client)
    assert await _candidate_ids(client, headers, language="English") == [worker.id]


async def test_bad_language_rejected(services, client):
    await make_city()
    headers, _ = await login_resident(client)
    _, response = await client.post("/api/v1/service-requests", json=request_body(language=["普通话"]), headers=headers)
    assert response.status == 400
    assert response.json["error"]["field"] == "language"
