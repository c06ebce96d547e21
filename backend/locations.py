"""Parsing of client locations: validation, WGS-84 to GCJ-02, and the Xiamen service area."""

from __future__ import annotations

import math
from dataclasses import dataclass

from backend import divisions
from backend.errors import OutsideServiceArea, ValidationError
from backend.geo import wgs84_to_gcj02

COORD_SYSTEMS = ("gcj02", "wgs84")


@dataclass(frozen=True)
class Location:
    lat: float  # GCJ-02
    lng: float  # GCJ-02
    district_code: str


def _read_coordinate(data: dict, name: str, limit: float, field: str) -> float:
    value = data.get(name)
    # bool is an int in Python, but true is no coordinate.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"请提供数字形式的坐标（{name}）。", field=f"{field}.{name}")
    value = float(value)
    if not math.isfinite(value) or not -limit <= value <= limit:
        raise ValidationError(f"坐标（{name}）超出有效范围，请重新定位。", field=f"{field}.{name}")
    return value


def parse_location(data: object, field: str = "location") -> Location:
    """Validate {"lat", "lng", "coord_system"?}, convert to GCJ-02 and require a Xiamen district."""
    if not isinstance(data, dict):
        raise ValidationError("请提供位置信息（lat 和 lng）。", field=field)
    lat = _read_coordinate(data, "lat", 90.0, field)
    lng = _read_coordinate(data, "lng", 180.0, field)

    coord_system = data.get("coord_system", "gcj02")
    if coord_system not in COORD_SYSTEMS:
        raise ValidationError("坐标系只支持 gcj02 或 wgs84。", field=f"{field}.coord_system")
    if coord_system == "wgs84":
        lat, lng = wgs84_to_gcj02(lat, lng)

    district_code = divisions.district_at(lat, lng)
    if district_code is None:
        raise OutsideServiceArea(field=field)
    return Location(lat=lat, lng=lng, district_code=district_code)
