"""The nearest service station of a request, from a copy of the stations kept in memory."""

from __future__ import annotations

import time

from backend.geo import haversine_m
from backend.locations import Location
from backend.models import ServiceStation

# Stations are added by the seed script or by hand, never through the API, and none is
# removed, so a copy this old at most only delays a new station.
REFRESH_S = 60.0


class StationDirectory:
    """Stations grouped by district, read again from the database when older than REFRESH_S."""

    def __init__(self, refresh_s: float = REFRESH_S):
        self._refresh_s = refresh_s
        self._by_district: dict[str, list[ServiceStation]] = {}
        self._read_at: float | None = None

    async def nearest(self, location: Location) -> ServiceStation | None:
        """Return the station of the location's district nearest to it, or None if it has none."""
        if self._read_at is None or time.monotonic() - self._read_at > self._refresh_s:
            await self._read()
        stations = self._by_district.get(location.district_code)
        if not stations:
            return None
        return min(stations, key=lambda s: haversine_m(location.lat, location.lng, s.lat, s.lng))

    async def _read(self) -> None:
        by_district: dict[str, list[ServiceStation]] = {}
        for station in await ServiceStation.all():
            by_district.setdefault(station.district_id, []).append(station)
        self._by_district = by_district
        self._read_at = time.monotonic()
