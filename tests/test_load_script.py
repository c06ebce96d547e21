"""scripts/load on a small city: a short run on SQLite and the session's Redis passes every check.

The script starts its own API processes and stand-in WeChat server on loopback, seeds its own
SQLite file and rebuilds the worker index in the session's Redis before it starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

from backend.settings import PROJECT_ROOT

LOAD_SCRIPT = PROJECT_ROOT / "scripts" / "load"
# The run takes about 13 s on 2 AMD EPYC vCPUs: set-up, two server starts, 3 race rounds, 5 s of load.
RUN_TIMEOUT_S = 300
EXPECTED_CHECKS = (
    "one assigned worker per request",
    "request.worker_id agrees with its accepted offer",
    "no worker holds jobs with overlapping windows",
    "no worker holds more than MAX_ACTIVE_JOBS=3",
    "every request is in a live or final state",
    "no request stuck in matching",
    "no open offer outlived its ring",
    "open offers only on an offered request's current ring",
    "race rounds: exactly one winner",
    "no 5xx responses and no transport errors",
    "no call rate limited (429)",
    "no call rejected as invalid (400, 422)",
    "server log has no tracebacks",
)


async def test_load_script_short_run_passes(services, redis_url, tmp_path):
    # The services fixture flushes the session's Redis, so no scheduler lease or index of an
    # earlier test is left in it.
    report_path = tmp_path / "report.json"
    argv = [
        sys.executable, str(LOAD_SCRIPT),
        "--duration", "5",
        "--residents", "5",
        "--workers", "10",
        "--concurrency", "16",
        "--poll-interval", "0.5",
        "--race-rounds", "3",
        "--race-workers", "10",
        "--seed-workers", "200",
        "--offer-ttl", "2",
        "--scheduler-interval-ms", "200",
        "--database-url", f"sqlite://{tmp_path / 'load.sqlite3'}",
        "--redis-url", redis_url,
        "--log-dir", str(tmp_path / "logs"),
        "--report-json", str(report_path),
    ]
    result = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"

    assert result.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["passed"] is True, output
    checks = {check["name"]: check for check in report["checks"]}
    for name in EXPECTED_CHECKS:
        assert name in checks, f"check {name!r} missing from the report"
        assert checks[name]["passed"], checks[name]
    assert "PASS  race rounds: exactly one winner" in result.stdout

    endpoints = report["endpoints"]
    for name in ("create", "offers poll", "accept", "start", "complete", "read"):
        assert name in endpoints, f"no {name} calls: {endpoints}"
    assert endpoints["create"]["outcomes"].get("201", 0) > 0, endpoints["create"]
    for name in ("accept", "start", "complete"):
        assert endpoints[name]["outcomes"].get("200", 0) > 0, endpoints[name]
