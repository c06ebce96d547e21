"""Geometry helpers and the Xiamen district boundaries."""

from __future__ import annotations

import math
import random

import pytest

from backend import divisions
from backend.geo import haversine_m, is_valid_coordinate, wgs84_to_gcj02

# Raw GPS (WGS-84) position in central 思明区.
XIAMEN_WGS84 = (24.4539, 118.0823)
SEA_SOUTH_OF_XIAMEN = (24.30, 118.20)
BEIJING = (39.9042, 116.4074)


def test_gcj02_matches_reference_value():
    # Tiananmen input and output as published in the coordtransform family of libraries.
    lat, lng = wgs84_to_gcj02(39.915, 116.404)

    assert lat == pytest.approx(39.91640428150164, abs=1e-9)
    assert lng == pytest.approx(116.41024449916938, abs=1e-9)


def test_gcj02_shifts_xiamen_southeast():
    lat, lng = wgs84_to_gcj02(*XIAMEN_WGS84)
    shift_m = haversine_m(*XIAMEN_WGS84, lat, lng)

    # In Xiamen GCJ-02 lies south and east of WGS-84, by a few hundred metres.
    assert lat < XIAMEN_WGS84[0]
    assert lng > XIAMEN_WGS84[1]
    assert 300 < shift_m < 800


def test_gcj02_leaves_points_outside_china():
    paris = (48.8566, 2.3522)
    southern_hemisphere = (-33.87, 151.21)

    assert wgs84_to_gcj02(*paris) == paris
    assert wgs84_to_gcj02(*southern_hemisphere) == southern_hemisphere


def test_haversine_known_distances():
    one_degree_of_latitude = haversine_m(0.0, 0.0, 1.0, 0.0)
    quarter_equator = haversine_m(0.0, 0.0, 0.0, 90.0)
    # 思明区 and 翔安区 representative points, about 25 km apart.
    siming_to_xiang_an = haversine_m(24.462059, 118.087828, 24.637479, 118.242811)

    assert one_degree_of_latitude == pytest.approx(111_195.08, abs=0.1)
    assert quarter_equator == pytest.approx(math.pi / 2 * 6_371_008.8, rel=1e-12)
    assert 24_000 < siming_to_xiang_an < 26_000
    assert haversine_m(24.5, 118.1, 24.5, 118.1) == 0.0


def test_haversine_is_symmetric():
    there = haversine_m(24.462059, 118.087828, 24.729333, 118.150455)
    back = haversine_m(24.729333, 118.150455, 24.462059, 118.087828)

    assert there == pytest.approx(back, rel=1e-12)


@pytest.mark.parametrize(
    ("lat", "lng", "expected"),
    [
        (24.46, 118.09, True),
        (90, -180, True),
        (-90.0, 180.0, True),
        (90.0001, 0.0, False),
        (0.0, -180.5, False),
        (float("nan"), 118.0, False),
        (24.0, float("inf"), False),
        (True, 118.0, False),
        (24.0, False, False),
        ("24.46", 118.09, False),
        (None, 118.09, False),
        (10**400, 118.0, False),
    ],
)
def test_is_valid_coordinate_cases(lat, lng, expected):
    assert is_valid_coordinate(lat, lng) is expected


def test_districts_load_six():
    names = {info.code: info.name for info in divisions.districts()}

    assert names == {
        "350203": "思明区",
        "350205": "海沧区",
        "350206": "湖里区",
        "350211": "集美区",
        "350212": "同安区",
        "350213": "翔安区",
    }


def test_streets_counts_and_kinds():
    all_streets = divisions.streets()
    stationed = divisions.streets(include_special_units=False)
    siming = divisions.streets("350203")

    assert len(all_streets) == 54
    assert len(stationed) == 45
    assert {street.kind for street in stationed} == {"街道", "镇"}
    assert all(street.is_special_unit for street in all_streets if street not in stationed)
    assert len(siming) == 10
    assert all(street.district_code == "350203" for street in siming)
    assert divisions.streets("999999") == []


def test_district_at_each_center():
    for info in divisions.districts():
        assert divisions.district_at(info.center_lat, info.center_lng) == info.code, info.name


@pytest.mark.parametrize(
    "point",
    [SEA_SOUTH_OF_XIAMEN, BEIJING, (24.55, 117.70), (0.0, 0.0), (float("nan"), 118.1)],
)
def test_district_at_outside_returns_none(point):
    assert divisions.district_at(*point) is None


def test_district_at_island_polygon():
    # 鼓浪屿 is its own polygon in 思明区's MultiPolygon, apart from Xiamen Island.
    gulangyu = (24.4465, 118.0670)

    assert divisions.district_at(*gulangyu) == "350203"


def test_random_points_inside_district():
    rng = random.Random(7)

    for info in divisions.districts():
        for _ in range(200):
            lat, lng = divisions.random_point_in_district(info.code, rng)
            assert divisions.district_at(lat, lng) == info.code


def test_random_points_are_deterministic():
    first = [divisions.random_point_in_district("350212", random.Random(42)) for _ in range(3)]
    second = [divisions.random_point_in_district("350212", random.Random(42)) for _ in range(3)]
    other_seed = divisions.random_point_in_district("350212", random.Random(43))

    assert first == second
    assert other_seed != first[0]


def test_random_point_unknown_district():
    with pytest.raises(KeyError):
        divisions.random_point_in_district("110101", random.Random(1))


def test_polygon_hole_excludes_point():
    # A 4x4 square with a 2x2 hole, in the (lng, lat) order the module uses.
    outer = ((0.0, 0.0), (4.0, 0.0), (4.0, 4.0), (0.0, 4.0))
    hole = ((1.0, 1.0), (3.0, 1.0), (3.0, 3.0), (1.0, 3.0))
    polygon = (outer, hole)

    assert divisions._polygon_contains(polygon, 0.5, 0.5)
    assert not divisions._polygon_contains(polygon, 2.0, 2.0)
    assert not divisions._polygon_contains(polygon, 5.0, 2.0)
