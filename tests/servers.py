"""The API in its own processes on loopback ports, sharing the test database and Redis."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from backend.settings import PROJECT_ROOT, Settings

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
HEALTH_POLL_INTERVAL_S = 0.2


@dataclasses.dataclass
class ApiProcess:
    process: subprocess.Popen
    base_url: str
    # What the process wrote to stdout and stderr, or None while it runs.
    output: str | None = None


def free_port() -> int:
    # NOTE: the port is free when probed, but another process may bind it before the server does.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(settings: Settings, extra_env: dict[str, str]) -> ApiProcess:
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "WECHAT_API_BASE_URL": settings.wechat_api_base_url,
        "WECHAT_SECRET": settings.wechat_secret,
        **extra_env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "miniprogram_api"], cwd=PROJECT_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return ApiProcess(process=process, base_url=f"http://127.0.0.1:{port}")


def _wait_healthy(server: ApiProcess) -> bool:
    """Poll /healthz until it returns 200. Return False when the process exits or START_TIMEOUT_S passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_INTERVAL_S)
    return False


def _stop(servers: list[ApiProcess]) -> None:
    """Terminate every server that is still running, then collect each one's output."""
    running = [server for server in servers if server.output is None]
    for server in running:
        server.process.terminate()
    for server in running:
        try:
            server.output, _ = server.process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.output, _ = server.process.communicate()


@contextlib.contextmanager
def api_processes(settings: Settings, count: int = 1, **extra_env: str) -> Iterator[list[ApiProcess]]:
    """Start `count` API processes with `extra_env` added to their environment, and stop them on exit.

    All processes start before the first health check, so they start in parallel. When one does
    not become healthy, all are stopped and the test fails with that process's output.
    """
    servers = [_start(settings, extra_env) for _ in range(count)]
    try:
        for server in servers:
            if not _wait_healthy(server):
                _stop(servers)
                pytest.fail(
                    f"API server at {server.base_url} exited or did not pass /healthz within "
                    f"{START_TIMEOUT_S:.0f} s:\n{server.output}"
                )
        yield servers
    finally:
        _stop(servers)
