"""The matching benchmark on a small city: the index path offers what the naive scan offers.

The script runs in-process on its own SQLite file, in a Tortoise context of its own, so the
session's database stays open. It shares the session's Redis server but writes its index under
its own key prefix and deletes it at the end, so the test checks that every other key is left
as it was.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from backend.redis_client import open_redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = PROJECT_ROOT / "scripts" / "bench_match"
MAX_KEYS_LISTED = 10_000


def _load_bench_module():
    loader = importlib.machinery.SourceFileLoader("linli_bench_match_script", str(BENCH_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the file executes.
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


bench_match = _load_bench_module()


async def _all_keys(client) -> set[str]:
    keys = set()
    async for key in client.scan_iter(match="*", count=1000):
        keys.add(key)
        assert len(keys) <= MAX_KEYS_LISTED, "the test Redis holds more keys than expected"
    return keys


async def test_bench_match_small_city_agrees(redis_url, tmp_path, capsys):
    output_file = PROJECT_ROOT / "docs" / "benchmarks.md"
    page_before = output_file.read_text(encoding="utf-8") if output_file.exists() else None
    client = open_redis(redis_url)
    try:
        keys_before = await _all_keys(client)
        argv = [
            "--workers", "300",
            "--requests", "30",
            "--no-write",
            "--redis-url", redis_url,
            "--database-url", f"sqlite://{tmp_path / 'bench.sqlite3'}",
        ]

        exit_status = await bench_match.main(argv)

        output = capsys.readouterr().out
        keys_after = await _all_keys(client)
    finally:
        await client.aclose()

    assert "equivalence check: 0 mismatches," in output, output
    assert "in 30 requests" in output
    assert exit_status == 0
    assert not any(key.startswith(bench_match.BENCH_PREFIX) for key in keys_after)
    assert keys_after == keys_before
    page_after = output_file.read_text(encoding="utf-8") if output_file.exists() else None
    assert page_after == page_before
