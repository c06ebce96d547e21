"""The geo index of matchable workers, behind one interface (see search.base.WorkerIndex)."""

from __future__ import annotations

from search.base import (
    IndexTaskFailed,
    IndexUnavailable,
    InvalidDocument,
    SearchHit,
    SearchQuery,
    WorkerDocument,
    WorkerIndex,
)

__all__ = [
    "IndexTaskFailed",
    "IndexUnavailable",
    "InvalidDocument",
    "SearchHit",
    "SearchQuery",
    "WorkerDocument",
    "WorkerIndex",
    "build_index",
]


def build_index(settings, redis_client) -> WorkerIndex:
    """Return the WorkerIndex that settings.search_backend names ("redis" or "meilisearch").

    `settings` is a backend.settings.Settings, whose check() already requires MEILI_URL for
    Meilisearch. The Redis index uses `redis_client`; the Meilisearch index opens its own HTTP
    client, which the caller closes with `await index.aclose()`.
    """
    if settings.search_backend == "redis":
        from search.redis_geo import RedisGeoIndex

        return RedisGeoIndex(redis_client)
    if settings.search_backend == "meilisearch":
        if not settings.meili_url:
            raise ValueError("SEARCH_BACKEND=meilisearch needs MEILI_URL")
        from search.meili import MeiliWorkerIndex

        return MeiliWorkerIndex(settings.meili_url, settings.meili_api_key)
    raise ValueError(f"unknown SEARCH_BACKEND {settings.search_backend!r}: expected 'redis' or 'meilisearch'")
