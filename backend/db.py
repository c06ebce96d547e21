"""Tortoise ORM set-up shared by the app, the scripts and the tests."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from tortoise import Tortoise, connections
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.utils import get_schema_sql

MODEL_MODULES = ["backend.models"]


class _PooledConnection(asyncpg.Connection):
    """An asyncpg connection that sends no reset query when it goes back to the pool.

    Tortoise releases the connection after each statement outside a transaction, and asyncpg's
    reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) then made about a fifth of the
    round trips of a request creation. It undoes session state this code never sets. asyncpg
    still rolls back a transaction left open at release.
    """

    def get_reset_query(self) -> str:
        return ""


def _connection_config(database_url: str) -> str | dict:
    if not is_postgres(database_url):
        return database_url
    config = expand_db_url(database_url)
    config["credentials"]["connection_class"] = _PooledConnection
    return config


def tortoise_config(database_url: str) -> dict:
    return {
        "connections": {"default": _connection_config(database_url)},
        "apps": {"models": {"models": MODEL_MODULES, "default_connection": "default"}},
        # UTC in the database: Tortoise drifted by the zone offset with a non-UTC setting
        # (tortoise-orm issue 2273), so times are only converted when rendered.
        "use_tz": True,
        "timezone": "UTC",
    }


def _ensure_sqlite_folder(database_url: str) -> None:
    if not database_url.startswith("sqlite://"):
        return
    path = database_url.removeprefix("sqlite://").split("?", 1)[0]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


async def init_db(database_url: str, *, create_schema: bool = True, global_fallback: bool = False) -> None:
    """Open the connections and create missing tables.

    A server needs `global_fallback`: Tortoise 1.x keeps its connections in a context
    variable, and Sanic handles requests in tasks that did not inherit the start listener's.
    """
    _ensure_sqlite_folder(database_url)
    await Tortoise.init(config=tortoise_config(database_url), _enable_global_fallback=global_fallback)
    if create_schema:
        # NOTE: safe=True only creates missing tables; a changed column needs a migration
        # tool (aerich) once the schema starts to evolve in production.
        await Tortoise.generate_schemas(safe=True)
        await create_missing_indexes()


async def create_missing_indexes() -> None:
    """Create the indexes declared on models whose tables already existed.

    generate_schemas(safe=True) skips a table that exists together with its indexes, so an
    index added to a model later would never reach a database made before it.
    """
    connection = connections.get("default")
    for line in get_schema_sql(connection, safe=True).splitlines():
        if line.startswith("CREATE INDEX IF NOT EXISTS"):
            await connection.execute_script(line)


async def close_db() -> None:
    await connections.close_all()


def is_postgres(database_url: str) -> bool:
    return database_url.startswith(("postgres://", "postgresql://", "asyncpg://"))
