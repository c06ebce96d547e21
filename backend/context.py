"""The long-lived resources every service function needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as redis

from backend.settings import Settings
from backend.stations import StationDirectory
from search.base import WorkerIndex


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    index: WorkerIndex
    wechat: object  # backend.wechat.WeChatGateway; typed loosely so tests may pass a stand-in
    stations: StationDirectory = field(default_factory=StationDirectory)
