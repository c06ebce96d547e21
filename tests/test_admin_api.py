"""Officers' review endpoints and the staff accounts they create."""

from __future__ import annotations

import asyncio

import pytest

from backend import accounts, workers
from backend.errors import ValidationError
from backend.locations import parse_location
from backend.models import Agency, AgencyStatus, Role, ServiceStation, User, Worker, WorkerStatus
from tests.factories import (
    SIMING,
    login_resident,
    make_city,
    make_worker,
    offered_worker_ids,
    officer_headers,
    request_body,
)


async def test_pending_workers_listed_and_rejected(services, client):
    agencies = await make_city()
    pending = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    await make_worker(services, agencies["approved"])
    officer = await officer_headers(services)

    _, listed = await client.get("/api/v1/admin/workers?status=pending", headers=officer)
    assert [item["id"] for item in listed.json["items"]] == [pending.id]
    assert listed.json["items"][0]["certificate_no"] == pending.certificate_no

    _, missing_reason = await client.post(f"/api/v1/admin/workers/{pending.id}/reject", json={}, headers=officer)
    assert missing_reason.status == 400
    _, rejected = await client.post(
        f"/api/v1/admin/workers/{pending.id}/reject", json={"reason": "证书编号无法核实"}, headers=officer
    )
    assert rejected.json == {"id": pending.id, "status": "rejected"}
    assert (await Worker.get(id=pending.id)).status == WorkerStatus.REJECTED


async def test_bad_status_filter(services, client):
    _, response = await client.get("/api/v1/admin/workers?status=all", headers=await officer_headers(services))
    assert response.status == 400
    assert response.json["error"]["field"] == "status"


async def test_admin_routes_need_officer(services, client):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    for method, path in [
        ("get", "/api/v1/admin/workers"),
        ("put", f"/api/v1/admin/agencies/{agencies['approved'].id}/status"),
        ("post", f"/api/v1/admin/agencies/{agencies['approved'].id}/managers"),
    ]:
        options = {} if method == "get" else {"json": {}}
        _, response = await getattr(client, method)(path, headers=resident, **options)
        assert response.status == 403, path


async def test_suspending_agency_stops_matching(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    officer = await officer_headers(services)
    _, suspended = await client.put(
        f"/api/v1/admin/agencies/{agencies['approved'].id}/status", json={"status": "suspended"}, headers=officer
    )
    assert suspended.json["status"] == "suspended"
    resident, _ = await login_resident(client)
    _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=resident)
    assert worker.id not in await offered_worker_ids(created.json["id"])
    _, credit = await client.get(f"/api/v1/agencies/{agencies['approved'].id}/credit", headers=officer)
    assert credit.json["history"][0]["reason_code"] == "status_suspended"
    assert "暂停" in credit.json["history"][0]["reason"]


@pytest.mark.parametrize("status", [["approved"], [], {}, [1], {"approved": True}])
async def test_agency_status_not_string_rejected(services, client, status):
    agencies = await make_city()
    agency = agencies["pending"]

    _, response = await client.put(
        f"/api/v1/admin/agencies/{agency.id}/status", json={"status": status}, headers=await officer_headers(services)
    )

    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_input"
    assert response.json["error"]["field"] == "status"
    assert (await Agency.get(id=agency.id)).status == AgencyStatus.PENDING


@pytest.mark.parametrize("certificate_level", [["senior"], {"senior": 1}])
async def test_certificate_level_not_string_rejected(services, certificate_level):
    agencies = await make_city()
    user = await User.create(openid="level-not-string", roles=[Role.RESIDENT.value])

    with pytest.raises(ValidationError) as caught:
        await workers.register_worker(
            services,
            user,
            agency_id=agencies["approved"].id,
            name="林晓",
            certificate_level=certificate_level,
            certificate_no="XM2024000777",
            categories=["elderly_care"],
            location=parse_location({"lat": SIMING[0], "lng": SIMING[1]}),
            service_radius_m=3000,
        )

    assert caught.value.field == "certificate_level"
    assert not await Worker.exists(user_id=user.id)


async def test_manager_account_reads_own_agency(services, client):
    agencies = await make_city()
    officer = await officer_headers(services)
    body = {"username": "manager-xm", "password": "manager-password-1"}
    _, created = await client.post(f"/api/v1/admin/agencies/{agencies['approved'].id}/managers", json=body,
                                   headers=officer)
    assert created.status == 201, created.json
    _, login = await client.post("/api/v1/auth/password-login", json=body)
    manager = {"Authorization": f"Bearer {login.json['token']}"}
    _, own = await client.get(f"/api/v1/agencies/{agencies['approved'].id}/credit", headers=manager)
    assert own.status == 200
    _, other = await client.get(f"/api/v1/agencies/{agencies['other'].id}/credit", headers=manager)
    assert other.status == 403
    _, duplicate = await client.post(f"/api/v1/admin/agencies/{agencies['other'].id}/managers", json=body,
                                     headers=officer)
    assert duplicate.status == 409


async def test_station_staff_account_reads_own_queue(services, client):
    await make_city()
    own_station, other_station = await ServiceStation.all().order_by("id").limit(2)
    officer = await officer_headers(services)
    body = {"username": "station-staff-xm", "password": "station-password-1"}

    _, created = await client.post(f"/api/v1/admin/stations/{own_station.id}/staff", json=body, headers=officer)
    _, login = await client.post("/api/v1/auth/password-login", json=body)
    staff = {"Authorization": f"Bearer {login.json['token']}"}
    _, own = await client.get(f"/api/v1/stations/{own_station.id}/queue", headers=staff)
    _, other = await client.get(f"/api/v1/stations/{other_station.id}/queue", headers=staff)

    assert created.status == 201, created.json
    assert created.json == {
        "id": created.json["id"],
        "username": "station-staff-xm",
        "roles": ["station_staff"],
        "station_id": own_station.id,
    }
    assert own.status == 200
    assert other.status == 403


@pytest.mark.parametrize("station_id", ["999999", "not-an-id"])
async def test_station_staff_unknown_station_not_found(services, client, station_id):
    body = {"username": "station-staff-xm", "password": "station-password-1"}
    _, response = await client.post(f"/api/v1/admin/stations/{station_id}/staff", json=body,
                                    headers=await officer_headers(services))
    assert response.status == 404
    assert response.json["error"]["code"] == "not_found"
    assert response.json["error"]["message"] == "找不到该服务站。"


@pytest.mark.parametrize("body", [{"username": "x", "password": "short"}, {"username": "", "password": "p" * 12},
                                  {"username": "x" * 65, "password": "p" * 12}, {}])
async def test_manager_bad_credentials(services, client, body):
    agencies = await make_city()
    _, response = await client.post(f"/api/v1/admin/agencies/{agencies['approved'].id}/managers", json=body,
                                    headers=await officer_headers(services))
    assert response.status == 400


async def test_manager_password_over_login_limit_rejected(services, client):
    agencies = await make_city()
    body = {"username": "manager-long", "password": "p" * (accounts.MAX_PASSWORD_CHARS + 1)}

    _, response = await client.post(f"/api/v1/admin/agencies/{agencies['approved'].id}/managers", json=body,
                                    headers=await officer_headers(services))

    assert response.status == 400
    assert response.json["error"]["field"] == "password"
    assert not await User.exists(username="manager-long")


async def test_manager_longest_password_logs_in(services, client):
    agencies = await make_city()
    body = {"username": "manager-longest", "password": "p" * accounts.MAX_PASSWORD_CHARS}

    _, created = await client.post(f"/api/v1/admin/agencies/{agencies['approved'].id}/managers", json=body,
                                   headers=await officer_headers(services))
    _, login = await client.post("/api/v1/auth/password-login", json=body)

    assert created.status == 201, created.json
    assert login.status == 200, login.json


@pytest.mark.parametrize("username", ["manager\u200b", "man\u202eager", "manager\u00ad", "manager\tone"])
async def test_username_with_hidden_characters_rejected(services, client, username):
    agencies = await make_city()
    body = {"username": username, "password": "manager-password-1"}

    _, response = await client.post(f"/api/v1/admin/agencies/{agencies['approved'].id}/managers", json=body,
                                    headers=await officer_headers(services))

    assert response.status == 400
    assert response.json["error"]["field"] == "username"
    assert not await User.filter(agency_id=agencies["approved"].id).exists()


@pytest.mark.parametrize("taken_as", ["Manager-XM", "MANAGER-xm", "ｍａｎａｇｅｒ-ｘｍ"])
async def test_username_differing_only_by_case_taken(services, client, taken_as):
    agencies = await make_city()
    officer = await officer_headers(services)
    path = f"/api/v1/admin/agencies/{agencies['approved'].id}/managers"
    _, first = await client.post(path, json={"username": "manager-xm", "password": "manager-password-1"},
                                 headers=officer)

    _, second = await client.post(path, json={"username": taken_as, "password": "manager-password-2"},
                                  headers=officer)

    assert first.status == 201, first.json
    assert second.status == 409
    assert second.json["error"]["code"] == "username_taken"
    assert await User.filter(agency_id=agencies["approved"].id).count() == 1


async def test_officer_cannot_create_request(services, client):
    await make_city()
    _, response = await client.post("/api/v1/service-requests", json=request_body(),
                                    headers=await officer_headers(services))
    assert response.status == 403
    assert response.json["error"]["code"] == "not_a_resident"


@pytest.mark.parametrize(
    ("text", "code"),
    [("老人独居\u0000", "invalid_text"), ("老人独居\ud800", "invalid_text")],
)
async def test_unstorable_text_rejected(services, client, text, code):
    await make_city()
    resident, _ = await login_resident(client)
    import json as jsonlib

    raw = jsonlib.dumps(request_body(description=text)).encode()
    _, response = await client.post("/api/v1/service-requests", content=raw,
                                    headers={**resident, "content-type": "application/json"})
    assert response.status == 400
    assert response.json["error"]["code"] == code
    assert response.json["error"]["field"] == "description"


@pytest.mark.parametrize("agency_id", [2**31, 2**63, -1, 0])
async def test_huge_agency_id_rejected(services, client, agency_id):
    await make_city()
    resident, _ = await login_resident(client)
    body = {"agency_id": agency_id, "name": "林", "certificate_level": "assistant", "certificate_no": "X1",
            "categories": ["elderly_care"], "location": {"lat": SIMING[0], "lng": SIMING[1]}, "service_radius_m": 3000}
    _, response = await client.post("/api/v1/workers/me", json=body, headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] == "agency_id"


async def test_huge_latitude_integer_rejected(services, client):
    await make_city()
    resident, _ = await login_resident(client)
    raw = ('{"category": "elderly_care", "description": "陪伴", "address": "思明区某路1号", '
           '"location": {"lat": ' + "9" * 401 + ', "lng": 118.08}}').encode()
    _, response = await client.post("/api/v1/service-requests", content=raw,
                                    headers={**resident, "content-type": "application/json"})
    assert response.status == 400


def _registration(agency_id: int, certificate_no: str) -> dict:
    return {"agency_id": agency_id, "name": "林晓", "certificate_level": "assistant", "certificate_no": certificate_no,
            "categories": ["elderly_care"], "location": {"lat": SIMING[0], "lng": SIMING[1]}, "service_radius_m": 3000}


async def test_certificate_no_variants_collide(services, client):
    agencies = await make_city()
    first, _ = await login_resident(client, "cert-a")
    second, _ = await login_resident(client, "cert-b")
    _, registered = await client.post("/api/v1/workers/me", json=_registration(agencies["approved"].id, "xm 2024 001"),
                                      headers=first)
    assert registered.status == 201
    _, duplicate = await client.post("/api/v1/workers/me", json=_registration(agencies["approved"].id, "ＸＭ2024001"),
                                     headers=second)
    assert duplicate.status == 409
    assert duplicate.json["error"]["code"] == "certificate_no_taken"


@pytest.mark.parametrize(
    "zero_width",
    ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"],
    ids=["zero-width-space", "non-joiner", "joiner", "word-joiner", "byte-order-mark"],
)
async def test_certificate_no_zero_width_variants_collide(services, client, zero_width):
    agencies = await make_city()
    first, _ = await login_resident(client, "cert-a")
    second, _ = await login_resident(client, "cert-b")
    _, registered = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, f"XM2024{zero_width}001"), headers=first
    )
    _, duplicate = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, "XM2024001"), headers=second
    )

    assert registered.status == 201, registered.json
    assert (await Worker.get(id=registered.json["id"])).certificate_no == "XM2024001"
    assert duplicate.status == 409
    assert duplicate.json["error"]["code"] == "certificate_no_taken"


@pytest.mark.parametrize("variant", ["XM2024-000002", "-XM2024000002-", "XM-2024-000002", "xm--2024000002"])
async def test_certificate_no_hyphen_variants_collide(services, client, variant):
    agencies = await make_city()
    first, _ = await login_resident(client, "cert-a")
    second, _ = await login_resident(client, "cert-b")
    _, registered = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, "XM2024000002"), headers=first
    )
    _, duplicate = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, variant), headers=second
    )

    assert registered.status == 201, registered.json
    assert duplicate.status == 409
    assert duplicate.json["error"]["code"] == "certificate_no_taken"
    assert duplicate.json["error"]["field"] == "certificate_no"
    assert await Worker.all().count() == 1


@pytest.mark.parametrize("certificate_no", ["-", "- -", "－－"])
async def test_certificate_no_only_hyphens_rejected(services, client, certificate_no):
    agencies = await make_city()
    resident, _ = await login_resident(client, "cert-hyphens")
    _, response = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, certificate_no), headers=resident
    )

    assert response.status == 400
    assert response.json["error"]["field"] == "certificate_no"
    assert not await Worker.exists()


@pytest.mark.parametrize(
    "certificate_no",
    [
        "X\u041c2024001",  # Cyrillic Em
        "\u0425M2024001",  # Cyrillic Ha
        "XM2024\u041e01",  # Cyrillic O
        "\u0391B-2024",  # Greek Alpha
        "XM2024\u039f01",  # Greek Omicron
        "闽XM2024001",
        "XM\u20142024",  # em dash
        "XM_2024",
        "XM2024\u00ad001",  # soft hyphen
    ],
)
async def test_certificate_no_non_ascii_rejected(services, client, certificate_no):
    agencies = await make_city()
    resident, _ = await login_resident(client, "cert-lookalike")
    _, response = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, certificate_no), headers=resident
    )

    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_input"
    assert response.json["error"]["field"] == "certificate_no"
    assert response.json["error"]["message"] == "证书编号只能由英文字母、数字和“-”组成，请对照证书重新输入。"
    assert not await Worker.exists()


@pytest.mark.parametrize(
    ("certificate_no", "stored"),
    [
        ("XM2024000123", "XM2024000123"),
        ("xm-later-1", "XMLATER1"),
        ("ＸＭ－２０２４－１", "XM20241"),
        ("LOAD-0101120000ab12-W00001", "LOAD0101120000AB12W00001"),
        ("2008 0310 0000 0001", "2008031000000001"),
    ],
)
async def test_certificate_no_ascii_forms_accepted(services, client, certificate_no, stored):
    agencies = await make_city()
    resident, _ = await login_resident(client, "cert-valid")
    _, response = await client.post(
        "/api/v1/workers/me", json=_registration(agencies["approved"].id, certificate_no), headers=resident
    )

    assert response.status == 201, response.json
    assert (await Worker.get(id=response.json["id"])).certificate_no == stored


async def test_officer_cannot_verify_self(services, client):
    agencies = await make_city()
    officer = await officer_headers(services)
    _, registered = await client.post("/api/v1/workers/me", json=_registration(agencies["approved"].id, "SELF1"),
                                      headers=officer)
    assert registered.status == 201
    _, response = await client.post(f"/api/v1/admin/workers/{registered.json['id']}/verify", headers=officer)
    assert response.status == 403
    assert response.json["error"]["code"] == "self_review"


async def test_pending_agency_worker_cannot_go_on_duty(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["pending"], on_duty=False)
    from tests.factories import worker_headers

    _, response = await client.put("/api/v1/workers/me/duty", json={"on_duty": True},
                                   headers=await worker_headers(services, worker))
    assert response.status == 409
    assert response.json["error"]["code"] == "agency_not_approved"


async def test_going_off_duty_declines_offers(services, client):
    from backend.models import Offer, OfferStatus
    from tests.factories import north_of, worker_headers

    agencies = await make_city()
    leaving = await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    staying = await make_worker(services, agencies["approved"], north_of(SIMING, 7000), radius_m=10_000)
    resident, _ = await login_resident(client)
    _, created = await client.post("/api/v1/service-requests", json=request_body(), headers=resident)
    assert await offered_worker_ids(created.json["id"]) == [leaving.id]

    _, off = await client.put("/api/v1/workers/me/duty", json={"on_duty": False},
                              headers=await worker_headers(services, leaving))
    assert off.status == 200
    offer = await Offer.get(service_request_id=created.json["id"], worker_id=leaving.id)
    assert offer.status == OfferStatus.DECLINED
    assert await Offer.filter(service_request_id=created.json["id"], worker_id=staying.id, status="open").exists()


async def test_certificate_no_too_long_after_folding(services, client):
    agencies = await make_city()
    resident, _ = await login_resident(client, "cert-long")
    # Each ㍿ folds to four characters under NFKC, so 20 of them become 80.
    _, response = await client.post("/api/v1/workers/me", json=_registration(agencies["approved"].id, "㍿" * 20),
                                    headers=resident)
    assert response.status == 400
    assert response.json["error"]["field"] == "certificate_no"


async def _review(client, officer, worker_id: int, action: str):
    options = {"json": {"reason": "证书编号无法核实"}} if action == "reject" else {}
    _, response = await client.post(f"/api/v1/admin/workers/{worker_id}/{action}", headers=officer, **options)
    return response


async def test_verify_rejected_worker_conflicts(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    officer = await officer_headers(services)
    await _review(client, officer, worker.id, "reject")

    response = await _review(client, officer, worker.id, "verify")

    assert response.status == 409
    assert response.json["error"]["code"] == "worker_already_rejected"
    stored = await Worker.get(id=worker.id)
    assert stored.status == WorkerStatus.REJECTED
    assert stored.rejection_reason == "证书编号无法核实"
    assert stored.verified_at is None


async def test_verify_twice_conflicts(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    officer = await officer_headers(services)

    first = await _review(client, officer, worker.id, "verify")
    again = await _review(client, officer, worker.id, "verify")

    assert first.status == 200
    assert first.json == {"id": worker.id, "status": "verified"}
    assert again.status == 409
    assert again.json["error"]["code"] == "worker_already_verified"


async def test_reject_twice_keeps_first_reason(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    officer = await officer_headers(services)
    await _review(client, officer, worker.id, "reject")

    _, again = await client.post(
        f"/api/v1/admin/workers/{worker.id}/reject", json={"reason": "另一个原因"}, headers=officer
    )

    assert again.status == 409
    assert again.json["error"]["code"] == "worker_already_rejected"
    assert (await Worker.get(id=worker.id)).rejection_reason == "证书编号无法核实"


async def test_reject_verified_worker_revokes(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=True, on_duty=True)
    officer = await officer_headers(services)

    response = await _review(client, officer, worker.id, "reject")

    assert response.status == 200
    assert response.json == {"id": worker.id, "status": "rejected"}
    stored = await Worker.get(id=worker.id)
    assert stored.status == WorkerStatus.REJECTED
    assert stored.on_duty is False
    assert stored.verified_at is None


async def test_officer_cannot_reject_self(services, client):
    agencies = await make_city()
    officer = await officer_headers(services)
    _, registered = await client.post("/api/v1/workers/me", json=_registration(agencies["approved"].id, "SELF2"),
                                      headers=officer)
    assert registered.status == 201

    response = await _review(client, officer, registered.json["id"], "reject")

    assert response.status == 403
    assert response.json["error"]["code"] == "self_review"
    assert (await Worker.get(id=registered.json["id"])).status == WorkerStatus.PENDING


async def test_concurrent_verifies_succeed_once(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    officers = [await officer_headers(services, f"officer-{number}") for number in range(3)]

    responses = await asyncio.gather(*(_review(client, officer, worker.id, "verify") for officer in officers))

    assert sorted(response.status for response in responses) == [200, 409, 409]
    assert (await Worker.get(id=worker.id)).status == WorkerStatus.VERIFIED


async def test_concurrent_verify_and_reject_consistent(services, client):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    first, second = await officer_headers(services, "officer-a"), await officer_headers(services, "officer-b")

    verified, rejected = await asyncio.gather(
        _review(client, first, worker.id, "verify"), _review(client, second, worker.id, "reject")
    )

    stored = await Worker.get(id=worker.id)
    # Rejection is allowed after verification (revocation), so it always lands, and a verification
    # that came second finds the worker rejected.
    assert rejected.status == 200
    assert verified.status in (200, 409)
    assert stored.status == WorkerStatus.REJECTED
    assert stored.rejection_reason == "证书编号无法核实"
    assert stored.verified_at is None
    if verified.status == 409:
        assert verified.json["error"]["code"] == "worker_already_rejected"


@pytest.mark.parametrize(("field", "value"), [("categories", [{"a": 1}]), ("languages", [["闽南语"]])])
async def test_registration_error_repeats_no_repr(services, client, field, value):
    agencies = await make_city()
    resident, _ = await login_resident(client)
    body = _registration(agencies["approved"].id, "XM2024777") | {field: value}

    _, response = await client.post("/api/v1/workers/me", json=body, headers=resident)

    assert response.status == 400
    assert response.json["error"]["field"] == field
    assert "[" not in response.json["error"]["message"]
    assert "{" not in response.json["error"]["message"]
