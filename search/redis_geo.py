"""WorkerIndex on Redis GEO sets: one sorted set per category holding only matchable workers."""

from __future__ import annotations

import json
import logging

import redis.asyncio as redis
from redis.exceptions import RedisError

from search.base import IndexUnavailable, SearchHit, SearchQuery, WorkerDocument

log = logging.getLogger(__name__)

# The hash tag keeps every key of one city in one Redis Cluster slot, so the Lua script below
# may touch them all.
DEFAULT_PREFIX = "linli:{xiamen}:"

# Replace a worker's document and its GEO memberships in one atomic step, so a concurrent
# search never sees the worker in a category set it has just left.
_UPSERT_SCRIPT = """
local old = redis.call('GET', KEYS[1])
if old then
  local previous = cjson.decode(old)
  for _, category in ipairs(previous['categories']) do
    redis.call('ZREM', ARGV[1] .. category, ARGV[2])
  end
end
redis.call('SET', KEYS[1], ARGV[3])
if ARGV[6] == '1' then
  for i = 7, #ARGV do
    redis.call('GEOADD', ARGV[1] .. ARGV[i], ARGV[4], ARGV[5], ARGV[2])
  end
end
return 1
"""

_REMOVE_SCRIPT = """
local old = redis.call('GET', KEYS[1])
if old then
  local previous = cjson.decode(old)
  for _, category in ipairs(previous['categories']) do
    redis.call('ZREM', ARGV[1] .. category, ARGV[2])
  end
  redis.call('DEL', KEYS[1])
end
return 1
"""

# The first GEOSEARCH asks for this many times the wanted count, because some of the nearest
# workers fail the certificate or service-radius filters; it grows fourfold while short.
_OVERFETCH_FACTOR = 3
_GROWTH_FACTOR = 4


class RedisGeoIndex:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX):
        self._redis = client
        self._prefix = prefix
        self._upsert = client.register_script(_UPSERT_SCRIPT)
        self._remove = client.register_script(_REMOVE_SCRIPT)

    def _geo_key(self, category: str) -> str:
        return f"{self._prefix}geo:{category}"

    def _doc_key(self, worker_id: int) -> str:
        return f"{self._prefix}doc:{worker_id}"

    async def upsert(self, document: WorkerDocument) -> None:
        args = [
            f"{self._prefix}geo:",
            str(document.worker_id),
            json.dumps(document.to_dict()),
            repr(document.lng),
            repr(document.lat),
            "1" if document.matchable else "0",
            *document.categories,
        ]
        try:
            await self._upsert(keys=[self._doc_key(document.worker_id)], args=args)
        except RedisError as exc:
            log.warning("index upsert failed worker_id=%s error=%s", document.worker_id, exc)
            raise IndexUnavailable(str(exc)) from exc

    async def remove(self, worker_id: int) -> None:
        try:
            await self._remove(keys=[self._doc_key(worker_id)], args=[f"{self._prefix}geo:", str(worker_id)])
        except RedisError as exc:
            log.warning("index remove failed worker_id=%s error=%s", worker_id, exc)
            raise IndexUnavailable(str(exc)) from exc

    async def get(self, worker_id: int) -> WorkerDocument | None:
        raw = await self._redis.get(self._doc_key(worker_id))
        return WorkerDocument.from_dict(json.loads(raw)) if raw else None

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        try:
            return await self._search(query)
        except RedisError as exc:
            log.warning("index search failed category=%s error=%s", query.category, exc)
            raise IndexUnavailable(str(exc)) from exc

    async def _search(self, query: SearchQuery) -> list[SearchHit]:
        fetch_count = query.limit * _OVERFETCH_FACTOR + len(query.exclude_worker_ids)
        while True:
            places = await self._redis.geosearch(
                self._geo_key(query.category),
                longitude=query.lng,
                latitude=query.lat,
                radius=query.radius_m,
                unit="m",
                sort="ASC",
                count=fetch_count,
                withdist=True,
            )
            hits = await self._filter(places, query)
            if len(hits) >= query.limit or len(places) < fetch_count:
                return hits[: query.limit]
            fetch_count *= _GROWTH_FACTOR

    async def _filter(self, places: list, query: SearchQuery) -> list[SearchHit]:
        places = [(int(member), float(distance)) for member, distance in places]
        places = [(wid, dist) for wid, dist in places if wid not in query.exclude_worker_ids]
        if not places:
            return []
        raw_documents = await self._redis.mget([self._doc_key(wid) for wid, _ in places])

        hits = []
        for (worker_id, distance_m), raw in zip(places, raw_documents):
            if raw is None:
                continue
            document = WorkerDocument.from_dict(json.loads(raw))
            # The document may have changed between GEOSEARCH and MGET.
            if not document.matchable or query.category not in document.categories:
                continue
            if document.certificate_rank < query.min_certificate_rank:
                continue
            if distance_m > document.service_radius_m:
                continue
            hits.append(SearchHit(document=document, distance_m=distance_m))
        return hits

    async def clear(self) -> None:
        async for key in self._redis.scan_iter(match=f"{self._prefix}*", count=1000):
            await self._redis.delete(key)

    async def count_documents(self) -> int:
        count = 0
        async for _ in self._redis.scan_iter(match=f"{self._prefix}doc:*", count=1000):
            count += 1
        return count
