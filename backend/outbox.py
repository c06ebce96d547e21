"""The index outbox: changes to what the search index holds, applied after they commit.

Every write that changes a worker's search document records a row here in its own database
transaction (record_worker_change, record_agency_change). apply_pending() later writes the
current database state of those workers to the index, so the index catches up after a crash
or an outage, and applying a row twice writes the same document twice.

Concurrency: a row is claimed with a conditional UPDATE before it is applied, so two processes
never apply the same row at once. Two processes could still claim two different rows of the
same worker, so each one checks after claiming whether another has a live claim on that worker
and skips the worker if so. Because both claim before they check, at least one of them sees the
other, so one worker's document is never written by two appliers at once, and the later
change is applied from a later read. An agency row is first turned into one row per worker of
the agency, so agency and worker changes are claimed the same way.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from backend import clock
from backend.catalog import CATEGORIES
from backend.context import Services
from backend.models import Agency, IndexOutbox, Worker
from search.base import IndexUnavailable, InvalidDocument, WorkerIndex, validate_document

log = logging.getLogger(__name__)

WORKER = "worker"
AGENCY = "agency"

# A claim lapses after this long, so the rows of a process that died mid-apply are taken
# over. It is far longer than one batch: an index call times out after 5 s (Redis socket
# timeout, Meilisearch request timeout) and a batch makes a few of them.
CLAIM_TTL_S = 120
# After a failed apply, a row waits 2, 4, 8, ... seconds, at most BACKOFF_MAX_S.
BACKOFF_BASE_S = 2
BACKOFF_MAX_S = 300
# Applied rows are kept this long, so a rebuild can replay what reached the old index while
# it was building the new one. A rebuild must finish within this time.
RETENTION_S = 24 * 3600
# Rows applied this long before a rebuild started are replayed too, to cover clocks of
# different hosts that disagree by up to a minute.
CLOCK_SKEW_MARGIN_S = 60
_LAST_ERROR_CHARS = 255
_LOAD_BATCH = 500


def _unclaimed(now: datetime) -> Q:
    return Q(claimed_until=None) | Q(claimed_until__lt=now)


def backoff_s(attempts: int) -> int:
    """Return the wait before the next try of a row that has failed `attempts` times."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S ** max(1, attempts))


async def _record(kind: str, target_id: int) -> None:
    now = clock.now()
    # Plain inserts with no unique key: a second change of the same worker adds a second row
    # instead of failing, which would abort the caller's PostgreSQL transaction.
    await IndexOutbox.create(kind=kind, target_id=target_id, created_at=now, next_attempt_at=now)


async def record_worker_change(worker_id: int) -> None:
    """Record that the worker's search document changed; call inside the change's transaction."""
    await _record(WORKER, worker_id)


async def record_agency_change(agency_id: int) -> None:
    """Record that every worker of the agency changed (status or credit score); call inside the transaction."""
    await _record(AGENCY, agency_id)


async def _expand_agency_rows(now: datetime, limit: int) -> int:
    """Replace due agency rows by one worker row per worker of the agency; returns rows expanded."""
    due = await (
        IndexOutbox.filter(kind=AGENCY, applied_at=None, next_attempt_at__lte=now)
        .filter(_unclaimed(now))
        .order_by("id")
        .limit(limit)
        .values_list("id", "target_id")
    )
    expanded = 0
    for row_id, agency_id in due:
        async with in_transaction():
            # Only the process whose UPDATE moves the row writes the worker rows.
            moved = await IndexOutbox.filter(id=row_id, applied_at=None).filter(_unclaimed(now)).update(applied_at=now)
            if not moved:
                continue
            worker_ids = await Worker.filter(agency_id=agency_id).values_list("id", flat=True)
            await IndexOutbox.bulk_create(
                [IndexOutbox(kind=WORKER, target_id=worker_id, created_at=now, next_attempt_at=now)
                 for worker_id in worker_ids],
                batch_size=_LOAD_BATCH,
            )
        expanded += 1
    return expanded


async def write_workers(index: WorkerIndex, worker_ids: list[int]) -> None:
    """Write the database state of these workers to the index: upsert those that exist, remove the rest.

    A worker whose document fails validation is removed from the index and logged, because one
    bad document would otherwise fail every batch it is sent in. Raises IndexUnavailable.
    """
    from backend.workers import document_for

    for start in range(0, len(worker_ids), _LOAD_BATCH):
        chunk = worker_ids[start : start + _LOAD_BATCH]
        workers = await Worker.filter(id__in=chunk).prefetch_related("agency")
        documents = []
        invalid = []
        for worker in workers:
            document = document_for(worker, worker.agency)
            try:
                validate_document(document)
            except InvalidDocument as exc:
                log.error("worker left out of the index, invalid document worker_id=%s error=%s", worker.id, exc)
                invalid.append(worker.id)
                continue
            documents.append(document)
        found = {worker.id for worker in workers}
        absent = [worker_id for worker_id in chunk if worker_id not in found] + invalid
        if documents:
            await index.upsert_many(documents)
        if absent:
            await index.remove_many(absent)


async def _claim(token: str, now: datetime, limit: int, worker_ids: list[int] | None) -> list[dict]:
    due = IndexOutbox.filter(kind=WORKER, applied_at=None, next_attempt_at__lte=now).filter(_unclaimed(now))
    if worker_ids is not None:
        due = due.filter(target_id__in=worker_ids)
    candidate_ids = await due.order_by("id").limit(limit).values_list("id", flat=True)
    if not candidate_ids:
        return []
    # The guard is checked again under the row lock, so only one process claims each row.
    await IndexOutbox.filter(id__in=candidate_ids, applied_at=None).filter(_unclaimed(now)).update(
        claimed_by=token, claimed_until=now + timedelta(seconds=CLAIM_TTL_S)
    )
    return await IndexOutbox.filter(claimed_by=token, applied_at=None).values("id", "target_id", "attempts")


async def _release_busy(token: str, now: datetime, rows: list[dict]) -> list[dict]:
    """Give back the rows of workers that another process has claimed too; return the rest."""
    targets = {row["target_id"] for row in rows}
    busy = set(
        await IndexOutbox.filter(kind=WORKER, target_id__in=list(targets), applied_at=None, claimed_until__gte=now)
        .exclude(claimed_by=token)
        .values_list("target_id", flat=True)
    )
    if not busy:
        return rows
    released = [row["id"] for row in rows if row["target_id"] in busy]
    await IndexOutbox.filter(id__in=released, claimed_by=token).update(claimed_by=None, claimed_until=None)
    log.info("index outbox rows left to another applier rows=%s workers=%s", len(released), len(busy))
    return [row for row in rows if row["target_id"] not in busy]


async def _postpone(token: str, now: datetime, rows: list[dict], error: Exception) -> None:
    attempts = max(row["attempts"] for row in rows) + 1
    delay_s = backoff_s(attempts)
    await IndexOutbox.filter(id__in=[row["id"] for row in rows], claimed_by=token).update(
        attempts=attempts,
        next_attempt_at=now + timedelta(seconds=delay_s),
        claimed_by=None,
        claimed_until=None,
        last_error=str(error)[:_LAST_ERROR_CHARS],
    )
    log.warning("index outbox apply failed rows=%s attempts=%s retry_in_s=%s error=%s",
                len(rows), attempts, delay_s, error)


async def apply_pending(services: Services, limit: int = 500, *, worker_ids: list[int] | None = None) -> int:
    """Apply up to `limit` due worker rows to services.index; return how many rows were applied.

    With `worker_ids`, only those workers' rows are applied (the request path uses this right
    after its commit). IndexUnavailable is caught and logged, and postpones the rows with a
    growing delay. Database errors are raised.
    """
    now = clock.now()
    if worker_ids is None:
        await _expand_agency_rows(now, limit)
        await purge_applied(now)
    token = secrets.token_hex(8)
    rows = await _claim(token, now, limit, worker_ids)
    if not rows:
        return 0
    rows = await _release_busy(token, now, rows)
    if not rows:
        return 0

    try:
        await write_workers(services.index, sorted({row["target_id"] for row in rows}))
    except IndexUnavailable as exc:
        await _postpone(token, now, rows, exc)
        return 0

    await IndexOutbox.filter(id__in=[row["id"] for row in rows], claimed_by=token).update(
        applied_at=clock.now(), claimed_by=None, claimed_until=None
    )
    return len(rows)


async def requeue_applied_since(started_at: datetime) -> int:
    """Record again every worker whose change was applied since `started_at`; return how many.

    A rebuild calls this after its swap: those changes reached the old index while the new
    one was built from a read that may predate them.
    """
    since = started_at - timedelta(seconds=CLOCK_SKEW_MARGIN_S)
    worker_ids = set(
        await IndexOutbox.filter(kind=WORKER, applied_at__gte=since).values_list("target_id", flat=True)
    )
    now = clock.now()
    await IndexOutbox.bulk_create(
        [IndexOutbox(kind=WORKER, target_id=worker_id, created_at=now, next_attempt_at=now)
         for worker_id in sorted(worker_ids)],
        batch_size=_LOAD_BATCH,
    )
    return len(worker_ids)


async def purge_applied(now: datetime | None = None) -> int:
    """Delete rows applied more than RETENTION_S ago; return how many."""
    now = now or clock.now()
    return await IndexOutbox.filter(applied_at__lt=now - timedelta(seconds=RETENTION_S)).delete()


async def pending_count() -> int:
    return await IndexOutbox.filter(applied_at=None).count()


@dataclass
class Drift:
    """Differences between the database and the index, found by find_drift()."""

    checked: int = 0
    missing: list[int] = field(default_factory=list)  # in the database, absent from the index
    extra: list[int] = field(default_factory=list)  # in the index, absent from the database
    different: dict[int, list[str]] = field(default_factory=dict)  # worker id -> differing fields
    geo_mismatches: dict[str, int] = field(default_factory=dict)  # category -> members out of place
    pending_changes: int = 0  # outbox rows not yet applied when the check ran

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.different or self.geo_mismatches)


async def _check_geo_sets(index, expected_members: dict[str, set[int]], drift: Drift) -> None:
    """Compare the Redis backend's GEO sets with the matchable workers of each category."""
    categories = set(expected_members) | {category.code for category in CATEGORIES}
    for category in sorted(categories):
        stored = await index.geo_members(category)
        wrong = len(stored ^ expected_members.get(category, set()))
        if wrong:
            drift.geo_mismatches[category] = wrong


async def find_drift(index: WorkerIndex, batch_size: int = 1000) -> Drift:
    """Compare every worker's document in the database with the index, field by field.

    Changes that are still in the outbox show up as differences until they are applied. The
    result therefore counts pending rows too, and the check is worth repeating once they are.
    """
    from backend.workers import document_for

    drift = Drift(pending_changes=await pending_count())
    agencies = {agency.id: agency for agency in await Agency.all()}
    database_ids: set[int] = set()
    expected_members: dict[str, set[int]] = {}
    last_id = 0
    while True:
        workers = await Worker.filter(id__gt=last_id).order_by("id").limit(batch_size)
        if not workers:
            break
        last_id = workers[-1].id
        stored = await index.get_many([worker.id for worker in workers])
        for worker in workers:
            database_ids.add(worker.id)
            expected = document_for(worker, agencies.get(worker.agency_id) or await Agency.get(id=worker.agency_id))
            try:
                validate_document(expected)
            except InvalidDocument:
                # write_workers leaves invalid documents out of the index on purpose.
                if worker.id in stored:
                    drift.extra.append(worker.id)
                continue
            drift.checked += 1
            if expected.matchable:
                for category in expected.categories:
                    expected_members.setdefault(category, set()).add(worker.id)
            actual = stored.get(worker.id)
            if actual is None:
                drift.missing.append(worker.id)
                continue
            actual_fields = actual.to_dict()
            fields = [name for name, value in expected.to_dict().items() if actual_fields[name] != value]
            if fields:
                drift.different[worker.id] = fields

    async for batch in index.iter_documents(batch_size=batch_size):
        drift.extra.extend(document.worker_id for document in batch if document.worker_id not in database_ids)
    drift.extra.sort()

    if hasattr(index, "geo_members"):
        await _check_geo_sets(index, expected_members, drift)
    return drift
