"""The matching benchmark on two small cities: our index path offers what the naive scan offers.

The script runs in a subprocess on its own SQLite file. In-process, its Tortoise set-up for
SQLite would leave the models bound to SQLite's SQL dialect, which breaks every later test of
a PostgreSQL session. It shares the session's Redis server but writes its indexes under its
own key prefix and deletes them at the end, so the test checks that every other key is left
as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from backend.redis_client import open_redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = PROJECT_ROOT / "scripts" / "bench_match"
BENCH_PREFIX = "linli:{bench}:"
MAX_KEYS_LISTED = 10_000
TIMEOUT_S = 300


async def _all_keys(client) -> set[str]:
    keys = set()
    async for key in client.scan_iter(match="*", count=1000):
        keys.add(key)
        assert len(keys) <= MAX_KEYS_LISTED, "the test Redis holds more keys than expected"
    return keys


async def test_bench_match_small_cities_agree(redis_url, tmp_path):
    output_file = PROJECT_ROOT / "docs" / "benchmarks.md"
    page_before = output_file.read_text(encoding="utf-8") if output_file.exists() else None
    client = open_redis(redis_url)
    try:
        keys_before = await _all_keys(client)
        argv = [
            "--workers", "300",
            "--requests", "30",
            "--synthetic-workers", "3000",
            "--box-km", "4",
            "--synthetic-requests", "30",
            "--no-write",
            "--redis-url", redis_url,
            "--database-url", f"sqlite://{tmp_path / 'bench.sqlite3'}",
        ]

        result = subprocess.run(
            [sys.executable, str(BENCH_SCRIPT), *argv],
            capture_output=True, text=True, timeout=TIMEOUT_S, env=dict(os.environ), check=False,
        )

        keys_after = await _all_keys(client)
    finally:
        await client.aclose()

    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert "equivalence check (seeded Xiamen): 0 mismatches," in output, output
    assert "equivalence check (synthetic box): 0 mismatches," in output, output
    assert output.count("in 30 requests") == 2
    assert "### synthetic box: 3,000 workers" in output
    assert "plain GEOSEARCH, one GEO set of all 3,000 workers" in output
    assert not any(key.startswith(BENCH_PREFIX) for key in keys_after)
    assert keys_after == keys_before
    page_after = output_file.read_text(encoding="utf-8") if output_file.exists() else None
    assert page_after == page_before
