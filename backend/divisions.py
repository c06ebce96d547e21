"""Xiamen's districts and street-level units, read once from the files in backend/data.

District boundaries are MultiPolygons in GCJ-02. Rings keep the GeoJSON order of
(lng, lat) pairs, so x is longitude and y is latitude in the geometry helpers.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DIVISIONS_CSV = DATA_DIR / "xiamen_divisions.csv"
DISTRICTS_GEOJSON = DATA_DIR / "xiamen_districts.geojson"

# Street-level kinds in the CSV. Real streets (街道) and towns (镇) get a service station.
# Special units such as farms and bonded zones have kind "其他(特殊区域)".
SUBDISTRICT_KIND = "街道"
TOWN_KIND = "镇"
SPECIAL_UNIT_KIND_PREFIX = "其他"

# Rejection sampling stops after this many draws. About 40% of the draws land inside
# even for 海沧区, the district that fills the least of its bounding box, so reaching
# the limit means a broken polygon.
MAX_SAMPLING_ATTEMPTS = 100_000

Point = tuple[float, float]  # (lng, lat), GeoJSON order
Ring = tuple[Point, ...]
Polygon = tuple[Ring, ...]  # first ring is the outer boundary, the others are holes
BBox = tuple[float, float, float, float]  # (min_lng, min_lat, max_lng, max_lat)


@dataclass(frozen=True)
class DistrictInfo:
    """A district (区) with its representative point and boundary."""

    code: str
    name: str
    center_lat: float  # AMap's representative point, inside the boundary for all 6 districts
    center_lng: float
    polygons: tuple[Polygon, ...]

    @property
    def short_name(self) -> str:
        """Name without the trailing 区, as used in organisation names (思明区 -> 思明)."""
        return self.name.removesuffix("区")


@dataclass(frozen=True)
class StreetInfo:
    """A street-level unit (乡级): a street (街道), a town (镇) or a special unit."""

    code: str
    name: str
    kind: str
    district_code: str

    @property
    def is_special_unit(self) -> bool:
        """Whether this is a special unit (farm, forest farm, bonded zone), which gets no service station."""
        return self.kind.startswith(SPECIAL_UNIT_KIND_PREFIX)


@dataclass(frozen=True)
class _Shape:
    """A district's polygons with bounding boxes precomputed for the point-in-polygon test."""

    code: str
    bbox: BBox
    polygons: tuple[tuple[BBox, Polygon], ...]


def _ring_bbox(ring: Ring) -> BBox:
    lngs = [p[0] for p in ring]
    lats = [p[1] for p in ring]
    return min(lngs), min(lats), max(lngs), max(lats)


def _merge_bboxes(boxes: list[BBox]) -> BBox:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _bbox_contains(bbox: BBox, lng: float, lat: float) -> bool:
    return bbox[0] <= lng <= bbox[2] and bbox[1] <= lat <= bbox[3]


def _ring_crossings(ring: Ring, lng: float, lat: float) -> int:
    """Count the ring's edges that a ray from the point towards +lng crosses."""
    crossings = 0
    x_prev, y_prev = ring[-1]
    for x, y in ring:
        # The half-open test (one end above, one not) counts a vertex on the ray once.
        if (y > lat) != (y_prev > lat):
            x_cross = x_prev + (lat - y_prev) * (x - x_prev) / (y - y_prev)
            if lng < x_cross:
                crossings += 1
        x_prev, y_prev = x, y
    return crossings


def _polygon_contains(polygon: Polygon, lng: float, lat: float) -> bool:
    # Even-odd rule over all rings, so a point inside a hole counts as outside.
    crossings = sum(_ring_crossings(ring, lng, lat) for ring in polygon)
    return crossings % 2 == 1


def _shape_contains(shape: _Shape, lng: float, lat: float) -> bool:
    if not _bbox_contains(shape.bbox, lng, lat):
        return False
    for bbox, polygon in shape.polygons:
        if _bbox_contains(bbox, lng, lat) and _polygon_contains(polygon, lng, lat):
            return True
    return False


def _parse_polygons(geometry: dict) -> tuple[Polygon, ...]:
    if geometry["type"] == "Polygon":
        raw_polygons = [geometry["coordinates"]]
    elif geometry["type"] == "MultiPolygon":
        raw_polygons = geometry["coordinates"]
    else:
        raise ValueError(f"unsupported geometry type {geometry['type']!r} in {DISTRICTS_GEOJSON}")

    polygons = []
    for raw_polygon in raw_polygons:
        rings = []
        for raw_ring in raw_polygon:
            ring = tuple((float(p[0]), float(p[1])) for p in raw_ring)
            # GeoJSON repeats the first point at the end. The crossing count needs no closing point.
            if len(ring) > 1 and ring[0] == ring[-1]:
                ring = ring[:-1]
            rings.append(ring)
        polygons.append(tuple(rings))
    return tuple(polygons)


@cache
def _csv_rows() -> tuple[dict[str, str], ...]:
    with DIVISIONS_CSV.open(encoding="utf-8", newline="") as handle:
        return tuple(csv.DictReader(handle))


@cache
def _districts() -> tuple[DistrictInfo, ...]:
    with DISTRICTS_GEOJSON.open(encoding="utf-8") as handle:
        collection = json.load(handle)
    polygons_by_code = {
        str(feature["properties"]["adcode"]): _parse_polygons(feature["geometry"])
        for feature in collection["features"]
    }

    result = []
    for row in _csv_rows():
        if row["level"] != "district":
            continue
        code = row["code"]
        if code not in polygons_by_code:
            raise ValueError(f"district {code} {row['name']} has no boundary in {DISTRICTS_GEOJSON}")
        result.append(
            DistrictInfo(
                code=code,
                name=row["name"],
                center_lat=float(row["lat"]),
                center_lng=float(row["lng"]),
                polygons=polygons_by_code[code],
            )
        )
    return tuple(sorted(result, key=lambda info: info.code))


@cache
def _streets() -> tuple[StreetInfo, ...]:
    rows = sorted((row for row in _csv_rows() if row["level"] == "street"), key=lambda row: row["code"])
    return tuple(
        StreetInfo(code=row["code"], name=row["name"], kind=row["kind"], district_code=row["parent_code"])
        for row in rows
    )


@cache
def _shapes() -> tuple[_Shape, ...]:
    shapes = []
    for district in _districts():
        polygon_boxes = tuple((_ring_bbox(polygon[0]), polygon) for polygon in district.polygons)
        bbox = _merge_bboxes([box for box, _ in polygon_boxes])
        shapes.append(_Shape(code=district.code, bbox=bbox, polygons=polygon_boxes))
    return tuple(shapes)


@cache
def _city_bbox() -> BBox:
    return _merge_bboxes([shape.bbox for shape in _shapes()])


def districts() -> list[DistrictInfo]:
    """Return the 6 districts in code order."""
    return list(_districts())


def district(code: str) -> DistrictInfo:
    """Return one district, or raise KeyError for an unknown code."""
    for info in _districts():
        if info.code == code:
            return info
    raise KeyError(f"unknown district code {code!r}")


def streets(district_code: str | None = None, *, include_special_units: bool = True) -> list[StreetInfo]:
    """Return the street-level units in code order, optionally of one district only.

    With include_special_units=False only streets (街道) and towns (镇) remain.
    """
    return [
        street
        for street in _streets()
        if (district_code is None or street.district_code == district_code)
        and (include_special_units or not street.is_special_unit)
    ]


def district_at(lat: float, lng: float) -> str | None:
    """Return the code of the district containing a GCJ-02 point, or None outside Xiamen.

    Where two simplified boundaries overlap, the district with the lower code wins, so
    the result for a given point never changes.
    """
    if not (math.isfinite(lat) and math.isfinite(lng)):
        return None
    if not _bbox_contains(_city_bbox(), lng, lat):
        return None
    for shape in _shapes():
        if _shape_contains(shape, lng, lat):
            return shape.code
    return None


def random_point_in_district(code: str, rng: random.Random) -> tuple[float, float]:
    """Draw a random GCJ-02 point (lat, lng) inside a district by rejection sampling.

    Points are uniform in degrees of latitude and longitude, which at Xiamen's size is
    close to uniform in area. A point is kept only when district_at() returns the same
    district, so the two functions agree. The result depends only on the code and the
    state of rng. Raises KeyError for an unknown code.
    """
    shape = next((s for s in _shapes() if s.code == code), None)
    if shape is None:
        raise KeyError(f"unknown district code {code!r}")

    min_lng, min_lat, max_lng, max_lat = shape.bbox
    for _ in range(MAX_SAMPLING_ATTEMPTS):
        lng = rng.uniform(min_lng, max_lng)
        lat = rng.uniform(min_lat, max_lat)
        if _shape_contains(shape, lng, lat) and district_at(lat, lng) == code:
            return lat, lng
    raise RuntimeError(f"no point inside district {code} after {MAX_SAMPLING_ATTEMPTS} draws")
