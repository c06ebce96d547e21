"""Worker registration: the name check, the own profile (GET /api/v1/workers/me), and registering again
after a rejection."""

from __future__ import annotations

import asyncio

import pytest

from backend.models import Worker, WorkerStatus
from tests.factories import SIMING, login_resident, make_city, officer_headers

ME = "/api/v1/workers/me"


def _registration(agency_id: int, certificate_no: str, **overrides) -> dict:
    body = {
        "agency_id": agency_id,
        "name": "林晓",
        "certificate_level": "assistant",
        "certificate_no": certificate_no,
        "categories": ["elderly_care"],
        "location": {"lat": SIMING[0], "lng": SIMING[1]},
        "service_radius_m": 3000,
    }
    body.update(overrides)
    return body


async def _rejected_worker(services, client, agencies, person: str = "rejected-worker") -> tuple[dict, int]:
    """Register a resident as a worker, have an officer reject them, and return their headers and worker id."""
    headers, _ = await login_resident(client, person)
    _, registered = await client.post(ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=headers)
    assert registered.status == 201, registered.json
    _, rejected = await client.post(
        f"/api/v1/admin/workers/{registered.json['id']}/reject",
        json={"reason": "证书编号无法核实"},
        headers=await officer_headers(services),
    )
    assert rejected.status == 200, rejected.json
    return headers, registered.json["id"]


async def test_profile_shows_rejection_reason(services, client):
    agencies = await make_city()
    headers, worker_id = await _rejected_worker(services, client, agencies)

    _, response = await client.get(ME, headers=headers)

    assert response.status == 200
    profile = response.json
    assert profile["id"] == worker_id
    assert profile["status"] == "rejected"
    assert profile["rejection_reason"] == "证书编号无法核实"
    assert profile["certificate_level"] == "assistant"
    assert profile["certificate_no"] == "XMWRONG1"
    assert profile["agency"] == {"id": agencies["approved"].id, "name": "思明测试社工中心", "status": "approved"}
    assert profile["on_duty"] is False
    assert profile["categories"] == ["elderly_care"]


async def test_profile_without_registration_not_found(services, client):
    headers, _ = await login_resident(client, "never-registered")

    _, response = await client.get(ME, headers=headers)

    assert response.status == 404
    assert response.json["error"]["code"] == "not_a_worker"


async def test_profile_is_callers_own(services, client):
    agencies = await make_city()
    first, _ = await login_resident(client, "worker-one")
    second, _ = await login_resident(client, "worker-two")
    _, registered_first = await client.post(ME, json=_registration(agencies["approved"].id, "XM-ONE"), headers=first)
    _, registered_second = await client.post(
        ME, json=_registration(agencies["other"].id, "XM-TWO", name="陈岚"), headers=second
    )

    _, first_profile = await client.get(ME, headers=first)
    _, second_profile = await client.get(ME, headers=second)

    assert first_profile.json["id"] == registered_first.json["id"]
    assert first_profile.json["certificate_no"] == "XMONE"
    assert second_profile.json["id"] == registered_second.json["id"]
    assert second_profile.json["name"] == "陈岚"
    assert second_profile.json["agency"]["id"] == agencies["other"].id


async def test_profile_needs_login(client):
    _, response = await client.get(ME)

    assert response.status == 401


async def test_rejected_worker_registers_again(services, client):
    agencies = await make_city()
    headers, worker_id = await _rejected_worker(services, client, agencies)

    _, again = await client.post(
        ME,
        json=_registration(agencies["other"].id, "XM-RIGHT-1", certificate_level="intermediate"),
        headers=headers,
    )
    _, profile = await client.get(ME, headers=headers)
    _, pending = await client.get("/api/v1/admin/workers?status=pending", headers=await officer_headers(services))

    assert again.status == 200, again.json
    assert again.json == {"id": worker_id, "status": "pending"}
    assert profile.json["status"] == "pending"
    assert profile.json["rejection_reason"] is None
    assert profile.json["certificate_no"] == "XMRIGHT1"
    assert profile.json["certificate_level"] == "intermediate"
    assert profile.json["agency"]["id"] == agencies["other"].id
    assert [item["id"] for item in pending.json["items"]] == [worker_id]
    assert await Worker.all().count() == 1


async def test_rejected_worker_keeps_own_certificate_no(services, client):
    agencies = await make_city()
    headers, worker_id = await _rejected_worker(services, client, agencies)

    _, again = await client.post(ME, json=_registration(agencies["approved"].id, "xm-wrong-1"), headers=headers)

    assert again.status == 200, again.json
    assert (await Worker.get(id=worker_id)).status == WorkerStatus.PENDING


async def test_resubmission_certificate_no_stays_unique(services, client):
    agencies = await make_city()
    other, _ = await login_resident(client, "certificate-holder")
    _, holder = await client.post(ME, json=_registration(agencies["approved"].id, "XM-HELD-1"), headers=other)
    headers, worker_id = await _rejected_worker(services, client, agencies)

    _, duplicate = await client.post(ME, json=_registration(agencies["approved"].id, "XM-HELD-1"), headers=headers)

    assert holder.status == 201
    assert duplicate.status == 409
    assert duplicate.json["error"]["code"] == "certificate_no_taken"
    assert duplicate.json["error"]["field"] == "certificate_no"
    rejected = await Worker.get(id=worker_id)
    assert rejected.status == WorkerStatus.REJECTED
    assert rejected.certificate_no == "XMWRONG1"


async def test_rejected_certificate_no_taken_by_holder(services, client):
    agencies = await make_city()
    rejected_headers, rejected_id = await _rejected_worker(services, client, agencies)
    holder, _ = await login_resident(client, "real-holder")

    _, taken = await client.post(ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=holder)
    _, rejected_profile = await client.get(ME, headers=rejected_headers)
    _, listed = await client.get("/api/v1/admin/workers?status=rejected", headers=await officer_headers(services))
    _, reused = await client.post(
        ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=rejected_headers
    )
    _, own_number = await client.post(
        ME, json=_registration(agencies["approved"].id, "XM-OWN-2"), headers=rejected_headers
    )

    assert taken.status == 201, taken.json
    assert (await Worker.get(id=taken.json["id"])).certificate_no == "XMWRONG1"
    assert rejected_profile.json["status"] == "rejected"
    assert rejected_profile.json["certificate_no"] is None
    assert listed.json["items"][0]["id"] == rejected_id
    assert listed.json["items"][0]["certificate_no"] is None
    assert reused.status == 409
    assert reused.json["error"]["code"] == "certificate_no_taken"
    assert own_number.status == 200, own_number.json
    assert (await Worker.get(id=rejected_id)).certificate_no == "XMOWN2"


@pytest.mark.parametrize(("holder_status", "claim_status"), [("pending", 409), ("verified", 409), ("rejected", 201)])
async def test_certificate_no_claim_by_holder_status(services, client, holder_status, claim_status):
    agencies = await make_city()
    officer = await officer_headers(services)
    holder, _ = await login_resident(client, "first-holder")
    _, registered = await client.post(ME, json=_registration(agencies["approved"].id, "XM-HELD-2"), headers=holder)
    if holder_status == "verified":
        await client.post(f"/api/v1/admin/workers/{registered.json['id']}/verify", headers=officer)
    if holder_status == "rejected":
        await client.post(
            f"/api/v1/admin/workers/{registered.json['id']}/reject", json={"reason": "证书编号无法核实"}, headers=officer
        )
    claimant, _ = await login_resident(client, "claimant")

    _, claim = await client.post(ME, json=_registration(agencies["approved"].id, "XM-HELD-2"), headers=claimant)

    assert claim.status == claim_status, claim.json
    first = await Worker.get(id=registered.json["id"])
    assert first.status.value == holder_status
    if claim_status == 409:
        assert claim.json["error"]["code"] == "certificate_no_taken"
        assert first.certificate_no == "XMHELD2"
    else:
        assert first.certificate_no == f"released:{first.id}"
    assert await Worker.filter(certificate_no="XMHELD2").count() == 1


async def test_concurrent_claims_take_rejected_number_once(services, client):
    agencies = await make_city()
    _, rejected_id = await _rejected_worker(services, client, agencies)
    claimants = [(await login_resident(client, f"claimant-{number}"))[0] for number in range(3)]

    responses = await asyncio.gather(
        *(
            client.post(ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=headers)
            for headers in claimants
        )
    )
    statuses = sorted(response.status for _, response in responses)

    assert statuses == [201, 409, 409]
    for _, response in responses:
        if response.status == 409:
            assert response.json["error"]["code"] == "certificate_no_taken"
    assert await Worker.filter(certificate_no="XMWRONG1").count() == 1
    assert (await Worker.get(id=rejected_id)).certificate_no == f"released:{rejected_id}"


async def test_claim_races_rejected_resubmission(services, client):
    agencies = await make_city()
    rejected_headers, rejected_id = await _rejected_worker(services, client, agencies)
    claimant, _ = await login_resident(client, "racing-claimant")

    (_, resubmitted), (_, claimed) = await asyncio.gather(
        client.post(ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=rejected_headers),
        client.post(ME, json=_registration(agencies["approved"].id, "XM-WRONG-1"), headers=claimant),
    )

    assert sorted([resubmitted.status, claimed.status]) in ([200, 409], [201, 409])
    assert await Worker.filter(certificate_no="XMWRONG1").count() == 1
    rejected = await Worker.get(id=rejected_id)
    if resubmitted.status == 200:
        assert rejected.status == WorkerStatus.PENDING
        assert rejected.certificate_no == "XMWRONG1"
    else:
        assert resubmitted.json["error"]["code"] == "certificate_no_taken"
        assert rejected.status == WorkerStatus.REJECTED
        assert rejected.certificate_no == f"released:{rejected_id}"


@pytest.mark.parametrize("status", ["pending", "verified"])
async def test_reviewable_worker_cannot_register_again(services, client, status):
    agencies = await make_city()
    headers, _ = await login_resident(client, f"{status}-worker")
    _, registered = await client.post(ME, json=_registration(agencies["approved"].id, "XM-FIRST-1"), headers=headers)
    if status == "verified":
        await client.post(
            f"/api/v1/admin/workers/{registered.json['id']}/verify", headers=await officer_headers(services)
        )

    _, again = await client.post(ME, json=_registration(agencies["other"].id, "XM-SECOND-1"), headers=headers)
    _, profile = await client.get(ME, headers=headers)

    assert again.status == 409
    assert again.json["error"]["code"] == "worker_exists"
    assert profile.json["status"] == status
    assert profile.json["certificate_no"] == "XMFIRST1"
    assert profile.json["agency"]["id"] == agencies["approved"].id


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("林\u202e晓", False),  # RIGHT-TO-LEFT OVERRIDE
        ("林\u200b晓", False),  # ZERO WIDTH SPACE
        ("\u200d林晓", False),  # ZERO WIDTH JOINER
        ("林晓\u2066", False),  # LEFT-TO-RIGHT ISOLATE
        ("\ufeff林晓", False),  # BYTE ORDER MARK
        ("林\n晓", False),
        ("林\u0007晓", False),  # BELL
        ("林\u2028晓", False),  # LINE SEPARATOR
        ("  林晓  ", True),
        ("阿卜杜·热合曼", True),
        ("Maria López", True),
        ("林 晓", True),
    ],
)
async def test_name_hidden_characters_rejected(services, client, name, accepted):
    agencies = await make_city()
    headers, _ = await login_resident(client, "name-check")

    _, response = await client.post(ME, json=_registration(agencies["approved"].id, "XM-NAME-1", name=name),
                                    headers=headers)

    if accepted:
        assert response.status == 201, response.json
        assert (await Worker.get(id=response.json["id"])).name == name.strip()
    else:
        assert response.status == 400
        assert response.json["error"]["code"] == "invalid_input"
        assert response.json["error"]["field"] == "name"
        assert not await Worker.exists()


async def test_resubmitted_name_checked_too(services, client):
    agencies = await make_city()
    headers, worker_id = await _rejected_worker(services, client, agencies)

    _, response = await client.post(ME, json=_registration(agencies["approved"].id, "XM-NAME-3", name="林\u202e晓"),
                                    headers=headers)

    assert response.status == 400
    assert response.json["error"]["field"] == "name"
    assert (await Worker.get(id=worker_id)).status == WorkerStatus.REJECTED
