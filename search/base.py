"""The WorkerIndex interface that every search backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class IndexUnavailable(Exception):
    """The search backend did not answer; callers keep their data and retry later."""


@dataclass(frozen=True)
class WorkerDocument:
    """What the index stores of one worker: enough to filter and rank without the database."""

    worker_id: int
    lat: float  # GCJ-02
    lng: float  # GCJ-02
    categories: tuple[str, ...]
    certificate_rank: int  # 0 assistant, 1 intermediate, 2 senior
    service_radius_m: int
    rating: float  # smoothed average stars, 1 to 5
    agency_id: int
    agency_credit: float  # 0 to 100
    district_code: str
    matchable: bool  # verified, on duty and of an approved agency

    def to_dict(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "lat": self.lat,
            "lng": self.lng,
            "categories": list(self.categories),
            "certificate_rank": self.certificate_rank,
            "service_radius_m": self.service_radius_m,
            "rating": self.rating,
            "agency_id": self.agency_id,
            "agency_credit": self.agency_credit,
            "district_code": self.district_code,
            "matchable": self.matchable,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WorkerDocument":
        return cls(
            worker_id=int(data["worker_id"]),
            lat=float(data["lat"]),
            lng=float(data["lng"]),
            categories=tuple(data["categories"]),
            certificate_rank=int(data["certificate_rank"]),
            service_radius_m=int(data["service_radius_m"]),
            rating=float(data["rating"]),
            agency_id=int(data["agency_id"]),
            agency_credit=float(data["agency_credit"]),
            district_code=str(data["district_code"]),
            matchable=bool(data["matchable"]),
        )


@dataclass(frozen=True)
class SearchQuery:
    lat: float  # GCJ-02
    lng: float  # GCJ-02
    category: str
    min_certificate_rank: int
    radius_m: int
    limit: int
    exclude_worker_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class SearchHit:
    document: WorkerDocument
    distance_m: float


class WorkerIndex(Protocol):
    """A geo index of workers.

    search() returns up to `limit` matchable workers offering the category, at or above the
    minimum certificate rank, within `radius_m` of the point and within each worker's own
    service radius, nearest first.
    """

    async def upsert(self, document: WorkerDocument) -> None: ...

    async def remove(self, worker_id: int) -> None: ...

    async def search(self, query: SearchQuery) -> list[SearchHit]: ...

    async def clear(self) -> None: ...
