"""Failures of what the API depends on, and hostile input, never give a 500 or lose a request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from sanic.exceptions import RequestCancelled

from backend import clock
from backend.context import Services
from backend.models import RequestStatus, ServiceRequest
from backend.redis_client import open_redis
from backend.settings import PROJECT_ROOT, Settings, SettingsError
from miniprogram_api.errors import EnvelopeErrorHandler
from search.redis_geo import RedisGeoIndex
from tests.factories import login_resident, make_city, make_worker, request_body

# Nothing listens on port 1 of loopback, so every call to it fails at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


async def test_index_down_request_kept_in_matching(services, app, client):
    agencies = await make_city()
    await make_worker(services, agencies["approved"])
    headers, _ = await login_resident(client)
    dead = open_redis(DEAD_REDIS_URL)
    app.ctx.services = dataclasses.replace(services, index=RedisGeoIndex(dead))

    _, response = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)

    assert response.status == 201
    assert response.json["status"] == "matching"
    stored = await ServiceRequest.get(id=response.json["id"])
    assert stored.status == RequestStatus.MATCHING
    assert stored.address == request_body()["address"]
    await dead.aclose()


async def test_redis_down_gives_503_not_500(services, app, client):
    headers, _ = await login_resident(client)
    dead = open_redis(DEAD_REDIS_URL)
    app.ctx.services = Services(settings=services.settings, redis=dead, index=RedisGeoIndex(dead), wechat=services.wechat)

    _, response = await client.get("/api/v1/me", headers=headers)

    assert response.status == 503
    assert response.json["error"]["code"] == "service_unavailable"
    await dead.aclose()


@pytest.mark.parametrize(
    ("exception", "status", "level"),
    [(RequestCancelled(), 499, logging.INFO), (asyncio.CancelledError(), 503, logging.WARNING)],
)
def test_cancelled_handler_logged_without_traceback(caplog, exception, status, level):
    with caplog.at_level(logging.INFO, logger="miniprogram_api.errors"):
        response = EnvelopeErrorHandler().default(None, exception)

    assert response.status == status
    [record] = caplog.records
    assert record.levelno == level
    assert record.exc_info is None


async def test_wrong_method_gets_envelope(client):
    _, response = await client.delete("/api/v1/categories")
    assert response.status == 405
    assert response.json["error"]["code"] == "method_not_allowed"


async def test_times_rendered_in_shanghai(services, client):
    await make_city()
    clock.freeze(datetime(2026, 3, 1, 16, 30, tzinfo=timezone.utc))
    headers, _ = await login_resident(client)
    _, response = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)
    assert response.json["created_at"] == "2026-03-02T00:30:00+08:00"
    stored = await ServiceRequest.get(id=response.json["id"])
    assert stored.created_at == datetime(2026, 3, 1, 16, 30, tzinfo=timezone.utc)


def test_prod_requires_wechat_secret():
    with pytest.raises(SettingsError, match="WECHAT_SECRET"):
        Settings.from_env({"APP_ENV": "prod", "WECHAT_APPID": "wx123"})


def test_prod_requires_long_officer_password():
    env = {"APP_ENV": "prod", "WECHAT_APPID": "wx123", "WECHAT_SECRET": "s" * 32,
           "OFFICER_USERNAME": "officer", "OFFICER_PASSWORD": "short"}
    with pytest.raises(SettingsError, match="OFFICER_PASSWORD"):
        Settings.from_env(env)


def test_prod_settings_accepted():
    env = {"APP_ENV": "prod", "WECHAT_APPID": "wx123", "WECHAT_SECRET": "s" * 32,
           "OFFICER_USERNAME": "officer", "OFFICER_PASSWORD": "p" * 12}
    settings = Settings.from_env(env)
    assert settings.is_prod
    assert "p" * 12 not in repr(settings)


@pytest.mark.parametrize(("name", "value"), [("PORT", "eighty"), ("PORT", "70000"), ("APP_ENV", "staging")])
def test_bad_settings_rejected(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_base_url_gets_trailing_slash():
    assert Settings.from_env({"WECHAT_API_BASE_URL": "http://127.0.0.1:9/"}).wechat_api_base_url == "http://127.0.0.1:9/"
    assert Settings.from_env({"WECHAT_API_BASE_URL": "http://127.0.0.1:9"}).wechat_api_base_url == "http://127.0.0.1:9/"


def test_prod_start_stops_with_message():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WECHAT_", "OFFICER_"))}
    env.update({"APP_ENV": "prod", "WECHAT_APPID": "wx123"})
    result = subprocess.run(
        [sys.executable, "-m", "miniprogram_api"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "WECHAT_SECRET" in result.stderr
