"""Content screening with msgSecCheck through the WeChat stand-in, flags, and the officers' flag routes."""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import requests

from backend import accounts, clock, content_check
from backend.context import Services
from backend.errors import ValidationError
from backend.models import ContentFlag, Role, User
from backend.wechat import WeChatGateway
from miniprogram_api import routes_content
from tests.factories import (
    AT_DOOR,
    login_resident,
    make_city,
    make_worker,
    officer_headers,
    request_body,
    worker_headers,
)

HTTP_TIMEOUT_S = 5.0
CHECK_PATH = "/wxa/msg_sec_check"
START = datetime(2025, 3, 8, 1, 30, tzinfo=timezone.utc)


@pytest.fixture
def check_services(services) -> Services:
    """The test services with the content check switched on and the stand-in reset."""
    response = requests.post(f"{services.settings.wechat_api_base_url}__standin__/reset", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 204
    return dataclasses.replace(services, settings=dataclasses.replace(services.settings, content_check=True))


@pytest.fixture
def content_app(app):
    if routes_content.bp.name not in app.blueprints:
        app.blueprint(routes_content.bp)
    return app


@pytest.fixture
def content_client(content_app):
    return content_app.asgi_client


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Base URL of a socket that completes TCP handshakes but never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


def _check_calls(services: Services) -> list[dict]:
    response = requests.get(f"{services.settings.wechat_api_base_url}__standin__/calls", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    return [call for call in response.json() if call["path"] == CHECK_PATH]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _resident(openid: str = "o-check-resident-0001") -> User:
    return await User.create(openid=openid, roles=[Role.RESIDENT.value])


def _with_wechat_at(services: Services, base_url: str, timeout_s: float = 2.0) -> Services:
    settings = dataclasses.replace(services.settings, wechat_api_base_url=base_url, wechat_timeout_s=timeout_s)
    return dataclasses.replace(services, settings=settings, wechat=WeChatGateway(settings))


# screen


async def test_screen_pass(check_services) -> None:
    user = await _resident()

    verdict = await content_check.screen(check_services, user, "家中老人需要上门陪伴", "description")

    assert verdict == "pass"
    [call] = _check_calls(check_services)
    assert call["errcode"] == 0
    assert call["body"] == {
        "content": "家中老人需要上门陪伴",
        "version": 2,
        "scene": content_check.SCENE_FORUM,
        "openid": "o-check-resident-0001",
    }


async def test_screen_review(check_services) -> None:
    user = await _resident()

    verdict = await content_check.screen(check_services, user, "这段话待审核", "summary")

    assert verdict == "review"


async def test_screen_risky_rejected(check_services) -> None:
    user = await _resident()

    with pytest.raises(content_check.ContentRejected) as caught:
        await content_check.screen(check_services, user, "含有违禁内容", "description")

    error = caught.value
    assert isinstance(error, ValidationError)
    assert error.status == 400
    assert error.code == "content_rejected"
    assert error.field == "description"
    assert error.to_envelope() == {
        "error": {"code": "content_rejected", "message": content_check.ContentRejected.message, "field": "description"}
    }


async def test_screen_comment_scene(check_services) -> None:
    user = await _resident()

    await content_check.screen(check_services, user, "服务很周到", "comment")

    [call] = _check_calls(check_services)
    assert call["body"]["scene"] == content_check.SCENE_COMMENT


async def test_screen_busy_unchecked(check_services, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend")
    user = await _resident()

    verdict = await content_check.screen(check_services, user, "隐私内容 [busy]", "description")

    assert verdict == "unchecked"
    [call] = _check_calls(check_services)
    assert call["errcode"] == -1
    warnings = [record.getMessage() for record in caplog.records if record.name == "backend.content_check"]
    assert warnings == [f"content check unavailable, saving the text as unchecked user_id={user.id} field=description"]
    assert "隐私内容" not in caplog.text
    assert user.openid not in caplog.text


async def test_screen_wechat_down_unchecked(check_services) -> None:
    user = await _resident()
    down = _with_wechat_at(check_services, f"http://127.0.0.1:{_free_port()}/")

    verdict = await content_check.screen(down, user, "家中老人需要上门陪伴", "description")
    down.wechat.close()

    assert verdict == "unchecked"


async def test_screen_timeout_unchecked(check_services, silent_server: str) -> None:
    user = await _resident()
    silent = _with_wechat_at(check_services, silent_server, timeout_s=0.5)

    verdict = await content_check.screen(silent, user, "家中老人需要上门陪伴", "description")
    silent.wechat.close()

    assert verdict == "unchecked"


async def test_screen_disabled_skips_call(check_services) -> None:
    disabled = dataclasses.replace(
        check_services, settings=dataclasses.replace(check_services.settings, content_check=False)
    )
    user = await _resident()

    verdict = await content_check.screen(disabled, user, "含有违禁内容", "description")

    assert verdict == "pass"
    assert _check_calls(check_services) == []


async def test_screen_officer_skips_call(check_services) -> None:
    officer = await accounts.ensure_officer("check-officer", "officer-password-123")
    assert officer.openid is None

    verdict = await content_check.screen(check_services, officer, "含有违禁内容", "summary")

    assert verdict == "pass"
    assert _check_calls(check_services) == []


async def test_screen_blank_text_skips_call(check_services) -> None:
    user = await _resident()

    verdict = await content_check.screen(check_services, user, "   ", "comment")

    assert verdict == "pass"
    assert _check_calls(check_services) == []


# flag


@pytest.mark.parametrize("verdict", ["review", "unchecked"])
async def test_flag_records_verdict(services, verdict: str) -> None:
    clock.freeze(START)
    user = await _resident()

    await content_check.flag(verdict, "service_request.description", 42, user.id)

    [stored] = await ContentFlag.all()
    assert stored.verdict == verdict
    assert stored.target == "service_request.description"
    assert stored.target_id == 42
    assert stored.user_id == user.id
    assert stored.created_at == START
    assert stored.resolved_at is None


async def test_flag_pass_records_nothing(services) -> None:
    await content_check.flag("pass", "rating.comment", 1, None)

    assert await ContentFlag.all().count() == 0


async def test_flag_unknown_verdict_raises(services) -> None:
    with pytest.raises(ValueError, match="verdict"):
        await content_check.flag("risky", "rating.comment", 1, None)

    assert await ContentFlag.all().count() == 0


# Routes


async def _make_flag(target_id: int, created_at: datetime, resolved_at: datetime | None = None) -> ContentFlag:
    return await ContentFlag.create(
        target="service_request.description",
        target_id=target_id,
        verdict="review",
        created_at=created_at,
        resolved_at=resolved_at,
    )


async def _resident_headers(services: Services) -> dict[str, str]:
    user = await _resident("o-check-route-resident")
    token = await accounts.issue_token(services.redis, user.id, 3600)
    return {"Authorization": f"Bearer {token}"}


async def test_flags_listed_unresolved_first(services, content_client) -> None:
    old_open = await _make_flag(1, START)
    new_open = await _make_flag(2, START + timedelta(hours=2))
    old_done = await _make_flag(3, START - timedelta(days=2), resolved_at=START)
    new_done = await _make_flag(4, START + timedelta(hours=3), resolved_at=START + timedelta(hours=4))
    headers = await officer_headers(services)

    _, response = await content_client.get("/api/v1/admin/content-flags", headers=headers)

    assert response.status == 200
    items = response.json["items"]
    assert [item["id"] for item in items] == [new_open.id, old_open.id, new_done.id, old_done.id]
    assert items[0] == {
        "id": new_open.id,
        "target": "service_request.description",
        "target_id": 2,
        "verdict": "review",
        "created_at": "2025-03-08T11:30:00+08:00",
        "resolved_at": None,
    }
    assert items[2]["resolved_at"] == "2025-03-08T13:30:00+08:00"


async def test_flags_paged_past_first_page(services, content_client) -> None:
    await ContentFlag.bulk_create(
        [
            ContentFlag(target="rating.comment", target_id=index, verdict="unchecked", created_at=START)
            for index in range(105)
        ]
    )
    headers = await officer_headers(services)

    pages = []
    cursor = None
    while True:
        query = "?limit=40" + (f"&cursor={cursor}" if cursor else "")
        _, response = await content_client.get(f"/api/v1/admin/content-flags{query}", headers=headers)
        assert response.status == 200, response.json
        pages.append([item["id"] for item in response.json["items"]])
        cursor = response.json["next_cursor"]
        if cursor is None:
            break

    all_ids = sorted(await ContentFlag.all().values_list("id", flat=True), reverse=True)
    assert [len(page) for page in pages] == [40, 40, 25]
    assert [flag_id for page in pages for flag_id in page] == all_ids


async def test_flags_default_page_size(services, content_client) -> None:
    await ContentFlag.bulk_create(
        [
            ContentFlag(target="rating.comment", target_id=index, verdict="unchecked", created_at=START)
            for index in range(55)
        ]
    )

    _, response = await content_client.get("/api/v1/admin/content-flags", headers=await officer_headers(services))

    assert len(response.json["items"]) == 50
    assert response.json["next_cursor"] is not None


async def test_flags_page_survives_resolving(services, content_client) -> None:
    flags = [await _make_flag(index, START) for index in range(5)]
    done = await _make_flag(99, START, resolved_at=START)
    headers = await officer_headers(services)

    _, first = await content_client.get("/api/v1/admin/content-flags?limit=2", headers=headers)
    # The officer resolves both flags of the first page before asking for the next one.
    for item in first.json["items"]:
        await content_client.post(f"/api/v1/admin/content-flags/{item['id']}/resolve", headers=headers)
    _, second = await content_client.get(
        f"/api/v1/admin/content-flags?limit=10&cursor={first.json['next_cursor']}", headers=headers
    )

    assert [item["id"] for item in first.json["items"]] == [flags[4].id, flags[3].id]
    assert [item["id"] for item in second.json["items"]] == [
        flags[2].id, flags[1].id, flags[0].id, done.id, flags[4].id, flags[3].id,
    ]
    assert second.json["next_cursor"] is None


async def test_flags_forbidden_for_resident(services, content_client) -> None:
    await _make_flag(1, START)
    headers = await _resident_headers(services)

    _, listed = await content_client.get("/api/v1/admin/content-flags", headers=headers)
    _, resolved = await content_client.post("/api/v1/admin/content-flags/1/resolve", headers=headers)

    assert listed.status == 403
    assert listed.json["error"]["code"] == "forbidden"
    assert resolved.status == 403
    assert (await ContentFlag.all().first()).resolved_at is None


async def test_flags_need_login(services, content_client) -> None:
    _, response = await content_client.get("/api/v1/admin/content-flags")

    assert response.status == 401


async def test_resolve_flag(services, content_client) -> None:
    clock.freeze(START)
    stored = await _make_flag(1, START - timedelta(hours=1))
    headers = await officer_headers(services)

    _, response = await content_client.post(f"/api/v1/admin/content-flags/{stored.id}/resolve", headers=headers)

    assert response.status == 200
    assert response.json["id"] == stored.id
    assert response.json["resolved_at"] == "2025-03-08T09:30:00+08:00"
    await stored.refresh_from_db()
    assert stored.resolved_at == START


async def test_resolve_twice_keeps_first_time(services, content_client) -> None:
    clock.freeze(START)
    stored = await _make_flag(1, START - timedelta(hours=1))
    headers = await officer_headers(services)
    await content_client.post(f"/api/v1/admin/content-flags/{stored.id}/resolve", headers=headers)
    clock.freeze(START + timedelta(hours=1))

    _, again = await content_client.post(f"/api/v1/admin/content-flags/{stored.id}/resolve", headers=headers)

    assert again.status == 200
    assert again.json["resolved_at"] == "2025-03-08T09:30:00+08:00"


@pytest.mark.parametrize("flag_id", ["999999", "abc", "99999999999"])
async def test_resolve_unknown_flag_404(services, content_client, flag_id: str) -> None:
    headers = await officer_headers(services)

    _, response = await content_client.post(f"/api/v1/admin/content-flags/{flag_id}/resolve", headers=headers)

    assert response.status == 404
    assert response.json["error"]["code"] == "not_found"


async def test_flag_detail_shows_flagged_texts(check_services) -> None:
    from miniprogram_api.app import create_app

    client = create_app(services=check_services).asgi_client
    agencies = await make_city()
    worker = await make_worker(check_services, agencies["approved"])
    worker_auth = await worker_headers(check_services, worker)
    resident, resident_id = await login_resident(client, "flagged-writer")
    texts = {
        "service_request.description": "待审：家中老人需要陪伴",
        "service_request.summary": "待审：陪伴老人聊天一小时",
        "rating.comment": "待审：社工很耐心",
    }
    _, created = await client.post(
        "/api/v1/service-requests", json=request_body(description=texts["service_request.description"]),
        headers=resident,
    )
    path = f"/api/v1/service-requests/{created.json['id']}"
    await client.post(f"{path}/accept", headers=worker_auth)
    await client.post(f"{path}/start", json=AT_DOOR, headers=worker_auth)
    await client.post(f"{path}/complete", json={"service_minutes": 10, "summary": texts["service_request.summary"],
                                                **AT_DOOR}, headers=worker_auth)
    _, rated = await client.post(f"{path}/rating", json={"stars": 5, "comment": texts["rating.comment"]},
                                 headers=resident)
    assert rated.status == 201, rated.json
    officer = await officer_headers(check_services)

    flags = await ContentFlag.all().order_by("id")
    details = [(await client.get(f"/api/v1/admin/content-flags/{flag.id}", headers=officer))[1] for flag in flags]

    assert [detail.json["target"] for detail in details] == list(texts)
    for detail in details:
        assert detail.status == 200
        assert detail.json["verdict"] == "review"
        assert detail.json["text"] == texts[detail.json["target"]]
    assert [detail.json["user_id"] for detail in details] == [resident_id, worker.user_id, resident_id]


async def test_flag_detail_text_missing_target(services, content_client) -> None:
    stored = await _make_flag(999_999, START)

    _, response = await content_client.get(f"/api/v1/admin/content-flags/{stored.id}",
                                           headers=await officer_headers(services))

    assert response.status == 200
    assert response.json["text"] is None


async def test_flag_detail_officers_only(services, content_client) -> None:
    await make_city()
    resident, _ = await login_resident(content_client, "curious-resident")
    _, created = await content_client.post("/api/v1/service-requests", json=request_body(), headers=resident)
    stored = await _make_flag(created.json["id"], START)

    _, response = await content_client.get(f"/api/v1/admin/content-flags/{stored.id}", headers=resident)

    assert response.status == 403
    assert response.json["error"]["code"] == "forbidden"
    assert request_body()["description"] not in response.text


@pytest.mark.parametrize("flag_id", ["999999", "abc"])
async def test_flag_detail_unknown_404(services, content_client, flag_id: str) -> None:
    _, response = await content_client.get(f"/api/v1/admin/content-flags/{flag_id}",
                                           headers=await officer_headers(services))

    assert response.status == 404
    assert response.json["error"]["code"] == "not_found"
