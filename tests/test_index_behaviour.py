"""One behaviour suite for every WorkerIndex backend.

Each test runs against the Redis backend on the session's Redis-protocol server, and against
Meilisearch when MEILI_URL is set (and MEILI_API_KEY, if the server needs one). Without it the
Meilisearch runs are skipped with that reason.

Distances come from each engine's own formula, so radius edges are tested 10 m inside and
outside: the engines' spheres differ by 0.03%, 1.5 m at 5 km.
"""

from __future__ import annotations

import math
import os
import random
import uuid
from dataclasses import replace

import pytest

from backend.geo import haversine_m
from backend.redis_client import open_redis
from search.base import IndexUnavailable, InvalidDocument, SearchQuery, WorkerDocument
from search.redis_geo import RedisGeoIndex

ORIGIN = (24.462059, 118.087828)  # 思明区, GCJ-02
METRES_PER_DEGREE_LAT = 111_195.0
EDGE_MARGIN_M = 10
# The engines' spheres differ by 0.03% (1.5 m at 5 km) and Redis adds up to 0.3 m of geohash error.
POSITION_TOLERANCE_M = 2.0
BORDER_M = 3.0
TEST_PREFIX = "linli:{behaviour}:"

BACKENDS = ["redis", "meilisearch"]


def north(metres: float, point: tuple[float, float] = ORIGIN) -> tuple[float, float]:
    return point[0] + metres / METRES_PER_DEGREE_LAT, point[1]


def east(metres: float, point: tuple[float, float] = ORIGIN) -> tuple[float, float]:
    return point[0], point[1] + metres / (METRES_PER_DEGREE_LAT * math.cos(math.radians(point[0])))


def make_document(worker_id: int, point: tuple[float, float] = ORIGIN, **overrides) -> WorkerDocument:
    fields = {
        "worker_id": worker_id,
        "lat": point[0],
        "lng": point[1],
        "categories": ("elderly_care",),
        "certificate_rank": 1,
        "service_radius_m": 5000,
        "rating": 4.0,
        "agency_id": 1,
        "agency_credit": 75.0,
        "district_code": "350203",
        "verified": True,
        "on_duty": True,
        "agency_status": "approved",
        "languages": ("普通话",),
        "name": f"社工{worker_id}",
    }
    fields.update(overrides)
    return WorkerDocument(**fields)


def make_query(point: tuple[float, float] = ORIGIN, **overrides) -> SearchQuery:
    fields = {
        "lat": point[0],
        "lng": point[1],
        "category": "elderly_care",
        "min_certificate_rank": 0,
        "radius_m": 5000,
        "limit": 50,
    }
    fields.update(overrides)
    return SearchQuery(**fields)


async def found_ids(index, query: SearchQuery) -> list[int]:
    return [hit.document.worker_id for hit in await index.search(query)]


@pytest.fixture(params=BACKENDS)
async def index(request, redis_url):
    if request.param == "redis":
        client = open_redis(redis_url)
        index = RedisGeoIndex(client, prefix=TEST_PREFIX)
        await index.clear()
        yield index
        await index.clear()
        await client.aclose()
        return

    meili_url = os.environ.get("MEILI_URL")
    if not meili_url:
        pytest.skip("MEILI_URL is unset: no Meilisearch server to run the behaviour suite against")
    from search.meili import MeiliWorkerIndex

    index = MeiliWorkerIndex(meili_url, os.environ.get("MEILI_API_KEY"), index_uid=f"linli_test_{uuid.uuid4().hex[:12]}")
    await index.ensure_ready()
    yield index
    await index.client.delete_index_if_exists(index.index_uid)
    await index.aclose()


async def test_search_filters_category(index):
    await index.upsert_many([
        make_document(1, north(100)),
        make_document(2, north(200), categories=("child_care",)),
        make_document(3, north(300), categories=("child_care", "elderly_care")),
    ])

    assert await found_ids(index, make_query()) == [1, 3]
    assert await found_ids(index, make_query(category="child_care")) == [2, 3]
    assert await found_ids(index, make_query(category="mental_health")) == []


async def test_search_filters_certificate_rank(index):
    await index.upsert_many([
        make_document(1, north(100), certificate_rank=0),
        make_document(2, north(200), certificate_rank=1),
        make_document(3, north(300), certificate_rank=2),
    ])

    assert await found_ids(index, make_query(min_certificate_rank=0)) == [1, 2, 3]
    assert await found_ids(index, make_query(min_certificate_rank=1)) == [2, 3]
    assert await found_ids(index, make_query(min_certificate_rank=2)) == [3]


async def test_search_skips_unmatchable_workers(index):
    await index.upsert_many([
        make_document(1, north(100)),
        make_document(2, north(200), verified=False, on_duty=False),
        make_document(3, north(300), on_duty=False),
        make_document(4, north(400), agency_status="suspended"),
    ])

    assert await found_ids(index, make_query()) == [1]
    stored = await index.get(4)
    assert stored is not None
    assert stored.matchable is False
    assert await index.count_documents() == 4


async def test_search_radius_edge(index):
    await index.upsert_many([
        make_document(1, north(5000 - EDGE_MARGIN_M)),
        make_document(2, north(5000 + EDGE_MARGIN_M)),
        make_document(3, east(5000 - EDGE_MARGIN_M)),
    ])

    assert sorted(await found_ids(index, make_query(radius_m=5000))) == [1, 3]
    assert await found_ids(index, make_query(radius_m=4000)) == []


async def test_search_service_radius_edge(index):
    await index.upsert_many([
        make_document(1, north(1000 - EDGE_MARGIN_M), service_radius_m=1000),
        make_document(2, north(1000 + EDGE_MARGIN_M), service_radius_m=1000),
        make_document(3, north(1000 + EDGE_MARGIN_M), service_radius_m=2000),
    ])

    assert await found_ids(index, make_query()) == [1, 3]


async def test_search_orders_nearest_first(index):
    distances = [700, 100, 2500, 40, 1200, 3900]
    await index.upsert_many([make_document(i + 1, north(d)) for i, d in enumerate(distances)])

    hits = await index.search(make_query())

    assert [hit.document.worker_id for hit in hits] == [4, 2, 1, 5, 3, 6]
    for hit, expected in zip(hits, sorted(distances)):
        assert abs(hit.distance_m - expected) < POSITION_TOLERANCE_M, (hit.document.worker_id, hit.distance_m)


async def test_search_respects_limit(index):
    await index.upsert_many([make_document(i, north(10 * i)) for i in range(1, 31)])

    assert await found_ids(index, make_query(limit=7)) == list(range(1, 8))
    assert await found_ids(index, make_query(limit=0)) == []


async def test_search_excludes_workers(index):
    await index.upsert_many([make_document(i, north(100 * i)) for i in range(1, 6)])

    assert await found_ids(index, make_query(exclude_worker_ids=frozenset({2, 4}))) == [1, 3, 5]
    assert await found_ids(index, make_query(limit=2, exclude_worker_ids=frozenset({1}))) == [2, 3]


async def test_search_filters_language(index):
    await index.upsert_many([
        make_document(1, north(100), languages=("普通话",)),
        make_document(2, north(200), languages=("普通话", "闽南语")),
        make_document(3, north(300), languages=("English", "手语")),
    ])

    assert await found_ids(index, make_query()) == [1, 2, 3]
    assert await found_ids(index, make_query(language="闽南语")) == [2]
    assert await found_ids(index, make_query(language="English")) == [3]
    assert await found_ids(index, make_query(language="粤语")) == []


async def test_language_does_not_match_part(index):
    await index.upsert(make_document(1, north(100), languages=("普通话", "English")))

    assert await found_ids(index, make_query(language="Eng")) == []
    assert await found_ids(index, make_query(language="普通")) == []


async def test_upsert_moves_worker(index):
    await index.upsert(make_document(1, north(100)))
    await index.upsert(make_document(1, north(3000, east(3000))))

    hits = await index.search(make_query())
    assert [hit.document.worker_id for hit in hits] == [1]
    assert hits[0].distance_m > 4000
    assert await found_ids(index, make_query(radius_m=2000)) == []


async def test_upsert_changes_categories(index):
    await index.upsert(make_document(1, north(100), categories=("elderly_care", "child_care")))
    await index.upsert(make_document(1, north(100), categories=("child_care",)))

    assert await found_ids(index, make_query()) == []
    assert await found_ids(index, make_query(category="child_care")) == [1]


async def test_duty_off_and_on_again(index):
    await index.upsert(make_document(1, north(100)))
    await index.upsert(make_document(1, north(100), on_duty=False))
    assert await found_ids(index, make_query()) == []

    await index.upsert(make_document(1, north(100)))
    assert await found_ids(index, make_query()) == [1]


async def test_update_keeps_worker_in_geo_search(index):
    # Meilisearch drops a document from geo search after a partial update without `_geo`, so
    # every write must be a whole document: a rating change must leave the position in place.
    await index.upsert(make_document(1, north(100)))
    await index.upsert(make_document(1, north(100), rating=4.6, agency_credit=90.0))

    hits = await index.search(make_query())
    assert [hit.document.worker_id for hit in hits] == [1]
    assert hits[0].document.rating == 4.6
    assert hits[0].document.agency_credit == 90.0


async def test_get_returns_whole_document(index):
    document = make_document(7, north(250), languages=("普通话", "闽南语"), name="林|晓,明")
    await index.upsert(document)

    assert await index.get(7) == document
    assert await index.get(8) is None
    assert await index.get_many([7, 8]) == {7: document}


async def test_remove_deletes_worker(index):
    await index.upsert_many([make_document(1, north(100)), make_document(2, north(200))])

    await index.remove(1)
    await index.remove(999)

    assert await found_ids(index, make_query()) == [2]
    assert await index.get(1) is None
    assert await index.count_documents() == 1


async def test_remove_many_and_clear(index):
    await index.upsert_many([make_document(i, north(100 * i)) for i in range(1, 6)])

    await index.remove_many([1, 2, 3])
    assert await found_ids(index, make_query()) == [4, 5]

    await index.clear()
    assert await found_ids(index, make_query()) == []
    assert await index.count_documents() == 0


async def test_iter_documents_returns_all(index):
    documents = [make_document(i, north(10 * i), on_duty=i % 2 == 0) for i in range(1, 26)]
    await index.upsert_many(documents)

    listed = {}
    async for batch in index.iter_documents(batch_size=7):
        for document in batch:
            listed[document.worker_id] = document

    assert listed == {document.worker_id: document for document in documents}


@pytest.mark.parametrize(
    "overrides",
    [
        {"lat": float("nan")},
        {"lng": float("inf")},
        {"lat": 90.0},
        {"lng": 181.0},
        {"lat": "24.46"},
        {"categories": ()},
        {"categories": ("elderly|care",)},
        {"languages": ("普通话,闽南语",)},
        {"name": "line\nbreak"},
        {"worker_id": 0},
    ],
    ids=["nan-lat", "inf-lng", "lat-out-of-geo-range", "lng-out-of-range", "string-lat", "no-category",
         "separator-in-category", "separator-in-language", "line-break-in-name", "zero-id"],
)
async def test_invalid_document_rejected_before_sending(index, overrides):
    good = make_document(1, north(100))
    bad = replace(make_document(2, north(200)), **overrides)

    with pytest.raises(InvalidDocument):
        await index.upsert_many([good, bad])

    # Nothing of the batch was sent: one bad `_geo` would fail a whole Meilisearch batch.
    assert await index.count_documents() == 0
    assert await found_ids(index, make_query()) == []


async def test_replace_all_swaps_contents(index):
    await index.upsert_many([make_document(1, north(100)), make_document(2, north(200), categories=("child_care",))])

    async def batches():
        yield [make_document(3, north(300)), make_document(4, north(400), on_duty=False)]
        yield [make_document(5, north(500), categories=("mental_health",))]

    written = await index.replace_all(batches())

    assert written == 3
    assert await found_ids(index, make_query()) == [3]
    assert await found_ids(index, make_query(category="child_care")) == []
    assert await found_ids(index, make_query(category="mental_health")) == [5]
    assert await index.get(1) is None
    assert await index.count_documents() == 3
    assert await index.is_built()


def _reference(documents: list[WorkerDocument], query: SearchQuery) -> tuple[dict[int, float], set[int]]:
    """Split the workers that pass every filter, computed in Python, into certain and borderline.

    Certain workers are more than BORDER_M inside both the query radius and their own service
    radius. Borderline ones are within BORDER_M of the nearer edge, where the engines' spheres
    and Redis's geohash cells (0.3 m) may decide either way. Returns ({id: distance}, {id}).
    """
    certain: dict[int, float] = {}
    borderline: set[int] = set()
    for document in documents:
        if not document.matchable or query.category not in document.categories:
            continue
        if document.certificate_rank < query.min_certificate_rank or document.worker_id in query.exclude_worker_ids:
            continue
        if query.language and query.language not in document.languages:
            continue
        distance = haversine_m(query.lat, query.lng, document.lat, document.lng)
        edge = min(query.radius_m, document.service_radius_m)
        if distance <= edge - BORDER_M:
            certain[document.worker_id] = distance
        elif distance <= edge + BORDER_M:
            borderline.add(document.worker_id)
    return certain, borderline


def _dense_city(rng: random.Random, count: int, half_size_m: float) -> list[WorkerDocument]:
    documents = []
    for worker_id in range(1, count + 1):
        point = north(rng.uniform(-half_size_m, half_size_m), east(rng.uniform(-half_size_m, half_size_m)))
        documents.append(make_document(
            worker_id,
            point,
            categories=tuple(rng.sample(["elderly_care", "child_care", "medical_escort"], rng.randint(1, 2))),
            certificate_rank=rng.choice([0, 0, 1, 2]),
            service_radius_m=rng.choice([500, 1000, 3000, 5000]),
            on_duty=rng.random() < 0.8,
            languages=("普通话", "闽南语") if rng.random() < 0.3 else ("普通话",),
        ))
    return documents


async def test_nearest_search_matches_reference(index):
    rng = random.Random(20251204)
    documents = _dense_city(rng, 2000, 3000)
    await index.upsert_many(documents)

    for number in range(40):
        query = make_query(
            north(rng.uniform(-2500, 2500), east(rng.uniform(-2500, 2500))),
            category=rng.choice(["elderly_care", "child_care", "medical_escort"]),
            min_certificate_rank=rng.choice([0, 1]),
            radius_m=rng.choice([300, 1000, 5000]),
            limit=rng.choice([1, 5, 50]),
            exclude_worker_ids=frozenset(rng.sample(range(1, 2001), 20)),
            language=rng.choice([None, None, "闽南语"]),
        )
        certain, borderline = _reference(documents, query)
        hits = await index.search(query)
        found = [hit.document.worker_id for hit in hits]
        context = f"query {number}: {query}"

        assert len(hits) <= query.limit, context
        assert set(found) <= set(certain) | borderline, context
        distances = [hit.distance_m for hit in hits]
        assert distances == sorted(distances), context
        for hit in hits:
            if hit.document.worker_id in certain:
                assert abs(hit.distance_m - certain[hit.document.worker_id]) < POSITION_TOLERANCE_M, context
        if len(hits) < query.limit:
            assert set(certain) <= set(found), context
        else:
            # No eligible worker nearer than the farthest hit was skipped.
            nearer = {worker_id for worker_id, d in certain.items() if d < distances[-1] - POSITION_TOLERANCE_M}
            assert nearer <= set(found), context


async def test_widening_equals_plain_geosearch(index):
    if not isinstance(index, RedisGeoIndex):
        pytest.skip("plain_search is the Redis backend's single-GEOSEARCH reference")
    rng = random.Random(7)
    documents = _dense_city(rng, 3000, 1500)
    await index.upsert_many(documents)

    for number in range(40):
        query = make_query(
            north(rng.uniform(-1500, 1500), east(rng.uniform(-1500, 1500))),
            category=rng.choice(["elderly_care", "child_care"]),
            radius_m=rng.choice([200, 2000, 5000]),
            limit=rng.choice([5, 50, 500]),
            exclude_worker_ids=frozenset(rng.sample(range(1, 3001), 50)),
            language=rng.choice([None, "闽南语"]),
        )
        widened = await index.search(query)
        plain = await index.plain_search(query)
        assert [(h.document.worker_id, h.distance_m) for h in widened] == [
            (h.document.worker_id, h.distance_m) for h in plain
        ], f"query {number}: {query}"


async def test_failed_task_raises(index):
    if isinstance(index, RedisGeoIndex):
        pytest.skip("Meilisearch reports write failures in tasks; Redis raises them at once")
    from search.meili import MeiliWorkerIndex

    # An index whose primary key is another field fails every write of ours in its task.
    uid = f"{index.index_uid}_wrong_key"
    await index.client.create_index(uid, primary_key="uid")
    wrong = MeiliWorkerIndex(os.environ["MEILI_URL"], os.environ.get("MEILI_API_KEY"), index_uid=uid)
    try:
        with pytest.raises(IndexUnavailable):
            await wrong.upsert(make_document(1, north(100)))
        assert await wrong.get(1) is None
    finally:
        await index.client.delete_index_if_exists(uid)
        await wrong.aclose()


async def test_dead_server_raises_unavailable(index):
    if isinstance(index, RedisGeoIndex):
        dead_client = open_redis("redis://127.0.0.1:1/0")
        dead = RedisGeoIndex(dead_client, prefix=TEST_PREFIX)
    else:
        from search.meili import MeiliWorkerIndex

        dead = MeiliWorkerIndex("http://127.0.0.1:1", None)
    try:
        with pytest.raises(IndexUnavailable):
            await dead.search(make_query())
        with pytest.raises(IndexUnavailable):
            await dead.upsert(make_document(1))
        with pytest.raises(IndexUnavailable):
            await dead.remove(1)
        with pytest.raises(IndexUnavailable):
            await dead.get(1)
    finally:
        await dead.aclose()
        if isinstance(index, RedisGeoIndex):
            await dead_client.aclose()


async def test_replace_all_deletes_old_layout_keys(index, redis_url):
    if not isinstance(index, RedisGeoIndex):
        pytest.skip("the old key layout existed only in the Redis backend")
    client = open_redis(redis_url)
    try:
        # Keys as an earlier version wrote them: a JSON string per worker and unregistered GEO sets.
        await client.set(f"{TEST_PREFIX}doc:5", '{"worker_id": 5}')
        await client.geoadd(f"{TEST_PREFIX}geo:elderly_care", (ORIGIN[1], ORIGIN[0], "5"))
        await client.geoadd(f"{TEST_PREFIX}geo:poverty_relief", (ORIGIN[1], ORIGIN[0], "5"))

        async def batches():
            yield [make_document(1, north(100))]

        await index.replace_all(batches())

        assert not await client.exists(f"{TEST_PREFIX}doc:5")
        assert not await client.exists(f"{TEST_PREFIX}geo:poverty_relief")
        assert await client.zrange(f"{TEST_PREFIX}geo:elderly_care", 0, -1) == ["1"]
        assert await found_ids(index, make_query()) == [1]
    finally:
        await client.aclose()
