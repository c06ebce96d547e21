"""scripts/run never starts the stand-in WeChat server in production, because the stand-in accepts
any login code. Nothing here contacts a host other than loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from backend.settings import DEFAULT_WECHAT_API_BASE_URL, PROJECT_ROOT, Settings, wants_wechat_standin

RUN_SCRIPT = PROJECT_ROOT / "scripts" / "run"
STANDIN_SCRIPT = PROJECT_ROOT / "scripts" / "wechat_standin.py"
SCRIPT_TIMEOUT_S = 20
PROD_ENV = {"APP_ENV": "prod", "WECHAT_APPID": "wx-linli-prod-test", "WECHAT_SECRET": "prod-test-secret"}


def _clean_environ(**extra: str) -> dict[str, str]:
    """Return this process's environment without the app's settings, plus `extra`."""
    names = ("APP_ENV", "WECHAT_API_BASE_URL", "WECHAT_APPID", "WECHAT_SECRET", "OFFICER_USERNAME",
             "OFFICER_PASSWORD", "DATABASE_URL", "REDIS_URL", "HOST", "PORT")
    environ = {name: value for name, value in os.environ.items() if name not in names}
    return {**environ, **extra}


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, True),
        ({"APP_ENV": "dev"}, True),
        ({"APP_ENV": ""}, True),
        ({"APP_ENV": "dev", "WECHAT_API_BASE_URL": "http://127.0.0.1:8001/"}, False),
        ({"APP_ENV": "prod"}, False),
        ({"APP_ENV": "prod", "WECHAT_API_BASE_URL": ""}, False),
        ({"APP_ENV": "production"}, False),
    ],
)
def test_standin_wanted_only_in_dev(environ, wanted):
    assert wants_wechat_standin(environ) is wanted


def test_prod_unset_url_is_real_wechat():
    settings = Settings.from_env(PROD_ENV)

    assert settings.wechat_api_base_url == DEFAULT_WECHAT_API_BASE_URL


def test_run_in_prod_starts_no_standin(tmp_path):
    # The API port is taken, so scripts/run stops right after the stand-in decision and the
    # settings check, before it seeds or starts anything else.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = _clean_environ(**PROD_ENV, HOST="127.0.0.1", PORT=str(port),
                                 DATABASE_URL=f"sqlite://{tmp_path / 'run.sqlite3'}")
        result = subprocess.run([sys.executable, str(RUN_SCRIPT)], env=environ, cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)

    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "is in use" in result.stderr, output
    assert "stand-in" not in result.stderr, output


def test_standin_refuses_prod():
    environ = _clean_environ(APP_ENV="prod")

    result = subprocess.run([sys.executable, str(STANDIN_SCRIPT), "--host", "127.0.0.1", "--port", "0"],
                            env=environ, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=SCRIPT_TIMEOUT_S)

    assert result.returncode == 2, result.stderr
    assert "APP_ENV=prod" in result.stderr
