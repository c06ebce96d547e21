"""Schema set-up on a database made by an earlier version of the models."""

from __future__ import annotations

from tortoise import connections

from backend.db import create_missing_indexes, is_postgres

OFFER_EXPIRY_INDEX = "idx_offers_status_44c386"  # Offer.Meta.indexes ("status", "expires_at")


async def _index_names(database_url: str) -> set[str]:
    connection = connections.get("default")
    if is_postgres(database_url):
        _, rows = await connection.execute_query("SELECT indexname AS name FROM pg_indexes WHERE tablename = 'offers'")
    else:
        _, rows = await connection.execute_query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'offers'")
    return {row["name"] for row in rows}


async def test_missing_index_created_on_existing_table(services, database_url):
    await connections.get("default").execute_script(f'DROP INDEX "{OFFER_EXPIRY_INDEX}";')
    assert OFFER_EXPIRY_INDEX not in await _index_names(database_url)

    await create_missing_indexes()

    assert OFFER_EXPIRY_INDEX in await _index_names(database_url)
