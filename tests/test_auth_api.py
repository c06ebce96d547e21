"""Logins, tokens and roles over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from backend import accounts
from backend.models import User
from tests.conftest import fresh_code
from tests.factories import login_resident, make_city, officer_headers


async def test_wechat_login_creates_resident(client):
    _, response = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("alice")})
    assert response.status == 200
    assert response.json["user"]["roles"] == ["resident"]
    assert response.json["token"]
    assert "session_key" not in response.text


async def test_wechat_login_same_person_same_user(client):
    _, first = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("bob")})
    _, second = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("bob")})
    assert first.json["user"]["id"] == second.json["user"]["id"]
    assert first.json["token"] != second.json["token"]


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [
        ("invalid-code", 401, "wechat_code_invalid"),
        ("busy-now", 503, "wechat_unavailable"),
        ("ratelimit-now", 429, "wechat_rate_limited"),
        ("blocked-now", 403, "wechat_login_blocked"),
    ],
)
async def test_wechat_login_errors(client, code, status, error_code):
    _, response = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code(code)})
    assert response.status == status
    assert response.json["error"]["code"] == error_code
    assert response.json["error"]["message"]


async def test_wechat_quota_sends_retry_after(client):
    _, response = await client.post("/api/v1/auth/wechat-login", json={"code": fresh_code("ratelimit-2")})

    assert response.status == 429
    assert response.json["error"]["code"] == "wechat_rate_limited"
    assert response.headers["retry-after"] == "60"


async def test_wechat_login_code_used_elsewhere(services, client):
    code = fresh_code("carol")
    # The code was spent by another client of WeChat, so our server never saw it succeed.
    await services.wechat.code_to_session(code)
    _, response = await client.post("/api/v1/auth/wechat-login", json={"code": code})
    assert response.status == 401
    assert response.json["error"]["code"] == "wechat_code_invalid"


@pytest.mark.parametrize("body", [{}, {"code": ""}, {"code": 12}, {"code": "x" * 129}, [], "text"])
async def test_wechat_login_bad_body(client, body):
    _, response = await client.post("/api/v1/auth/wechat-login", json=body)
    assert response.status == 400
    assert response.json["error"]["code"] in ("missing_field", "invalid_input", "invalid_json")


async def test_wechat_login_malformed_json(client):
    _, response = await client.post(
        "/api/v1/auth/wechat-login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status == 400
    assert response.json["error"]["code"] == "invalid_json"


async def test_logout_revokes_token(client):
    headers, _ = await login_resident(client)
    _, before = await client.get("/api/v1/me", headers=headers)
    assert before.status == 200
    _, logout = await client.post("/api/v1/auth/logout", headers=headers)
    assert logout.status == 200
    _, after = await client.get("/api/v1/me", headers=headers)
    assert after.status == 401
    assert after.json["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer nonsense", "Basic abc", "bearer  "])
async def test_bad_token_rejected(client, header):
    _, response = await client.get("/api/v1/me", headers={"Authorization": header})
    assert response.status == 401
    assert response.json["error"]["code"] == "unauthorized"


# Sanic decodes header bytes that are no UTF-8 with surrogateescape, so they arrive as lone surrogates.
@pytest.mark.parametrize("token", [b"\xe9t\xe9", b"abc\xff" * 8], ids=["latin-1", "invalid-utf-8"])
async def test_malformed_token_unauthorized(client, token):
    _, response = await client.get("/api/v1/me", headers={"Authorization": b"Bearer " + token})
    assert response.status == 401
    assert response.json["error"]["code"] == "unauthorized"


async def test_role_granted_later_applies_to_old_token(services, client):
    await make_city()
    headers, user_id = await login_resident(client, "later-worker")
    body = {
        "agency_id": (await _first_agency_id()),
        "name": "林晓",
        "certificate_level": "assistant",
        "certificate_no": "XM-LATER-1",
        "categories": ["elderly_care"],
        "location": {"lat": 24.47, "lng": 118.09},
        "service_radius_m": 3000,
    }
    _, registered = await client.post("/api/v1/workers/me", json=body, headers=headers)
    assert registered.status == 201, registered.json
    _, me = await client.get("/api/v1/me", headers=headers)
    assert "worker" in me.json["user"]["roles"]
    _, offers = await client.get("/api/v1/workers/me/offers", headers=headers)
    assert offers.status == 200


async def _first_agency_id() -> int:
    from backend.models import Agency

    return (await Agency.filter(status="approved").first()).id


async def test_password_login_officer(services, client):
    await accounts.ensure_officer("officer-zhang", "a-long-password-1")
    _, response = await client.post(
        "/api/v1/auth/password-login", json={"username": "officer-zhang", "password": "a-long-password-1"}
    )
    assert response.status == 200
    assert response.json["user"]["roles"] == ["officer"]


@pytest.mark.parametrize(
    ("username", "password"), [("officer-zhang", "wrong-password"), ("nobody", "a-long-password-1")]
)
async def test_password_login_rejected(services, client, username, password):
    await accounts.ensure_officer("officer-zhang", "a-long-password-1")
    _, response = await client.post("/api/v1/auth/password-login", json={"username": username, "password": password})
    assert response.status == 401
    assert response.json["error"]["code"] == "invalid_credentials"


@pytest.mark.parametrize(
    "typed",
    ["officer-zhang", "  officer-zhang  ", "Officer-Zhang", "OFFICER-ZHANG", "ｏｆｆｉｃｅｒ－ｚｈａｎｇ"],
    ids=["exact", "spaces", "capitalised", "upper-case", "full-width"],
)
async def test_username_normalised_at_login(services, client, typed):
    await accounts.ensure_officer("officer-zhang", "a-long-password-1")

    _, response = await client.post(
        "/api/v1/auth/password-login", json={"username": typed, "password": "a-long-password-1"}
    )

    assert response.status == 200, response.json


async def test_stored_case_ignored_at_login(services, client):
    await accounts.ensure_officer("  Officer-Wang ", "a-long-password-3")

    _, response = await client.post(
        "/api/v1/auth/password-login", json={"username": "officer-wang", "password": "a-long-password-3"}
    )

    assert response.status == 200, response.json
    assert await User.filter(username="Officer-Wang").count() == 1


async def test_ensure_officer_finds_any_case(services):
    first = await accounts.ensure_officer("officer-chen", "a-long-password-4")

    again = await accounts.ensure_officer("Officer-Chen", "a-long-password-5")

    assert again.id == first.id
    assert await User.filter(username__isnull=False).count() == 1


async def test_case_insensitive_login_needs_one_match(services, client):
    # Two accounts that differ only in case can exist from before usernames ignored case.
    password_hash = await accounts.hash_password("a-long-password-2")
    lower = await User.create(username="staff-dup", password_hash=password_hash, roles=["station_staff"])
    await User.create(username="Staff-Dup", password_hash=password_hash, roles=["station_staff"])
    solo = await User.create(username="Staff-Solo", password_hash=password_hash, roles=["station_staff"])

    _, exact = await client.post(
        "/api/v1/auth/password-login", json={"username": "staff-dup", "password": "a-long-password-2"}
    )
    _, ambiguous = await client.post(
        "/api/v1/auth/password-login", json={"username": "STAFF-DUP", "password": "a-long-password-2"}
    )
    _, unique = await client.post(
        "/api/v1/auth/password-login", json={"username": "staff-solo", "password": "a-long-password-2"}
    )

    assert exact.status == 200
    assert exact.json["user"]["id"] == lower.id
    assert ambiguous.status == 401
    assert ambiguous.json["error"]["code"] == "invalid_credentials"
    assert unique.status == 200
    assert unique.json["user"]["id"] == solo.id


async def test_case_variants_share_guess_limit(services, client):
    await accounts.ensure_officer("officer-case", "a-long-password-6")
    for attempt in range(accounts.PASSWORD_FAILURES_PER_NETWORK):
        typed = "officer-case" if attempt % 2 else "OFFICER-CASE"
        await client.post("/api/v1/auth/password-login", json={"username": typed, "password": f"wrong-{attempt}"})

    _, locked = await client.post(
        "/api/v1/auth/password-login", json={"username": "Officer-Case", "password": "wrong-again"}
    )

    assert locked.status == 429


async def test_password_is_hashed(services):
    user = await accounts.ensure_officer("officer-li", "a-long-password-2")
    assert user.password_hash.startswith("$argon2")
    assert "a-long-password-2" not in user.password_hash


async def test_officer_reads_agency_credit_resident_cannot(services, client):
    agencies = await make_city()
    agency_id = agencies["approved"].id
    resident, _ = await login_resident(client)
    _, denied = await client.get(f"/api/v1/agencies/{agency_id}/credit", headers=resident)
    assert denied.status == 403
    _, allowed = await client.get(f"/api/v1/agencies/{agency_id}/credit", headers=await officer_headers(services))
    assert allowed.status == 200
    assert allowed.json["score"] == 75.0


async def test_manager_reads_own_agency_only(services, client):
    from backend.models import Role, User
    from tests.factories import token_for_user

    agencies = await make_city()
    manager = await User.create(username="manager-1", roles=[Role.AGENCY_MANAGER.value], agency=agencies["approved"])
    headers = {"Authorization": f"Bearer {await token_for_user(services, manager)}"}
    _, own = await client.get(f"/api/v1/agencies/{agencies['approved'].id}/ratings", headers=headers)
    assert own.status == 200
    _, other = await client.get(f"/api/v1/agencies/{agencies['other'].id}/ratings", headers=headers)
    assert other.status == 403


async def test_public_reads(services, client):
    agencies = await make_city()
    _, health = await client.get("/healthz")
    assert health.json == {"status": "ok"}
    _, categories = await client.get("/api/v1/categories")
    codes = {item["code"] for item in categories.json["items"]}
    assert {"elderly_care", "child_care", "disability_care", "medical_escort", "poverty_relief",
            "mental_health", "family_support"} <= codes
    _, listed = await client.get("/api/v1/agencies?district_code=350203")
    assert {item["id"] for item in listed.json["items"]} == {a.id for a in agencies.values()}
    _, empty = await client.get("/api/v1/agencies?district_code=350205")
    assert empty.json["items"] == []
    _, bad = await client.get("/api/v1/agencies?district_code=abc")
    assert bad.status == 400
    assert bad.json["error"]["field"] == "district_code"


async def test_unknown_route_gets_envelope(client):
    _, response = await client.get("/api/v1/nothing-here")
    assert response.status == 404
    assert response.json["error"]["code"] == "not_found"


ATTACKER_ADDRESS = "203.0.113.7"
OWNER_ADDRESS = "198.51.100.20"


def _behind_proxy(app):
    """The app's test client, with X-Forwarded-For trusted so each request can name its address."""
    app.config.PROXIES_COUNT = 1
    return app.asgi_client


async def _password_login(client, username: str, password: str, address: str):
    _, response = await client.post(
        "/api/v1/auth/password-login",
        json={"username": username, "password": password},
        headers={"X-Forwarded-For": address},
    )
    return response


async def test_password_guessing_locks_guessing_network(services, app):
    await accounts.ensure_officer("officer-guess", "a-long-password-9")
    client = _behind_proxy(app)
    statuses = []
    for attempt in range(accounts.PASSWORD_FAILURES_PER_NETWORK + 1):
        response = await _password_login(client, "officer-guess", f"wrong-{attempt}", ATTACKER_ADDRESS)
        statuses.append(response.status)

    right = await _password_login(client, "officer-guess", "a-long-password-9", ATTACKER_ADDRESS)

    assert statuses[:-1] == [401] * accounts.PASSWORD_FAILURES_PER_NETWORK
    assert statuses[-1] == 429
    assert int(response.headers["retry-after"]) > 0
    assert right.status == 429


async def test_guessing_elsewhere_leaves_owner_login(services, app):
    await accounts.ensure_officer("officer-owner", "a-long-password-7")
    client = _behind_proxy(app)
    for attempt in range(accounts.PASSWORD_FAILURES_PER_NETWORK + 5):
        await _password_login(client, "officer-owner", f"wrong-{attempt}", ATTACKER_ADDRESS)
    locked = await _password_login(client, "officer-owner", "wrong-again", ATTACKER_ADDRESS)

    owner = await _password_login(client, "officer-owner", "a-long-password-7", OWNER_ADDRESS)

    assert locked.status == 429
    assert owner.status == 200, owner.json
    assert owner.json["user"]["roles"] == ["officer"]


async def test_guessing_from_many_networks_limited(services, app, monkeypatch):
    # The real limit is 100 failures, each costing an argon2 hash, so the test shows the rule with 4.
    monkeypatch.setattr(accounts, "PASSWORD_FAILURES_PER_USERNAME", 4)
    await accounts.ensure_officer("officer-spread", "a-long-password-6")
    client = _behind_proxy(app)
    statuses = []
    for attempt in range(5):
        response = await _password_login(client, "officer-spread", f"wrong-{attempt}", f"203.0.113.{attempt + 1}")
        statuses.append(response.status)

    assert statuses == [401, 401, 401, 401, 429]
    assert int(response.headers["retry-after"]) > 0


async def test_successful_logins_never_lock_out(services, client):
    await accounts.ensure_officer("officer-busy", "a-long-password-8")
    for _ in range(accounts.PASSWORD_FAILURES_PER_NETWORK + 2):
        _, response = await client.post(
            "/api/v1/auth/password-login", json={"username": "officer-busy", "password": "a-long-password-8"}
        )
        assert response.status == 200


async def test_concurrent_guesses_verified_within_limit(services, app, monkeypatch):
    await accounts.ensure_officer("officer-burst", "a-long-password-5")
    client = _behind_proxy(app)
    verified = 0
    verify_password = accounts._verify_password

    async def counting_verify(password_hash: str, password: str) -> bool:
        nonlocal verified
        verified += 1
        return await verify_password(password_hash, password)

    monkeypatch.setattr(accounts, "_verify_password", counting_verify)
    attempts = accounts.PASSWORD_FAILURES_PER_NETWORK * 3 - 1
    responses = await asyncio.gather(
        *(_password_login(client, "officer-burst", f"wrong-{attempt}", ATTACKER_ADDRESS) for attempt in range(attempts))
    )
    statuses = sorted(response.status for response in responses)
    verified_by_burst = verified

    owner = await _password_login(client, "officer-burst", "a-long-password-5", OWNER_ADDRESS)

    assert verified_by_burst == accounts.PASSWORD_FAILURES_PER_NETWORK
    assert statuses == [401] * accounts.PASSWORD_FAILURES_PER_NETWORK + [429] * (
        attempts - accounts.PASSWORD_FAILURES_PER_NETWORK
    )
    assert owner.status == 200, owner.json
