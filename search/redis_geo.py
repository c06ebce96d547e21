"""WorkerIndex on Redis: one hash of compact worker records and one GEO set per category.

Keys, all under one prefix whose hash tag keeps them in one Redis Cluster slot:

    {prefix}docs             hash: worker id -> compact record (every indexed worker)
    {prefix}geo:{category}   GEO set of the matchable workers offering the category
    {prefix}geo-categories   set of the categories that have a GEO set, for the rebuild swap
    {prefix}built            present once a full build has completed

A search runs as one Lua script: it widens the radius step by step until it has `limit`
eligible workers or reaches the query radius, filters in the server, and returns one string.
One reply element instead of hundreds matters because redis-py parses RESP in Python when
hiredis is absent: in a profile of the earlier GEOSEARCH-then-MGET path, reply parsing took
more time than Redis itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

import redis.asyncio as redis
from redis.exceptions import RedisError

from search.base import (
    IndexUnavailable,
    SearchHit,
    SearchQuery,
    WorkerDocument,
    validate_document,
)

log = logging.getLogger(__name__)

# The hash tag keeps every key of one city in one Redis Cluster slot, so the Lua scripts below
# may touch them all.
DEFAULT_PREFIX = "linli:{xiamen}:"
# A rebuild writes here, inside the same hash tag, then renames its keys over the live ones.
_STAGING_SUFFIX = "rebuild:"

# Record fields, in order, separated by "|", with "," between the items of a list field.
# The Lua scripts read fields 1 to 5 by position, and the name is last because it may contain "|".
# validate_document() rejects control characters, so the line and tab separators of a search
# reply cannot occur inside a record.
_RECORD_FIELDS = (
    "worker_id", "service_radius_m", "certificate_rank", "languages", "categories", "lat", "lng", "rating",
    "agency_id", "agency_credit", "district_code", "verified", "on_duty", "agency_status", "name",
)
_NAME_SPLIT = len(_RECORD_FIELDS) - 1
_HIT_SEPARATOR = "\n"
_DISTANCE_SEPARATOR = "\t"

# The first search step covers this fraction of the query radius, at least _MIN_FIRST_RADIUS_M;
# each later step doubles it. At 1,000,000 workers in a 40 km box, the first 625 m step of a
# 5 km query already contains more than 50 workers of a category.
_FIRST_RADIUS_FRACTION = 1 / 8
_MIN_FIRST_RADIUS_M = 200
# A step fetches this many times `limit` nearest members, plus the excluded ones. When the
# radius contains more members than that and too few pass the filters, the count grows fourfold.
_FETCH_FACTOR = 2
_FETCH_GROWTH = 4
# Bounds the script's loop. From 200 m, the radius reaches 100 km after 9 doublings.
_MAX_SEARCH_STEPS = 24
# HMGET takes its arguments on the Lua stack, which has room for about 8,000 values.
_LUA_CHUNK = 1000

# Parsed documents keyed by their record string, so a worker found again is not parsed again.
# The record contains the whole document, so a stale entry cannot be returned.
_PARSE_CACHE_MAX = 200_000
_WRITE_BATCH = 500

_UPSERT_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then
  local categories = string.match(old, '^[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|')
  for category in string.gmatch(categories or '', '[^,]+') do
    redis.call('ZREM', ARGV[1] .. 'geo:' .. category, ARGV[2])
  end
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if ARGV[6] == '1' then
  for i = 7, #ARGV do
    redis.call('GEOADD', ARGV[1] .. 'geo:' .. ARGV[i], ARGV[4], ARGV[5], ARGV[2])
    redis.call('SADD', ARGV[1] .. 'geo-categories', ARGV[i])
  end
end
return 1
"""

_REMOVE_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then
  local categories = string.match(old, '^[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|')
  for category in string.gmatch(categories or '', '[^,]+') do
    redis.call('ZREM', ARGV[1] .. 'geo:' .. category, ARGV[2])
  end
  redis.call('HDEL', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: the category's GEO set, the record hash.
# ARGV: lng, lat, query radius (m), limit, first radius (m), min rank, language ('' for any),
#       fetch factor, fetch growth, max steps, chunk size, then the excluded worker ids.
# Returns "distance<TAB>record" lines, nearest first. Widening stops as soon as `limit`
# workers pass, so a dense district never scans the whole query disc. The result equals a
# plain GEOSEARCH of the whole radius followed by the same filters, because each step examines
# members in distance order and stops only once the nearer ones are all examined:
# - after a step that returned every member within its radius, the next (wider) step skips
#   the members within the old radius, whose verdicts it keeps;
# - after a step cut short by COUNT, the next step fetches more at the same radius and starts
#   over, because members tied with the last one may have been left out.
# Records are read with HMGET in chunks a little larger than the hits still missing, since
# most members pass the filters and each record read costs a hash lookup.
_SEARCH_SCRIPT = """
local lng, lat = ARGV[1], ARGV[2]
local max_radius = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local radius = math.min(tonumber(ARGV[5]), max_radius)
local min_rank = tonumber(ARGV[6])
local language = ARGV[7]
local fetch_growth = tonumber(ARGV[9])
local max_steps = tonumber(ARGV[10])
local max_chunk = tonumber(ARGV[11])
local excluded = {}
for i = 12, #ARGV do excluded[ARGV[i]] = true end
local fetch = limit * tonumber(ARGV[8]) + (#ARGV - 11)
local wanted_language = ',' .. language .. ','

local lines = {}
local examined_radius = -1
for step = 1, max_steps do
  local places = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lng, lat, 'BYRADIUS', radius, 'm',
                            'ASC', 'COUNT', fetch, 'WITHDIST')
  local truncated = #places >= fetch
  local fresh = {}
  for i = 1, #places do
    if tonumber(places[i][2]) > examined_radius then fresh[#fresh + 1] = places[i] end
  end
  local first = 1
  while first <= #fresh and #lines < limit do
    local missing = limit - #lines
    local last = math.min(first + math.min(max_chunk, missing + math.floor(missing / 2) + 8) - 1, #fresh)
    local ids = {}
    for i = first, last do ids[#ids + 1] = fresh[i][1] end
    local records = redis.call('HMGET', KEYS[2], unpack(ids))
    for i = first, last do
      local member, distance = fresh[i][1], fresh[i][2]
      local record = records[i - first + 1]
      if record and not excluded[member] then
        local service_radius, rank, languages = string.match(record, '^[^|]*|(%d+)|(%d+)|([^|]*)|')
        if service_radius and tonumber(distance) <= tonumber(service_radius) and tonumber(rank) >= min_rank
           and (language == '' or string.find(',' .. languages .. ',', wanted_language, 1, true)) then
          lines[#lines + 1] = distance .. '\\t' .. record
          if #lines >= limit then return table.concat(lines, '\\n') end
        end
      end
    end
    first = last + 1
  end
  if truncated then
    fetch = fetch * fetch_growth
    lines = {}
    examined_radius = -1
  elseif radius >= max_radius then
    break
  else
    examined_radius = radius
    radius = math.min(radius * 2, max_radius)
  end
end
return table.concat(lines, '\\n')
"""

# ARGV: the live prefix, the staging prefix. Frees the live keys with UNLINK, so the swap does
# not block the server while a large hash is deallocated, then renames the staging keys.
_SWAP_SCRIPT = """
local live, staging = ARGV[1], ARGV[2]
for _, category in ipairs(redis.call('SMEMBERS', live .. 'geo-categories')) do
  redis.call('UNLINK', live .. 'geo:' .. category)
end
for _, category in ipairs(redis.call('SMEMBERS', staging .. 'geo-categories')) do
  if redis.call('EXISTS', staging .. 'geo:' .. category) == 1 then
    redis.call('RENAME', staging .. 'geo:' .. category, live .. 'geo:' .. category)
  end
end
for _, name in ipairs({'docs', 'geo-categories'}) do
  redis.call('UNLINK', live .. name)
  if redis.call('EXISTS', staging .. name) == 1 then
    redis.call('RENAME', staging .. name, live .. name)
  end
end
redis.call('SET', live .. 'built', '1')
return 1
"""


# ARGV: the prefix, a category. Deletes the category's GEO set unless the registry lists it.
_DELETE_UNREGISTERED_SCRIPT = """
if redis.call('SISMEMBER', ARGV[1] .. 'geo-categories', ARGV[2]) == 0 then
  redis.call('UNLINK', ARGV[1] .. 'geo:' .. ARGV[2])
end
return 1
"""


def format_record(document: WorkerDocument) -> str:
    """Encode a validated document as the compact record stored in the hash."""
    return "|".join(
        (
            str(document.worker_id),
            str(document.service_radius_m),
            str(document.certificate_rank),
            ",".join(document.languages),
            ",".join(document.categories),
            repr(float(document.lat)),
            repr(float(document.lng)),
            repr(float(document.rating)),
            str(document.agency_id),
            repr(float(document.agency_credit)),
            document.district_code,
            "1" if document.verified else "0",
            "1" if document.on_duty else "0",
            document.agency_status,
            document.name,
        )
    )


def parse_record(record: str) -> WorkerDocument:
    parts = record.split("|", _NAME_SPLIT)
    if len(parts) != len(_RECORD_FIELDS):
        raise ValueError(f"malformed index record {record[:80]!r}: expected {len(_RECORD_FIELDS)} fields")
    return WorkerDocument(
        worker_id=int(parts[0]),
        service_radius_m=int(parts[1]),
        certificate_rank=int(parts[2]),
        languages=tuple(parts[3].split(",")) if parts[3] else (),
        categories=tuple(parts[4].split(",")),
        lat=float(parts[5]),
        lng=float(parts[6]),
        rating=float(parts[7]),
        agency_id=int(parts[8]),
        agency_credit=float(parts[9]),
        district_code=parts[10],
        verified=parts[11] == "1",
        on_duty=parts[12] == "1",
        agency_status=parts[13],
        name=parts[14],
    )


class RedisGeoIndex:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX):
        self._redis = client
        self._prefix = prefix
        self._staging = prefix + _STAGING_SUFFIX
        self._upsert = client.register_script(_UPSERT_SCRIPT)
        self._remove = client.register_script(_REMOVE_SCRIPT)
        self._search_script = client.register_script(_SEARCH_SCRIPT)
        self._swap = client.register_script(_SWAP_SCRIPT)
        self._delete_unregistered = client.register_script(_DELETE_UNREGISTERED_SCRIPT)
        self._parsed: dict[str, WorkerDocument] = {}

    @property
    def prefix(self) -> str:
        return self._prefix

    def geo_key(self, category: str) -> str:
        return f"{self._prefix}geo:{category}"

    @property
    def docs_key(self) -> str:
        return f"{self._prefix}docs"

    def _document(self, record: str) -> WorkerDocument:
        document = self._parsed.get(record)
        if document is None:
            document = parse_record(record)
            if len(self._parsed) >= _PARSE_CACHE_MAX:
                self._parsed.clear()
            self._parsed[record] = document
        return document

    def _upsert_args(self, document: WorkerDocument) -> list[str]:
        return [
            self._prefix,
            str(document.worker_id),
            format_record(document),
            repr(float(document.lng)),
            repr(float(document.lat)),
            "1" if document.matchable else "0",
            *document.categories,
        ]

    async def upsert(self, document: WorkerDocument) -> None:
        await self.upsert_many([document])

    async def upsert_many(self, documents: Iterable[WorkerDocument]) -> None:
        documents = list(documents)
        for document in documents:
            validate_document(document)
        for start in range(0, len(documents), _WRITE_BATCH):
            batch = documents[start : start + _WRITE_BATCH]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for document in batch:
                        await self._upsert(keys=[self.docs_key], args=self._upsert_args(document), client=pipe)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("index upsert failed workers=%s first_worker_id=%s error=%s",
                            len(batch), batch[0].worker_id, exc)
                raise IndexUnavailable(str(exc)) from exc

    async def remove(self, worker_id: int) -> None:
        await self.remove_many([worker_id])

    async def remove_many(self, worker_ids: Iterable[int]) -> None:
        worker_ids = list(worker_ids)
        for start in range(0, len(worker_ids), _WRITE_BATCH):
            batch = worker_ids[start : start + _WRITE_BATCH]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for worker_id in batch:
                        await self._remove(keys=[self.docs_key], args=[self._prefix, str(worker_id)], client=pipe)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("index remove failed workers=%s first_worker_id=%s error=%s", len(batch), batch[0], exc)
                raise IndexUnavailable(str(exc)) from exc

    async def get(self, worker_id: int) -> WorkerDocument | None:
        return (await self.get_many([worker_id])).get(worker_id)

    async def get_many(self, worker_ids: Iterable[int]) -> dict[int, WorkerDocument]:
        worker_ids = list(worker_ids)
        if not worker_ids:
            return {}
        try:
            records = await self._redis.hmget(self.docs_key, [str(worker_id) for worker_id in worker_ids])
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc
        return {
            worker_id: parse_record(record) for worker_id, record in zip(worker_ids, records) if record is not None
        }

    async def iter_documents(self, batch_size: int = 1000) -> AsyncIterator[list[WorkerDocument]]:
        """Yield every stored document once, in batches of about `batch_size`, in no set order."""
        seen: set[int] = set()
        cursor = 0
        try:
            while True:
                cursor, records = await self._redis.hscan(self.docs_key, cursor=cursor, count=batch_size)
                # HSCAN may return a field twice while the hash is being resized.
                batch = []
                for record in records.values():
                    document = parse_record(record)
                    if document.worker_id not in seen:
                        seen.add(document.worker_id)
                        batch.append(document)
                if batch:
                    yield batch
                if cursor == 0:
                    return
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def count_documents(self) -> int:
        try:
            return await self._redis.hlen(self.docs_key)
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def geo_members(self, category: str) -> set[int]:
        """Return the worker ids in the category's GEO set, for consistency checks."""
        try:
            return {int(member) for member in await self._redis.zrange(self.geo_key(category), 0, -1)}
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        if query.limit <= 0:
            return []
        language = query.language or ""
        if any(character in language for character in ("|", ",")):
            # No stored language contains a separator, so no worker can match.
            return []
        first_radius = max(_MIN_FIRST_RADIUS_M, query.radius_m * _FIRST_RADIUS_FRACTION)
        args = [
            repr(float(query.lng)),
            repr(float(query.lat)),
            query.radius_m,
            query.limit,
            first_radius,
            query.min_certificate_rank,
            language,
            _FETCH_FACTOR,
            _FETCH_GROWTH,
            _MAX_SEARCH_STEPS,
            _LUA_CHUNK,
            *(str(worker_id) for worker_id in query.exclude_worker_ids),
        ]
        try:
            reply = await self._search_script(keys=[self.geo_key(query.category), self.docs_key], args=args)
        except RedisError as exc:
            log.warning("index search failed category=%s error=%s", query.category, exc)
            raise IndexUnavailable(str(exc)) from exc

        hits = []
        if reply:
            for line in reply.split(_HIT_SEPARATOR):
                distance, record = line.split(_DISTANCE_SEPARATOR, 1)
                hits.append(SearchHit(document=self._document(record), distance_m=float(distance)))
        return hits

    async def plain_search(self, query: SearchQuery) -> list[SearchHit]:
        """Search the whole radius in one GEOSEARCH, then filter in Python.

        The reference that search() must agree with, for the behaviour suite and the benchmark.
        """
        try:
            places = await self._redis.geosearch(
                self.geo_key(query.category), longitude=query.lng, latitude=query.lat,
                radius=query.radius_m, unit="m", sort="ASC", withdist=True,
            )
            documents = await self.get_many([int(member) for member, _ in places])
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc
        hits = []
        for member, distance in places:
            document = documents.get(int(member))
            if document is None or document.worker_id in query.exclude_worker_ids:
                continue
            if document.certificate_rank < query.min_certificate_rank or distance > document.service_radius_m:
                continue
            if query.language and query.language not in document.languages:
                continue
            hits.append(SearchHit(document=document, distance_m=float(distance)))
        return hits[: query.limit]

    async def _delete_prefix(self, prefix: str) -> None:
        async for key in self._redis.scan_iter(match=f"{prefix}*", count=1000):
            await self._redis.unlink(key)

    async def clear(self) -> None:
        try:
            await self._delete_prefix(self._prefix)
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc
        self._parsed.clear()

    async def ensure_ready(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def is_built(self) -> bool:
        try:
            return bool(await self._redis.exists(f"{self._prefix}built"))
        except RedisError as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def _write_staging(self, documents: list[WorkerDocument]) -> None:
        records = {}
        positions: dict[str, list] = {}
        for document in documents:
            validate_document(document)
            records[str(document.worker_id)] = format_record(document)
            if document.matchable:
                for category in document.categories:
                    positions.setdefault(category, []).extend((document.lng, document.lat, str(document.worker_id)))
        async with self._redis.pipeline(transaction=False) as pipe:
            if records:
                pipe.hset(f"{self._staging}docs", mapping=records)
            for category, values in positions.items():
                pipe.execute_command("GEOADD", f"{self._staging}geo:{category}", *values)
                pipe.sadd(f"{self._staging}geo-categories", category)
            await pipe.execute()

    async def _delete_stale_keys(self) -> None:
        """Delete GEO sets missing from the category registry, and per-worker keys of the old layout.

        Both only exist when the keys were written by an earlier version, which kept one JSON
        string per worker under {prefix}doc:{id} and had no registry. Searches ignore them, so
        deleting them after the swap, one by one, is safe.
        """
        geo_prefix = f"{self._prefix}geo:"
        async for key in self._redis.scan_iter(match=f"{geo_prefix}*", count=1000):
            # The check and the delete run as one script, so a category registered by an upsert
            # in between keeps its new GEO set.
            await self._delete_unregistered(args=[self._prefix, key[len(geo_prefix):]])
        async for key in self._redis.scan_iter(match=f"{self._prefix}doc:*", count=1000):
            await self._redis.unlink(key)

    async def replace_all(self, batches: AsyncIterator[list[WorkerDocument]]) -> int:
        """Write every document under the staging prefix, then swap it in with one script.

        Searches read the old keys until the swap, which is atomic. Writes that reach the live
        keys during the build are lost at the swap, so the caller re-applies them afterwards
        (backend.outbox.requeue_applied_since).
        """
        count = 0
        try:
            await self._delete_prefix(self._staging)
            async for batch in batches:
                for start in range(0, len(batch), _WRITE_BATCH):
                    await self._write_staging(batch[start : start + _WRITE_BATCH])
                count += len(batch)
            await self._swap(args=[self._prefix, self._staging])
            await self._delete_stale_keys()
        except RedisError as exc:
            log.warning("index rebuild failed after documents=%s error=%s", count, exc)
            raise IndexUnavailable(str(exc)) from exc
        self._parsed.clear()
        return count

    async def aclose(self) -> None:
        """Leave the client open: it belongs to the caller (backend.context.Services.redis)."""
