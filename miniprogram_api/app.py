"""Build the Sanic application; `create_app` is also the factory for the `sanic` CLI."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from sanic import Request, Sanic

from backend import accounts, scheduler, workers
from backend.context import Services
from backend.db import close_db, init_db
from backend.redis_client import open_redis
from backend.settings import Settings
from miniprogram_api import (
    routes_admin,
    routes_agencies,
    routes_content,
    routes_public,
    routes_requests,
    routes_stations,
    routes_workers,
)
from miniprogram_api.errors import EnvelopeErrorHandler
from search import build_index

log = logging.getLogger(__name__)

APP_NAME = "linli"
MAX_BODY_BYTES = 64 * 1024  # the largest body the mini-program sends is a few kilobytes
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Tag every log record with the id of the HTTP request being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


async def build_services(settings: Settings) -> Services:
    from backend.wechat import WeChatGateway

    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is unset: start through `python -m miniprogram_api`, which embeds a server")
    await init_db(settings.database_url, global_fallback=True)
    client = open_redis(settings.redis_url)
    return Services(settings=settings, redis=client, index=build_index(settings, client), wechat=WeChatGateway(settings))


def create_app(settings: Settings | None = None, services: Services | None = None) -> Sanic:
    """Create the app; with `services` given (tests), the caller owns the database and Redis."""
    settings = settings or (services.settings if services else Settings.from_env())
    # Logging is set up by the process that runs the app (miniprogram_api.__main__ or the tests).
    app = Sanic(APP_NAME, error_handler=EnvelopeErrorHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.ext.openapi.describe(
        "Linli (邻里) mini-program API",
        version="1",
        description="Neighbourhood social-work matching for Xiamen residents, workers, agencies and officers.",
    )
    app.ctx.settings = settings
    app.ctx.services = services

    for module in (routes_public, routes_workers, routes_requests, routes_agencies, routes_stations, routes_admin,
                   routes_content):
        app.blueprint(module.bp)

    @app.on_request
    async def assign_request_id(request: Request):
        incoming = request.headers.get("x-request-id", "")
        request.ctx.request_id = incoming if _REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        request_id_var.set(request.ctx.request_id)

    @app.on_response
    async def echo_request_id(request: Request, response):
        request_id = getattr(request.ctx, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id

    if services is None:

        @app.before_server_start
        async def open_resources(app: Sanic):
            app.ctx.services = await build_services(settings)
            if settings.officer_username and settings.officer_password:
                await accounts.ensure_officer(settings.officer_username, settings.officer_password)
            await workers.ensure_index(app.ctx.services)

        @app.after_server_start
        async def start_scheduler(app: Sanic):
            app.add_task(scheduler.run_forever(app.ctx.services, settings.scheduler_interval_s), name="scheduler")

        @app.before_server_stop
        async def stop_scheduler(app: Sanic):
            await app.cancel_task("scheduler", raise_exception=False)

        @app.after_server_stop
        async def close_resources(app: Sanic):
            await app.ctx.services.index.aclose()
            await app.ctx.services.redis.aclose()
            await close_db()

    return app
