"""WorkerIndex on Meilisearch, through meilisearch-python-sdk's AsyncClient.

The official `meilisearch` package makes blocking HTTP calls, which would stall the event loop
of every request in the process, so this module uses the asyncio client.

Engine behaviour that the code below guards against (Meilisearch 1.x documentation on
geosearch, documents and tasks):
- a partial update (PUT /documents) that omits `_geo` removes the document from geo search,
  so every write sends the whole document with POST /documents, which replaces it;
- `_geo` coordinates given as strings are accepted but misbehave, so they are sent as floats;
- one invalid `_geo` fails the whole batch's task, so validate_document() runs before sending;
- writes are asynchronous tasks whose failure is reported in the task, not raised by the
  request, so every task is awaited and its status checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable

import httpx2
from meilisearch_python_sdk import AsyncClient
from meilisearch_python_sdk.errors import MeilisearchApiError, MeilisearchError
from meilisearch_python_sdk.models.settings import LocalizedAttributes, MeilisearchSettings

from backend.geo import haversine_m
from search.base import (
    APPROVED_AGENCY_STATUS,
    DEFAULT_LANGUAGES,
    IndexTaskFailed,
    IndexUnavailable,
    SearchHit,
    SearchQuery,
    WorkerDocument,
    validate_document,
)

log = logging.getLogger(__name__)

# One index per city; the rebuild builds "<uid>_rebuild" and swaps the two.
DEFAULT_INDEX_UID = "linli_xiamen_workers"
PRIMARY_KEY = "id"
REQUEST_TIMEOUT_S = 5
TASK_TIMEOUT_MS = 30_000
_WRITE_BATCH = 1000
# A search page requests this many times `limit`, because the per-worker service radius can
# only be checked after the engine answers. Pages continue while too few hits pass.
_PAGE_FACTOR = 2
# Meilisearch returns at most maxTotalHits (default 1000) hits per query, across all pages.
_MAX_TOTAL_HITS = 1000

FILTERABLE_ATTRIBUTES = (
    "_geo",
    PRIMARY_KEY,
    "categories",
    "certificate_rank",
    "on_duty",
    "verified",
    "agency_id",
    "agency_status",
    "district_code",
    "languages",
)
SORTABLE_ATTRIBUTES = ("_geo", "rating", "agency_credit")
SEARCHABLE_ATTRIBUTES = ("name", "languages")
# ISO 639-3 code of Mandarin Chinese: segments names and languages as Chinese text.
CHINESE_LOCALE = "cmn"


def index_settings() -> MeilisearchSettings:
    """Return the settings applied to every worker index at start."""
    return MeilisearchSettings(
        filterable_attributes=list(FILTERABLE_ATTRIBUTES),
        sortable_attributes=list(SORTABLE_ATTRIBUTES),
        searchable_attributes=list(SEARCHABLE_ATTRIBUTES),
        localized_attributes=[
            LocalizedAttributes(attribute_patterns=list(SEARCHABLE_ATTRIBUTES), locales=[CHINESE_LOCALE])
        ],
    )


def document_body(document: WorkerDocument) -> dict:
    """Return the whole Meilisearch document of a validated worker document."""
    return {
        PRIMARY_KEY: document.worker_id,
        "_geo": {"lat": float(document.lat), "lng": float(document.lng)},
        "name": document.name,
        "categories": list(document.categories),
        "certificate_rank": document.certificate_rank,
        "service_radius_m": document.service_radius_m,
        "rating": float(document.rating),
        "agency_id": document.agency_id,
        "agency_credit": float(document.agency_credit),
        "agency_status": document.agency_status,
        "district_code": document.district_code,
        "verified": document.verified,
        "on_duty": document.on_duty,
        "languages": list(document.languages),
    }


def document_from_body(body: dict) -> WorkerDocument:
    return WorkerDocument(
        worker_id=int(body[PRIMARY_KEY]),
        lat=float(body["_geo"]["lat"]),
        lng=float(body["_geo"]["lng"]),
        categories=tuple(body["categories"]),
        certificate_rank=int(body["certificate_rank"]),
        service_radius_m=int(body["service_radius_m"]),
        rating=float(body["rating"]),
        agency_id=int(body["agency_id"]),
        agency_credit=float(body["agency_credit"]),
        district_code=str(body["district_code"]),
        verified=bool(body["verified"]),
        on_duty=bool(body["on_duty"]),
        agency_status=str(body["agency_status"]),
        languages=tuple(body.get("languages") or DEFAULT_LANGUAGES),
        name=str(body.get("name", "")),
    )


def quote(value: str) -> str:
    """Quote a string for a Meilisearch filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def search_filter(query: SearchQuery) -> str:
    """Return the filter expression of a query; the service radius is checked after the search."""
    clauses = [
        f"_geoRadius({float(query.lat)!r}, {float(query.lng)!r}, {int(query.radius_m)})",
        f"categories = {quote(query.category)}",
        f"certificate_rank >= {int(query.min_certificate_rank)}",
        "verified = true",
        "on_duty = true",
        f"agency_status = {quote(APPROVED_AGENCY_STATUS)}",
    ]
    if query.language:
        clauses.append(f"languages = {quote(query.language)}")
    if query.exclude_worker_ids:
        excluded = ", ".join(str(worker_id) for worker_id in sorted(query.exclude_worker_ids))
        clauses.append(f"{PRIMARY_KEY} NOT IN [{excluded}]")
    return " AND ".join(clauses)


def search_sort(query: SearchQuery) -> list[str]:
    return [f"_geoPoint({float(query.lat)!r}, {float(query.lng)!r}):asc"]


def _settings_differences(expected: MeilisearchSettings, actual: MeilisearchSettings) -> list[str]:
    differences = []
    for name in ("filterable_attributes", "sortable_attributes", "searchable_attributes"):
        want = sorted(getattr(expected, name) or [])
        have = sorted(str(item) for item in (getattr(actual, name) or []))
        if want != have:
            differences.append(f"{name}: expected {want}, found {have}")
    want_localized = [(sorted(a.attribute_patterns), sorted(a.locales)) for a in expected.localized_attributes or []]
    have_localized = [(sorted(a.attribute_patterns), sorted(a.locales)) for a in actual.localized_attributes or []]
    if want_localized != have_localized:
        differences.append(f"localized_attributes: expected {want_localized}, found {have_localized}")
    return differences


class MeiliWorkerIndex:
    """WorkerIndex on one Meilisearch index, holding every worker, matchable or not."""

    def __init__(self, url: str, api_key: str | None = None, *, index_uid: str = DEFAULT_INDEX_UID,
                 timeout_s: int = REQUEST_TIMEOUT_S):
        self._client = AsyncClient(url, api_key, timeout=timeout_s)
        self._uid = index_uid
        self._rebuild_uid = f"{index_uid}_rebuild"

    @property
    def client(self) -> AsyncClient:
        return self._client

    @property
    def index_uid(self) -> str:
        return self._uid

    async def _call(self, action: str, coroutine):
        try:
            return await coroutine
        except MeilisearchApiError as exc:
            log.warning("meilisearch %s failed index=%s status=%s code=%s", action, self._uid,
                        exc.status_code, exc.code)
            raise IndexUnavailable(f"meilisearch {action} failed: {exc}") from exc
        except (MeilisearchError, httpx2.HTTPError, OSError) as exc:
            log.warning("meilisearch %s failed index=%s error=%s", action, self._uid, exc)
            raise IndexUnavailable(f"meilisearch {action} failed: {exc}") from exc

    async def _wait(self, action: str, task_uid: int) -> None:
        """Wait for a task and raise IndexTaskFailed unless it succeeded."""
        result = await self._call(
            action, self._client.wait_for_task(task_uid, timeout_in_ms=TASK_TIMEOUT_MS, raise_for_status=False)
        )
        if result.status != "succeeded":
            error = result.error or {}
            log.error("meilisearch task failed action=%s task=%s status=%s code=%s message=%s",
                      action, task_uid, result.status, error.get("code"), error.get("message"))
            raise IndexTaskFailed(f"meilisearch task {task_uid} ({action}) {result.status}: {error.get('message')}")

    async def _add(self, uid: str, documents: list[WorkerDocument]) -> None:
        for document in documents:
            validate_document(document)
        index = self._client.index(uid)
        for start in range(0, len(documents), _WRITE_BATCH):
            bodies = [document_body(document) for document in documents[start : start + _WRITE_BATCH]]
            task = await self._call("add documents", index.add_documents(bodies, primary_key=PRIMARY_KEY))
            await self._wait("add documents", task.task_uid)

    async def upsert(self, document: WorkerDocument) -> None:
        await self.upsert_many([document])

    async def upsert_many(self, documents: Iterable[WorkerDocument]) -> None:
        await self._add(self._uid, list(documents))

    async def remove(self, worker_id: int) -> None:
        await self.remove_many([worker_id])

    async def remove_many(self, worker_ids: Iterable[int]) -> None:
        worker_ids = [str(worker_id) for worker_id in worker_ids]
        if not worker_ids:
            return
        index = self._client.index(self._uid)
        task = await self._call("delete documents", index.delete_documents(worker_ids))
        await self._wait("delete documents", task.task_uid)

    async def get(self, worker_id: int) -> WorkerDocument | None:
        try:
            body = await self._client.index(self._uid).get_document(str(worker_id))
        except MeilisearchApiError as exc:
            if exc.code == "document_not_found":
                return None
            raise IndexUnavailable(f"meilisearch get document failed: {exc}") from exc
        except (MeilisearchError, httpx2.HTTPError, OSError) as exc:
            raise IndexUnavailable(f"meilisearch get document failed: {exc}") from exc
        return document_from_body(body)

    async def get_many(self, worker_ids: Iterable[int]) -> dict[int, WorkerDocument]:
        worker_ids = sorted(set(worker_ids))
        found = {}
        index = self._client.index(self._uid)
        for start in range(0, len(worker_ids), _WRITE_BATCH):
            chunk = worker_ids[start : start + _WRITE_BATCH]
            page = await self._call(
                "get documents",
                index.get_documents(ids=[str(worker_id) for worker_id in chunk], limit=len(chunk)),
            )
            for body in page.results:
                document = document_from_body(body)
                found[document.worker_id] = document
        return found

    async def iter_documents(self, batch_size: int = 1000) -> AsyncIterator[list[WorkerDocument]]:
        index = self._client.index(self._uid)
        offset = 0
        while True:
            page = await self._call("get documents", index.get_documents(offset=offset, limit=batch_size))
            if not page.results:
                return
            yield [document_from_body(body) for body in page.results]
            offset += len(page.results)
            if offset >= page.total:
                return

    async def count_documents(self) -> int:
        stats = await self._call("get stats", self._client.index(self._uid).get_stats())
        return stats.number_of_documents

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """Page through the nearest workers until `limit` pass the service-radius check.

        NOTE: distances are computed here with backend.geo.haversine_m on the mean Earth radius,
        while `_geoRadius` uses the engine's own formula, so a worker within a few centimetres of
        the query radius may be kept by one and dropped by the other.
        """
        if query.limit <= 0:
            return []
        index = self._client.index(self._uid)
        page_size = min(_MAX_TOTAL_HITS, query.limit * _PAGE_FACTOR)
        hits: list[SearchHit] = []
        for offset in range(0, _MAX_TOTAL_HITS, page_size):
            results = await self._call(
                "search",
                index.search(
                    "", filter=search_filter(query), sort=search_sort(query), offset=offset, limit=page_size
                ),
            )
            for body in results.hits:
                document = document_from_body(body)
                distance_m = haversine_m(query.lat, query.lng, document.lat, document.lng)
                if distance_m <= document.service_radius_m:
                    hits.append(SearchHit(document=document, distance_m=distance_m))
                    if len(hits) >= query.limit:
                        return hits
            if len(results.hits) < page_size:
                break
        return hits

    async def clear(self) -> None:
        task = await self._call("delete all documents", self._client.index(self._uid).delete_all_documents())
        await self._wait("delete all documents", task.task_uid)

    async def _apply_settings(self, uid: str) -> None:
        expected = index_settings()
        index = self._client.index(uid)
        task = await self._call("update settings", index.update_settings(expected))
        await self._wait("update settings", task.task_uid)
        actual = await self._call("get settings", index.get_settings())
        differences = _settings_differences(expected, actual)
        if differences:
            raise IndexUnavailable(f"meilisearch index {uid} settings differ after update: {'; '.join(differences)}")

    async def _create_index(self, uid: str) -> None:
        # create_index waits for its task, then reads the index back, which fails when the
        # task failed, so a failed creation raises here too.
        await self._call(
            "create index", self._client.create_index(uid, primary_key=PRIMARY_KEY, timeout_in_ms=TASK_TIMEOUT_MS)
        )

    async def _index_exists(self, uid: str) -> bool:
        return await self._call("get index", self._client.get_raw_index(uid)) is not None

    async def ensure_ready(self) -> None:
        if not await self._index_exists(self._uid):
            await self._create_index(self._uid)
        await self._apply_settings(self._uid)

    async def is_built(self) -> bool:
        if not await self._index_exists(self._uid):
            return False
        return await self.count_documents() > 0

    async def replace_all(self, batches: AsyncIterator[list[WorkerDocument]]) -> int:
        """Build "<uid>_rebuild" with the same settings, swap it with the live index, drop the old one."""
        started = time.monotonic()
        await self._call("delete index", self._client.delete_index_if_exists(self._rebuild_uid))
        await self._create_index(self._rebuild_uid)
        await self._apply_settings(self._rebuild_uid)
        count = 0
        async for batch in batches:
            await self._add(self._rebuild_uid, batch)
            count += len(batch)
        if not await self._index_exists(self._uid):
            await self._create_index(self._uid)
        task = await self._call("swap indexes", self._client.swap_indexes([(self._uid, self._rebuild_uid)]))
        await self._wait("swap indexes", task.task_uid)
        await self._call("delete index", self._client.delete_index_if_exists(self._rebuild_uid))
        log.info("meilisearch index rebuilt index=%s documents=%s seconds=%.1f", self._uid, count,
                 time.monotonic() - started)
        return count

    async def aclose(self) -> None:
        await self._client.aclose()
