"""The index outbox: changes recorded with their transaction, applied later, never lost."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from backend import clock, dispatch, outbox, workers
from backend.models import (
    AgencyStatus,
    IndexOutbox,
    Offer,
    RequestStatus,
    ServiceRequest,
    User,
    Worker,
    WorkerStatus,
)
from backend.redis_client import open_redis
from backend.settings import PROJECT_ROOT
from search.meili import MeiliWorkerIndex
from search.redis_geo import RedisGeoIndex
from tests.factories import SIMING, login_resident, make_city, make_worker, north_of, request_body

# Nothing listens on port 1 of loopback, so every call to it fails at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
DEAD_MEILI_URL = "http://127.0.0.1:1"


async def _pending_rows() -> list[IndexOutbox]:
    return await IndexOutbox.filter(applied_at=None).order_by("id")


async def _indexed(services, worker_id: int):
    return await services.index.get(worker_id)


@pytest.fixture
async def dead_index():
    client = open_redis(DEAD_REDIS_URL)
    yield RedisGeoIndex(client)
    await client.aclose()


async def test_record_rolls_back_with_transaction(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    await IndexOutbox.all().delete()

    with pytest.raises(IntegrityError):
        async with in_transaction():
            await outbox.record_worker_change(worker.id)
            # A failing statement aborts the transaction, and the outbox row goes with it.
            await User.create(openid=(await User.get(id=worker.user_id)).openid)

    assert await IndexOutbox.all().count() == 0


async def test_record_twice_in_one_transaction(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    await IndexOutbox.all().delete()

    async with in_transaction():
        await outbox.record_worker_change(worker.id)
        await outbox.record_worker_change(worker.id)
        await outbox.record_agency_change(agencies["approved"].id)
        await outbox.record_agency_change(agencies["approved"].id)
        # The transaction is still usable after the repeats (PostgreSQL aborts it on an error).
        await Worker.filter(id=worker.id).update(on_duty=False)

    assert await IndexOutbox.filter(kind="worker").count() == 2
    assert await IndexOutbox.filter(kind="agency").count() == 2


async def test_apply_writes_current_state(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])

    async with in_transaction():
        await Worker.filter(id=worker.id).update(rating_sum=25, rating_count=5, on_duty=False)
        await outbox.record_worker_change(worker.id)
    assert (await _indexed(services, worker.id)).on_duty is True

    applied = await outbox.apply_pending(services)

    assert applied == 1
    stored = await _indexed(services, worker.id)
    assert stored.on_duty is False
    assert stored.rating == pytest.approx(4.5)
    assert await _pending_rows() == []


async def test_apply_is_idempotent(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    for _ in range(3):
        await outbox.record_worker_change(worker.id)

    assert await outbox.apply_pending(services) == 3
    assert await outbox.apply_pending(services) == 0
    await outbox.record_worker_change(worker.id)
    assert await outbox.apply_pending(services) == 1

    drift = await outbox.find_drift(services.index)
    assert drift.clean, drift


async def test_apply_removes_deleted_worker(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    user_id = worker.user_id
    async with in_transaction():
        await worker.delete()
        await outbox.record_worker_change(worker.id)
    await User.filter(id=user_id).delete()

    assert await outbox.apply_pending(services) == 1
    assert await _indexed(services, worker.id) is None


async def test_agency_change_updates_its_workers(services):
    agencies = await make_city()
    first = await make_worker(services, agencies["approved"])
    second = await make_worker(services, agencies["approved"], north_of(SIMING, 300))
    other = await make_worker(services, agencies["other"])

    async with in_transaction():
        agencies["approved"].status = AgencyStatus.SUSPENDED
        agencies["approved"].credit_score = 40.0
        await agencies["approved"].save(update_fields=["status", "credit_score"])
        await outbox.record_agency_change(agencies["approved"].id)

    assert await outbox.apply_pending(services) == 2
    for worker in (first, second):
        stored = await _indexed(services, worker.id)
        assert stored.agency_status == "suspended"
        assert stored.agency_credit == 40.0
        assert stored.matchable is False
    assert (await _indexed(services, other.id)).matchable is True
    assert await _pending_rows() == []


async def test_index_down_postpones_with_backoff(services, dead_index):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    start = clock.now()
    clock.freeze(start)
    await Worker.filter(id=worker.id).update(on_duty=False)
    await outbox.record_worker_change(worker.id)
    down = dataclasses.replace(services, index=dead_index)

    assert await outbox.apply_pending(down) == 0

    [row] = await _pending_rows()
    assert row.attempts == 1
    assert row.next_attempt_at == start + timedelta(seconds=outbox.backoff_s(1))
    assert row.claimed_by is None
    assert row.last_error

    # Not due yet, so a live index does not get it either.
    assert await outbox.apply_pending(services) == 0
    assert (await _indexed(services, worker.id)).on_duty is True

    clock.freeze(start + timedelta(seconds=outbox.backoff_s(1)))
    assert await outbox.apply_pending(services) == 1
    assert (await _indexed(services, worker.id)).on_duty is False


def test_backoff_grows_to_limit():
    delays = [outbox.backoff_s(attempts) for attempts in range(1, 12)]
    assert delays[:4] == [2, 4, 8, 16]
    assert delays == sorted(delays)
    assert delays[-1] == outbox.BACKOFF_MAX_S


async def test_claimed_row_is_not_applied_twice(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    start = clock.now()
    clock.freeze(start)
    await outbox.record_worker_change(worker.id)
    await IndexOutbox.filter(applied_at=None).update(
        claimed_by="another-process", claimed_until=start + timedelta(seconds=60)
    )

    assert await outbox.apply_pending(services) == 0
    [row] = await _pending_rows()
    assert row.claimed_by == "another-process"

    # A claim whose holder died lapses and is taken over.
    clock.freeze(start + timedelta(seconds=61))
    assert await outbox.apply_pending(services) == 1
    assert await _pending_rows() == []


async def test_worker_claimed_elsewhere_is_left_alone(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    start = clock.now()
    clock.freeze(start)
    await outbox.record_worker_change(worker.id)
    await IndexOutbox.filter(applied_at=None).update(
        claimed_by="another-process", claimed_until=start + timedelta(seconds=60)
    )
    # A later change of the same worker: applying it now could race the other applier.
    await outbox.record_worker_change(worker.id)

    assert await outbox.apply_pending(services) == 0

    rows = await _pending_rows()
    assert len(rows) == 2
    assert rows[1].claimed_by is None
    assert rows[1].attempts == 0


async def test_concurrent_appliers_share_rows(services):
    agencies = await make_city()
    staff = [await make_worker(services, agencies["approved"], north_of(SIMING, 50 * i)) for i in range(6)]
    for worker in staff:
        await outbox.record_worker_change(worker.id)

    results = await asyncio.gather(*(outbox.apply_pending(services) for _ in range(3)))

    assert sum(results) + await outbox.apply_pending(services) == len(staff)
    assert await IndexOutbox.filter(applied_at__not_isnull=True).count() == len(staff)


async def test_invalid_worker_left_out_of_batch(services):
    agencies = await make_city()
    good = await make_worker(services, agencies["approved"])
    bad = await make_worker(services, agencies["approved"], north_of(SIMING, 100))
    async with in_transaction():
        # A latitude the API would reject, written behind its back.
        await Worker.filter(id=bad.id).update(lat=95.0)
        await Worker.filter(id=good.id).update(on_duty=False)
        await outbox.record_worker_change(bad.id)
        await outbox.record_worker_change(good.id)

    assert await outbox.apply_pending(services) == 2

    assert (await _indexed(services, good.id)).on_duty is False
    assert await _indexed(services, bad.id) is None
    assert (await outbox.find_drift(services.index)).clean


async def test_requeue_replays_changes_after_rebuild(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    start = clock.now()
    clock.freeze(start)
    await outbox.record_worker_change(worker.id)
    await outbox.apply_pending(services)

    assert await outbox.requeue_applied_since(start) == 1
    assert [row.target_id for row in await _pending_rows()] == [worker.id]


async def test_purge_keeps_recent_rows(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    start = clock.now()
    clock.freeze(start)
    await outbox.record_worker_change(worker.id)
    await outbox.apply_pending(services)

    assert await outbox.purge_applied(start + timedelta(seconds=outbox.RETENTION_S - 1)) == 0
    assert await outbox.purge_applied(start + timedelta(seconds=outbox.RETENTION_S + 1)) == 1


async def test_rebuild_index_replaces_contents(services):
    agencies = await make_city()
    present = await make_worker(services, agencies["approved"])
    stale = await make_worker(services, agencies["approved"], north_of(SIMING, 100))
    # Drift on purpose: an index document the database no longer has, and a missing one.
    await services.index.upsert(dataclasses.replace(await _indexed(services, stale.id), worker_id=999_999))
    await services.index.remove(present.id)
    assert not (await outbox.find_drift(services.index)).clean

    count = await workers.rebuild_index(services)

    assert count == 2
    drift = await outbox.find_drift(services.index)
    assert drift.clean, drift


async def test_find_drift_reports_differences(services):
    agencies = await make_city()
    first = await make_worker(services, agencies["approved"])
    second = await make_worker(services, agencies["approved"], north_of(SIMING, 100))
    await Worker.filter(id=first.id).update(on_duty=False)
    await services.index.remove(second.id)
    await services.index.upsert(dataclasses.replace(await _indexed(services, first.id), worker_id=777_777))

    drift = await outbox.find_drift(services.index)

    assert drift.different == {first.id: ["on_duty", "matchable"]}
    assert drift.missing == [second.id]
    assert drift.extra == [777_777]
    assert drift.geo_mismatches == {"elderly_care": 3}
    assert not drift.clean


async def _set_duty_through_service(services, worker: Worker, on_duty: bool) -> None:
    user = await User.get(id=worker.user_id)
    await workers.set_duty(services, user, on_duty=on_duty, location=None)


@pytest.mark.parametrize("dead_backend", ["redis", "meilisearch"])
async def test_requests_during_outage_matched_after(services, app, client, database_url, redis_url, dead_backend):
    agencies = await make_city()
    if dead_backend == "redis":
        dead_client = open_redis(DEAD_REDIS_URL)
        dead = RedisGeoIndex(dead_client)
    else:
        dead_client = None
        dead = MeiliWorkerIndex(DEAD_MEILI_URL, None)
    down = dataclasses.replace(services, index=dead)
    start = clock.now()
    clock.freeze(start)
    try:
        # Every index call fails from here on. A worker comes on duty and a resident creates a request.
        worker = await make_worker(down, agencies["approved"], verified=True, on_duty=False)
        await _set_duty_through_service(down, worker, True)
        headers, _ = await login_resident(client)
        app.ctx.services = down
        _, response = await client.post("/api/v1/service-requests", json=request_body(), headers=headers)

        assert response.status == 201, response.json
        assert response.json["status"] == "matching"
        assert await _indexed(services, worker.id) is None
        assert len(await _pending_rows()) >= 2
        # The scheduler keeps trying while the index is down, and nothing is lost.
        clock.freeze(start + timedelta(seconds=dispatch.STALLED_AFTER_S + 1))
        assert await outbox.apply_pending(down) == 0
        assert await dispatch.retry_stalled(down) == 1
        assert (await ServiceRequest.get(id=response.json["id"])).status == RequestStatus.MATCHING
    finally:
        await dead.aclose()
        if dead_client is not None:
            await dead_client.aclose()

    # The index is reachable again, and the next scheduler steps catch up.
    app.ctx.services = services
    clock.freeze(start + timedelta(seconds=outbox.BACKOFF_MAX_S))
    assert await outbox.apply_pending(services) >= 2
    assert await dispatch.retry_stalled(services) == 1

    stored = await ServiceRequest.get(id=response.json["id"])
    assert stored.status == RequestStatus.OFFERED
    assert await Offer.filter(service_request_id=stored.id, worker_id=worker.id).exists()
    assert (await _indexed(services, worker.id)).matchable is True
    assert await _pending_rows() == []
    drift = await outbox.find_drift(services.index)
    assert drift.clean, drift

    # The check_index script, run as operators run it, agrees.
    environment = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "SEARCH_BACKEND": "redis"}
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "check_index")],
        capture_output=True, text=True, timeout=120, env=environment, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no drift" in result.stdout


async def test_check_index_script_reports_drift(services, database_url, redis_url):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"])
    await services.index.remove(worker.id)
    environment = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "SEARCH_BACKEND": "redis"}

    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "check_index")],
        capture_output=True, text=True, timeout=120, env=environment, check=False,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"missing from the index: 1 worker: {worker.id}" in result.stdout


async def test_verify_records_and_applies(services):
    agencies = await make_city()
    worker = await make_worker(services, agencies["approved"], verified=False, on_duty=False)
    assert (await _indexed(services, worker.id)).verified is False

    await workers.verify_worker(services, worker.id)

    stored = await _indexed(services, worker.id)
    assert stored.verified is True
    assert (await Worker.get(id=worker.id)).status == WorkerStatus.VERIFIED
    assert await _pending_rows() == []
