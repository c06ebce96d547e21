"""The WorkerIndex interface that every search backend implements."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_LANGUAGES = ("普通话",)
APPROVED_AGENCY_STATUS = "approved"

# Redis GEO accepts latitudes up to this value only (its geohash covers the Web Mercator range).
MAX_GEO_LATITUDE = 85.05112878
# Characters that separate fields and list items in the Redis backend's compact record.
_RESERVED_CHARACTERS = ("|", ",")


class IndexUnavailable(Exception):
    """The search backend is unreachable or failed; callers keep their data and retry later."""


class IndexTaskFailed(IndexUnavailable):
    """The search backend accepted a write but reported that applying it failed."""


class InvalidDocument(ValueError):
    """A document that no backend can store, for example a position outside the GEO range."""


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
    verified: bool
    on_duty: bool
    agency_status: str  # backend.models.AgencyStatus value
    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    name: str = ""

    @property
    def matchable(self) -> bool:
        """Verified, on duty and of an approved agency."""
        return self.verified and self.on_duty and self.agency_status == APPROVED_AGENCY_STATUS

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
            "verified": self.verified,
            "on_duty": self.on_duty,
            "agency_status": self.agency_status,
            "languages": list(self.languages),
            "name": self.name,
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
            verified=bool(data["verified"]),
            on_duty=bool(data["on_duty"]),
            agency_status=str(data["agency_status"]),
            languages=tuple(data.get("languages") or DEFAULT_LANGUAGES),
            name=str(data.get("name", "")),
        )


def _check_words(name: str, values: tuple[str, ...], worker_id: int, *, allow_empty: bool) -> None:
    if not values and not allow_empty:
        raise InvalidDocument(f"worker {worker_id}: {name} is empty")
    for value in values:
        if not isinstance(value, str) or not value or any(c in value for c in _RESERVED_CHARACTERS):
            raise InvalidDocument(f"worker {worker_id}: invalid {name} item {value!r} (empty, or contains | or ,)")
        if any(ord(c) < 32 for c in value):
            raise InvalidDocument(f"worker {worker_id}: {name} item {value!r} contains a control character")


def validate_document(document: WorkerDocument) -> None:
    """Raise InvalidDocument unless every backend can store the document as it is.

    Backends call this before sending anything, because Meilisearch fails a whole batch over
    one bad `_geo` and Redis fails a whole script over one bad position.
    """
    worker_id = document.worker_id
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id <= 0:
        raise InvalidDocument(f"invalid worker_id {worker_id!r}: expected a positive integer")
    for name in ("lat", "lng", "rating", "agency_credit"):
        value = getattr(document, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidDocument(f"worker {worker_id}: {name} {value!r} is not a finite number")
    if not -MAX_GEO_LATITUDE <= document.lat <= MAX_GEO_LATITUDE:
        raise InvalidDocument(f"worker {worker_id}: lat {document.lat} is outside ±{MAX_GEO_LATITUDE}")
    if not -180.0 <= document.lng <= 180.0:
        raise InvalidDocument(f"worker {worker_id}: lng {document.lng} is outside ±180")
    if not isinstance(document.service_radius_m, int) or document.service_radius_m <= 0:
        raise InvalidDocument(f"worker {worker_id}: service_radius_m {document.service_radius_m!r} is not positive")
    _check_words("categories", document.categories, worker_id, allow_empty=False)
    _check_words("languages", document.languages, worker_id, allow_empty=True)
    _check_words("district_code", (document.district_code,), worker_id, allow_empty=False)
    _check_words("agency_status", (document.agency_status,), worker_id, allow_empty=False)
    if not isinstance(document.name, str) or any(ord(c) < 32 for c in document.name):
        raise InvalidDocument(f"worker {worker_id}: name {document.name!r} contains a control character")


@dataclass(frozen=True)
class SearchQuery:
    lat: float  # GCJ-02
    lng: float  # GCJ-02
    category: str
    min_certificate_rank: int
    radius_m: int
    limit: int
    exclude_worker_ids: frozenset[int] = field(default_factory=frozenset)
    language: str | None = None  # only workers who list this language, when set


@dataclass(frozen=True)
class SearchHit:
    document: WorkerDocument
    distance_m: float


class WorkerIndex(Protocol):
    """A geo index of workers.

    search() returns up to `limit` matchable workers offering the category, at or above the
    minimum certificate rank, speaking the query's language when it names one, within
    `radius_m` of the point and within each worker's own service radius, nearest first.

    Every method raises IndexUnavailable when the backend is unreachable or reports a failed
    write, and the write methods raise InvalidDocument before sending anything when a document
    fails validate_document().
    """

    async def upsert(self, document: WorkerDocument) -> None: ...

    async def upsert_many(self, documents: Iterable[WorkerDocument]) -> None: ...

    async def remove(self, worker_id: int) -> None: ...

    async def remove_many(self, worker_ids: Iterable[int]) -> None: ...

    async def get(self, worker_id: int) -> WorkerDocument | None: ...

    async def get_many(self, worker_ids: Iterable[int]) -> dict[int, WorkerDocument]: ...

    def iter_documents(self, batch_size: int = 1000) -> AsyncIterator[list[WorkerDocument]]: ...

    async def count_documents(self) -> int: ...

    async def search(self, query: SearchQuery) -> list[SearchHit]: ...

    async def clear(self) -> None: ...

    async def ensure_ready(self) -> None:
        """Create the index and apply its settings when missing, then check them."""

    async def is_built(self) -> bool:
        """Return True once a full build from the database has completed on this backend."""

    async def replace_all(self, batches: AsyncIterator[list[WorkerDocument]]) -> int:
        """Build a complete new index from the batches, then switch searches to it at once.

        Searches keep reading the old contents until the switch. Returns the documents written.
        """

    async def aclose(self) -> None: ...
