"""The exact HTTP requests the Meilisearch backend sends, captured without a Meilisearch server.

The backend's real AsyncClient points at a loopback port where nothing listens. An httpx
request hook records each request before the connection is refused, so these tests see the
method, path and body on the wire, and also check that a dead server gives IndexUnavailable.
What the engine does with the requests is tested by tests/test_index_behaviour.py when
MEILI_URL is set.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from backend.settings import Settings
from search import build_index
from search.base import IndexUnavailable, InvalidDocument, SearchQuery, WorkerDocument
from search.meili import MeiliWorkerIndex, index_settings, quote, search_filter
from search.redis_geo import RedisGeoIndex

# Nothing listens on port 1 of loopback, so every request fails at once after the hook ran.
DEAD_MEILI_URL = "http://127.0.0.1:1"
INDEX_UID = "linli_xiamen_workers"


@dataclasses.dataclass
class SentRequest:
    method: str
    path: str
    query: str
    body: bytes
    headers: dict[str, str]

    def json(self):
        return json.loads(self.body)


@pytest.fixture
async def captured():
    index = MeiliWorkerIndex(DEAD_MEILI_URL, "test-key")
    sent: list[SentRequest] = []

    async def record(request):
        sent.append(SentRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query.decode() if isinstance(request.url.query, bytes) else str(request.url.query),
            body=request.content,
            headers=dict(request.headers),
        ))

    index.client.http_client.event_hooks["request"].append(record)
    yield index, sent
    await index.aclose()


def make_document(**overrides) -> WorkerDocument:
    fields = {
        "worker_id": 42,
        "lat": 24.462059,
        "lng": 118.087828,
        "categories": ("elderly_care", "medical_escort"),
        "certificate_rank": 1,
        "service_radius_m": 3000,
        "rating": 4.25,
        "agency_id": 7,
        "agency_credit": 81.5,
        "district_code": "350203",
        "verified": True,
        "on_duty": True,
        "agency_status": "approved",
        "languages": ("普通话", "闽南语"),
        "name": "陈晓明",
    }
    fields.update(overrides)
    return WorkerDocument(**fields)


def make_query(**overrides) -> SearchQuery:
    fields = {
        "lat": 24.462059,
        "lng": 118.087828,
        "category": "elderly_care",
        "min_certificate_rank": 0,
        "radius_m": 5000,
        "limit": 50,
    }
    fields.update(overrides)
    return SearchQuery(**fields)


def test_settings_payload():
    assert index_settings().model_dump(by_alias=True, exclude_none=True) == {
        "filterableAttributes": [
            "_geo", "id", "categories", "certificate_rank", "on_duty", "verified", "agency_id",
            "agency_status", "district_code", "languages",
        ],
        "sortableAttributes": ["_geo", "rating", "agency_credit"],
        "searchableAttributes": ["name", "languages"],
        "localizedAttributes": [{"locales": ["cmn"], "attributePatterns": ["name", "languages"]}],
    }


async def test_settings_request_on_wire(captured):
    index, sent = captured

    with pytest.raises(IndexUnavailable):
        await index._apply_settings(INDEX_UID)

    assert len(sent) == 1
    assert sent[0].method == "PATCH"
    assert sent[0].path == f"/indexes/{INDEX_UID}/settings"
    assert sent[0].json() == index_settings().model_dump(by_alias=True, exclude_none=True)
    assert sent[0].headers["authorization"] == "Bearer test-key"


async def test_ensure_ready_first_reads_index(captured):
    index, sent = captured

    with pytest.raises(IndexUnavailable):
        await index.ensure_ready()

    assert [(request.method, request.path) for request in sent] == [("GET", f"/indexes/{INDEX_UID}")]


async def test_upsert_sends_whole_document(captured):
    index, sent = captured

    with pytest.raises(IndexUnavailable):
        await index.upsert(make_document())

    assert len(sent) == 1
    # POST replaces the whole document; PUT would merge a partial one and could drop `_geo`.
    assert sent[0].method == "POST"
    assert sent[0].path == f"/indexes/{INDEX_UID}/documents"
    assert sent[0].query == "primaryKey=id"
    assert sent[0].json() == [{
        "id": 42,
        "_geo": {"lat": 24.462059, "lng": 118.087828},
        "name": "陈晓明",
        "categories": ["elderly_care", "medical_escort"],
        "certificate_rank": 1,
        "service_radius_m": 3000,
        "rating": 4.25,
        "agency_id": 7,
        "agency_credit": 81.5,
        "agency_status": "approved",
        "district_code": "350203",
        "verified": True,
        "on_duty": True,
        "languages": ["普通话", "闽南语"],
    }]


async def test_upsert_sends_geo_as_floats(captured):
    index, sent = captured

    with pytest.raises(IndexUnavailable):
        await index.upsert(make_document(lat=24, lng=118, rating=4, agency_credit=75))

    body = sent[0].json()[0]
    assert body["_geo"] == {"lat": 24.0, "lng": 118.0}
    assert type(body["_geo"]["lat"]) is float
    assert type(body["_geo"]["lng"]) is float
    assert b'"lat": 24.0' in sent[0].body or b'"lat":24.0' in sent[0].body
    assert type(body["rating"]) is float
    assert type(body["agency_credit"]) is float


async def test_upsert_many_sends_one_batch(captured):
    index, sent = captured
    documents = [make_document(worker_id=worker_id) for worker_id in (1, 2, 3)]

    with pytest.raises(IndexUnavailable):
        await index.upsert_many(documents)

    assert len(sent) == 1
    assert [body["id"] for body in sent[0].json()] == [1, 2, 3]


@pytest.mark.parametrize(
    "overrides",
    [{"lat": float("nan")}, {"lat": "24.46"}, {"lng": 200.0}, {"lat": 86.0}],
    ids=["nan", "string", "lng-out-of-range", "lat-out-of-geo-range"],
)
async def test_invalid_geo_sends_nothing(captured, overrides):
    index, sent = captured

    with pytest.raises(InvalidDocument):
        await index.upsert_many([make_document(worker_id=1), make_document(worker_id=2, **overrides)])

    assert sent == []


async def test_remove_request(captured):
    index, sent = captured

    with pytest.raises(IndexUnavailable):
        await index.remove_many([5, 9])

    assert sent[0].method == "POST"
    assert sent[0].path == f"/indexes/{INDEX_UID}/documents/delete-batch"
    assert sent[0].json() == ["5", "9"]


async def test_remove_nothing_sends_nothing(captured):
    index, sent = captured

    await index.remove_many([])

    assert sent == []


async def test_search_request(captured):
    index, sent = captured
    query = make_query(
        category="child_care", min_certificate_rank=1, radius_m=10_000, limit=20,
        exclude_worker_ids=frozenset({9, 3}), language="闽南语",
    )

    with pytest.raises(IndexUnavailable):
        await index.search(query)

    assert sent[0].method == "POST"
    assert sent[0].path == f"/indexes/{INDEX_UID}/search"
    body = sent[0].json()
    assert body["q"] == ""
    assert body["filter"] == (
        '_geoRadius(24.462059, 118.087828, 10000) AND categories = "child_care" AND certificate_rank >= 1 '
        'AND verified = true AND on_duty = true AND agency_status = "approved" AND languages = "闽南语" '
        "AND id NOT IN [3, 9]"
    )
    assert body["sort"] == ["_geoPoint(24.462059, 118.087828):asc"]
    assert body["limit"] == 40
    assert body["offset"] == 0
    assert body["attributesToRetrieve"] == ["*"]


def test_filter_without_language_or_exclusions():
    assert search_filter(make_query()) == (
        '_geoRadius(24.462059, 118.087828, 5000) AND categories = "elderly_care" AND certificate_rank >= 0 '
        'AND verified = true AND on_duty = true AND agency_status = "approved"'
    )


def test_filter_coordinates_are_floats():
    assert search_filter(make_query(lat=24, lng=118)).startswith("_geoRadius(24.0, 118.0, 5000) AND")


def test_filter_quotes_values():
    assert quote('say "hi"') == '"say \\"hi\\""'
    assert quote("back\\slash") == '"back\\\\slash"'
    assert 'languages = "a\\" OR verified = false"' in search_filter(make_query(language='a" OR verified = false'))


async def test_search_limit_zero_sends_nothing(captured):
    index, sent = captured

    assert await index.search(make_query(limit=0)) == []
    assert sent == []


async def test_build_index_redis(redis_url):
    from backend.redis_client import open_redis

    client = open_redis(redis_url)
    index = build_index(Settings(), client)
    assert isinstance(index, RedisGeoIndex)
    assert index.prefix == "linli:{xiamen}:"
    await client.aclose()


async def test_build_index_meilisearch():
    settings = dataclasses.replace(Settings(), search_backend="meilisearch", meili_url=DEAD_MEILI_URL,
                                   meili_api_key="k")
    index = build_index(settings, None)
    try:
        assert isinstance(index, MeiliWorkerIndex)
        with pytest.raises(IndexUnavailable):
            await index.search(make_query())
    finally:
        await index.aclose()


def test_build_index_unknown_backend():
    with pytest.raises(ValueError, match="SEARCH_BACKEND"):
        build_index(dataclasses.replace(Settings(), search_backend="elastic"), None)
