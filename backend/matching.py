"""Ranking of candidate workers for a service request.

score = 0.45 * proximity + 0.30 * rating + 0.15 * credit + 0.10 * certificate, each part in [0, 1]:
- proximity: 1 at the request's door, 0 at the edge of the search radius;
- rating: the worker's smoothed average stars mapped from 1..5 to 0..1;
- credit: the agency's credit_score / 100;
- certificate: 0 assistant, 0.5 intermediate, 1 senior.
Distance leads because a resident in need waits for whoever is nearest; the rating then breaks
ties between nearby workers, and credit and certificate level nudge further.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from search.base import SearchHit, SearchQuery, WorkerIndex

PROXIMITY_WEIGHT = 0.45
RATING_WEIGHT = 0.30
CREDIT_WEIGHT = 0.15
CERTIFICATE_WEIGHT = 0.10

# A new worker starts at the prior mean (4 stars, counted as 5 ratings), which puts them between
# well-rated and badly rated colleagues instead of first or last.
RATING_PRIOR_MEAN = 4.0
RATING_PRIOR_WEIGHT = 5
MAX_CERTIFICATE_RANK = 2

# Ranking looks at this many of the nearest eligible workers, then keeps the best offer_count.
CANDIDATE_POOL = 50


def smoothed_rating(rating_sum: int, rating_count: int) -> float:
    return (rating_sum + RATING_PRIOR_MEAN * RATING_PRIOR_WEIGHT) / (rating_count + RATING_PRIOR_WEIGHT)


def candidate_score(hit: SearchHit, radius_m: int) -> float:
    document = hit.document
    proximity = max(0.0, 1.0 - hit.distance_m / radius_m)
    rating = (document.rating - 1.0) / 4.0
    credit = document.agency_credit / 100.0
    certificate = document.certificate_rank / MAX_CERTIFICATE_RANK
    return (
        PROXIMITY_WEIGHT * proximity
        + RATING_WEIGHT * rating
        + CREDIT_WEIGHT * credit
        + CERTIFICATE_WEIGHT * certificate
    )


@dataclass(frozen=True)
class Candidate:
    hit: SearchHit
    score: float


def rank_candidates(hits: list[SearchHit], radius_m: int, count: int) -> list[Candidate]:
    ranked = [Candidate(hit=hit, score=candidate_score(hit, radius_m)) for hit in hits]
    # Ties go to the nearer worker, then the lower id, so the order is reproducible.
    ranked.sort(key=lambda c: (-c.score, c.hit.distance_m, c.hit.document.worker_id))
    return ranked[:count]


async def find_candidates(
    index: WorkerIndex,
    *,
    lat: float,
    lng: float,
    category: str,
    min_certificate_rank: int,
    radius_m: int,
    count: int,
    exclude_worker_ids: frozenset[int] = frozenset(),
    language: str | None = None,
) -> list[Candidate]:
    query = SearchQuery(
        lat=lat,
        lng=lng,
        category=category,
        min_certificate_rank=min_certificate_rank,
        radius_m=radius_m,
        limit=max(CANDIDATE_POOL, count),
        exclude_worker_ids=exclude_worker_ids,
        language=language,
    )
    hits = await index.search(query)
    if not hits and language is not None:
        # Nobody here speaks the language: help in another language beats no help, so the
        # search falls back to every worker rather than widening the ring for it.
        hits = await index.search(dataclasses.replace(query, language=None))
    return rank_candidates(hits, radius_m, count)
