"""Settings read from the environment, checked once at start."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WECHAT_API_BASE_URL = "https://api.weixin.qq.com/"
MIN_PROD_PASSWORD_LENGTH = 12
# Development only: the stand-in WeChat server accepts any secret, but WeChat's wire format
# requires one to be sent. Production refuses to start without a real WECHAT_SECRET.
DEV_WECHAT_SECRET = "linli-dev-secret"


class SettingsError(Exception):
    """A setting is missing or invalid, so the service must not start."""


def wants_wechat_standin(environ: dict[str, str]) -> bool:
    """Tell whether scripts/run should start the stand-in WeChat server for this environment.

    True only in development with WECHAT_API_BASE_URL unset. The stand-in accepts any login code,
    so with APP_ENV=prod (or any value other than dev) an unset URL means WeChat's real API.
    """
    app_env = environ.get("APP_ENV") or "dev"
    return app_env == "dev" and not environ.get("WECHAT_API_BASE_URL")


def _read_radii(environ: dict[str, str]) -> tuple[int, ...]:
    raw = environ.get("SEARCH_RADII_M") or ""
    if not raw.strip():
        legacy = environ.get("SEARCH_RADIUS_M")
        return (_read_int(environ, "SEARCH_RADIUS_M", 5000, 100, 50_000),) if legacy else (5000, 10_000, 20_000)
    try:
        radii = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise SettingsError(f"SEARCH_RADII_M must be comma-separated whole metres, got {raw!r}") from None
    if not all(100 <= r <= 100_000 for r in radii) or list(radii) != sorted(set(radii)):
        raise SettingsError(f"SEARCH_RADII_M must grow strictly, each 100 to 100000 m, got {raw!r}")
    return radii


def _read_int(environ: dict[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    app_env: str = "dev"
    database_url: str = f"sqlite://{PROJECT_ROOT / 'var' / 'linli.sqlite3'}"
    redis_url: str | None = None
    wechat_appid: str = "wx-linli-dev"
    wechat_secret: str = ""
    wechat_api_base_url: str = DEFAULT_WECHAT_API_BASE_URL
    wechat_timeout_s: float = 5.0
    officer_username: str | None = None
    officer_password: str | None = field(default=None, repr=False)
    token_ttl_s: int = 7 * 24 * 3600
    search_radii_m: tuple[int, ...] = (5000, 10_000, 20_000)
    offer_count: int = 5
    offer_ttl_s: int = 600
    checkin_radius_m: int = 500
    max_active_jobs: int = 3
    scheduler_interval_s: float = 1.0
    content_check: bool = False
    # Subscribe-message template ids, from the mini-program's console; empty: not sent.
    template_offer: str = ""  # to a worker: a new offer
    template_request_status: str = ""  # to a resident: accepted, started, completed, station queue
    template_request_cancelled: str = ""  # to the assigned worker: the resident cancelled
    search_backend: str = "redis"  # or "meilisearch"
    meili_url: str | None = None
    meili_api_key: str | None = field(default=None, repr=False)
    rate_login_per_ip_per_min: int = 30
    rate_requests_per_user_per_hour: int = 20
    rate_requests_per_ip_per_hour: int = 200

    @property
    def search_radius_m(self) -> int:
        """The first, narrowest search ring."""
        return self.search_radii_m[0]

    @property
    def is_prod(self) -> bool:
        return self.app_env == "prod"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        """Build settings from environment variables and reject unsafe production values."""
        env = dict(os.environ if environ is None else environ)

        app_env = env.get("APP_ENV", "dev") or "dev"
        if app_env not in ("dev", "prod"):
            raise SettingsError(f"APP_ENV must be 'dev' or 'prod', got {app_env!r}")

        base_url = env.get("WECHAT_API_BASE_URL") or DEFAULT_WECHAT_API_BASE_URL
        if not base_url.endswith("/"):
            base_url += "/"

        settings = cls(
            host=env.get("HOST") or "127.0.0.1",
            port=_read_int(env, "PORT", 8000, 1, 65535),
            app_env=app_env,
            database_url=env.get("DATABASE_URL") or cls.database_url,
            redis_url=env.get("REDIS_URL") or None,
            wechat_appid=env.get("WECHAT_APPID") or cls.wechat_appid,
            wechat_secret=env.get("WECHAT_SECRET") or ("" if app_env == "prod" else DEV_WECHAT_SECRET),
            wechat_api_base_url=base_url,
            wechat_timeout_s=float(_read_int(env, "WECHAT_TIMEOUT_S", 5, 1, 60)),
            officer_username=env.get("OFFICER_USERNAME") or None,
            officer_password=env.get("OFFICER_PASSWORD") or None,
            search_radii_m=_read_radii(env),
            offer_count=_read_int(env, "OFFER_COUNT", 5, 1, 50),
            offer_ttl_s=_read_int(env, "OFFER_TTL_S", 600, 1, 24 * 3600),
            checkin_radius_m=_read_int(env, "CHECKIN_RADIUS_M", 500, 10, 10_000),
            max_active_jobs=_read_int(env, "MAX_ACTIVE_JOBS", 3, 1, 50),
            scheduler_interval_s=_read_int(env, "SCHEDULER_INTERVAL_MS", 1000, 50, 60_000) / 1000,
            content_check=env.get("WECHAT_CONTENT_CHECK", "0") == "1",
            template_offer=env.get("WECHAT_TEMPLATE_OFFER", ""),
            template_request_status=env.get("WECHAT_TEMPLATE_REQUEST_STATUS", ""),
            template_request_cancelled=env.get("WECHAT_TEMPLATE_REQUEST_CANCELLED", ""),
            search_backend=env.get("SEARCH_BACKEND") or "redis",
            meili_url=env.get("MEILI_URL") or None,
            meili_api_key=env.get("MEILI_API_KEY") or None,
            rate_login_per_ip_per_min=_read_int(env, "RATE_LOGIN_PER_IP_PER_MIN", 30, 1, 100_000),
            rate_requests_per_user_per_hour=_read_int(env, "RATE_REQUESTS_PER_USER_PER_HOUR", 20, 1, 100_000),
            rate_requests_per_ip_per_hour=_read_int(env, "RATE_REQUESTS_PER_IP_PER_HOUR", 200, 1, 1_000_000),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise SettingsError on inconsistent values, and when production has missing or weak secrets."""
        if self.search_backend not in ("redis", "meilisearch"):
            raise SettingsError(f"SEARCH_BACKEND must be 'redis' or 'meilisearch', got {self.search_backend!r}")
        if self.search_backend == "meilisearch" and not self.meili_url:
            raise SettingsError("SEARCH_BACKEND=meilisearch needs MEILI_URL")
        if not self.is_prod:
            return
        if not self.wechat_secret:
            raise SettingsError("APP_ENV=prod needs WECHAT_SECRET (the mini-program's AppSecret)")
        if not self.wechat_appid or self.wechat_appid == Settings.wechat_appid:
            raise SettingsError("APP_ENV=prod needs WECHAT_APPID (the mini-program's AppID)")
        if self.officer_username and len(self.officer_password or "") < MIN_PROD_PASSWORD_LENGTH:
            raise SettingsError(
                f"APP_ENV=prod needs OFFICER_PASSWORD of at least {MIN_PROD_PASSWORD_LENGTH} characters"
            )
