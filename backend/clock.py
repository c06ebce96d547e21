"""The one source of the current time, so tests can move it."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

LOCAL_TZ = ZoneInfo("Asia/Shanghai")

_frozen: datetime | None = None


def now() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    if _frozen is not None:
        return _frozen
    return datetime.now(timezone.utc)


def freeze(moment: datetime | None) -> None:
    """Pin now() to a moment (tests only); None lets the real clock run again."""
    global _frozen
    if moment is not None and moment.tzinfo is None:
        raise ValueError("freeze() needs a timezone-aware datetime")
    _frozen = moment.astimezone(timezone.utc) if moment is not None else None


def to_local_iso(moment: datetime | None) -> str | None:
    """Render a stored UTC time in Asia/Shanghai with its offset, as residents read it."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(LOCAL_TZ).isoformat(timespec="seconds")
