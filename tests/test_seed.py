"""The seed script: row counts, determinism, placement and the --if-empty and --reset modes.

In-process runs use the shared test database and call seed() directly. Runs of the whole
command go through a subprocess with their own SQLite file, because main() opens and
closes the Tortoise connections, which would cut off the session's database fixture.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from backend import clock, divisions
from backend.catalog import CATEGORIES_BY_CODE, min_rank
from backend.models import (
    CERTIFICATE_RANKS,
    Agency,
    AgencyStatus,
    CreditEvent,
    District,
    ServiceStation,
    User,
    Worker,
    WorkerStatus,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SEED_SCRIPT = PROJECT_ROOT / "scripts" / "seed"
SMALL_CITY = ["--workers", "200", "--agencies", "10"]
FROZEN_AT = datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc)


def _load_seed_module():
    loader = importlib.machinery.SourceFileLoader("linli_seed_script", str(SEED_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the file executes.
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


seed_script = _load_seed_module()


@pytest.fixture
async def seeded_db(database):
    """Seed the small city into the shared database, replacing whatever rows it contains."""
    clock.freeze(FROZEN_AT)
    summary = await seed_script.seed(seed_script.parse_args([*SMALL_CITY, "--reset"]))
    yield summary
    clock.freeze(None)


async def _worker_rows() -> list[dict]:
    """Return every worker row with ids replaced by stable keys, ordered by certificate number."""
    agency_names = dict(await Agency.all().values_list("id", "name"))
    openids = dict(await User.all().values_list("id", "openid"))

    rows = []
    for row in await Worker.all().order_by("certificate_no").values():
        row.pop("id")
        row["agency"] = agency_names[row.pop("agency_id")]
        row["openid"] = openids[row.pop("user_id")]
        rows.append(row)
    return rows


def _run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SEED_SCRIPT), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _count_rows(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]


async def test_seed_row_counts(seeded_db):
    assert await District.all().count() == 6
    assert await ServiceStation.all().count() == 45
    assert await Agency.all().count() == 10
    assert await CreditEvent.all().count() == 10
    assert await Worker.all().count() == 200
    assert await User.filter(openid__startswith="seed-").count() == 200

    assert sum(seeded_db.workers.values()) == 200
    assert sum(seeded_db.agencies.values()) == 10
    assert sum(seeded_db.stations.values()) == 45
    assert seeded_db.skipped is False


async def test_seed_stations_skip_special_units(seeded_db):
    stations = await ServiceStation.all()
    street_codes = {station.street_code for station in stations}
    expected = {street.code for street in divisions.streets(include_special_units=False)}

    assert street_codes == expected
    for station in stations:
        assert station.name == f"{station.street_name}社会工作服务站"
        assert divisions.district_at(station.lat, station.lng) == station.district_id, station.name


async def test_seed_agencies_and_credit(seeded_db):
    agencies = await Agency.all()
    events = await CreditEvent.all()

    assert len({agency.name for agency in agencies}) == len(agencies)
    assert any(agency.status is AgencyStatus.APPROVED for agency in agencies)
    for agency in agencies:
        assert agency.name.startswith("厦门市")
        assert agency.name.endswith("社会工作服务中心")
        assert agency.credit_score == 75.0
    assert {event.agency_id for event in events} == {agency.id for agency in agencies}
    for event in events:
        assert event.reason_code == "initial"
        assert event.score == 75.0
        assert event.components == {"ratings": 75.0}
        assert event.at == FROZEN_AT


async def test_seed_workers_are_consistent(seeded_db):
    approved_agencies = {
        agency.id: agency.district_id for agency in await Agency.filter(status=AgencyStatus.APPROVED)
    }
    workers = await Worker.all().prefetch_related("user")

    assert len({worker.certificate_no for worker in workers}) == len(workers)
    for worker in workers:
        label = worker.certificate_no
        assert worker.agency_id in approved_agencies, label
        assert worker.district_id == approved_agencies[worker.agency_id], label
        assert divisions.district_at(worker.lat, worker.lng) == worker.district_id, label
        assert worker.user.roles == ["resident", "worker"], label
        assert worker.user.openid.startswith("seed-"), label
        assert worker.certificate_no.startswith("XM2024"), label
        assert 1 <= len(worker.categories) <= 3, label
        assert len(set(worker.categories)) == len(worker.categories), label
        for code in worker.categories:
            assert code in CATEGORIES_BY_CODE, label
            assert min_rank(code) <= CERTIFICATE_RANKS[worker.certificate_level.value], label
        assert 3000 <= worker.service_radius_m <= 10_000, label
        assert worker.rating_sum == 0, label
        assert worker.rating_count == 0, label
        if worker.status is WorkerStatus.VERIFIED:
            assert worker.verified_at == FROZEN_AT, label
        else:
            assert worker.status is WorkerStatus.PENDING, label
            assert worker.verified_at is None, label
            assert worker.on_duty is False, label


async def test_seed_worker_proportions(seeded_db):
    workers = await Worker.all()
    verified = [worker for worker in workers if worker.status is WorkerStatus.VERIFIED]
    on_duty = [worker for worker in verified if worker.on_duty]
    assistants = [worker for worker in workers if worker.certificate_level.value == "assistant"]

    # Each bound is at least 4 standard deviations from the target share for these sample sizes.
    assert 0.82 <= len(verified) / len(workers) <= 0.99
    assert 0.45 <= len(on_duty) / len(verified) <= 0.75
    assert 0.50 <= len(assistants) / len(workers) <= 0.80


async def test_seed_same_seed_same_rows(database):
    clock.freeze(FROZEN_AT)
    try:
        await seed_script.seed(seed_script.parse_args([*SMALL_CITY, "--reset", "--seed", "11"]))
        first = await _worker_rows()
        await seed_script.seed(seed_script.parse_args([*SMALL_CITY, "--reset", "--seed", "11"]))
        second = await _worker_rows()
        await seed_script.seed(seed_script.parse_args([*SMALL_CITY, "--reset", "--seed", "12"]))
        other_seed = await _worker_rows()
    finally:
        clock.freeze(None)

    assert len(first) == 200
    assert first == second
    assert first != other_seed


async def test_seed_without_reset_rejects_full_database(seeded_db):
    with pytest.raises(seed_script.DatabaseNotEmpty):
        await seed_script.seed(seed_script.parse_args(SMALL_CITY))

    assert await Worker.all().count() == 200


async def test_seed_if_empty_skips(seeded_db):
    summary = await seed_script.seed(seed_script.parse_args([*SMALL_CITY, "--if-empty"]))

    assert summary.skipped is True
    assert await Worker.all().count() == 200
    assert await Agency.all().count() == 10


def test_command_if_empty_and_reset(tmp_path):
    path = tmp_path / "x.sqlite3"
    url = f"sqlite://{path}"

    first = _run_command("--database-url", url, *SMALL_CITY)
    assert first.returncode == 0, first.stderr
    assert "350203 思明区" in first.stdout
    assert _count_rows(path, "workers") == 200

    skipped = _run_command("--database-url", url, "--workers", "50", "--agencies", "3", "--if-empty")
    assert skipped.returncode == 0, skipped.stderr
    assert "seed skipped" in skipped.stdout
    assert _count_rows(path, "workers") == 200
    assert _count_rows(path, "agencies") == 10

    rejected = _run_command("--database-url", url, *SMALL_CITY)
    assert rejected.returncode == 1
    assert "--reset" in rejected.stderr
    assert _count_rows(path, "workers") == 200

    reset = _run_command("--database-url", url, "--workers", "50", "--agencies", "3", "--reset")
    assert reset.returncode == 0, reset.stderr
    assert _count_rows(path, "workers") == 50
    assert _count_rows(path, "agencies") == 3
    assert _count_rows(path, "users") == 50
    assert _count_rows(path, "districts") == 6


def test_command_help_mentions_random_placement():
    result = _run_command("--help")

    assert result.returncode == 0
    assert "not public" in result.stdout
    assert "random points inside the" in result.stdout
