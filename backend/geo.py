"""Distance, coordinate validation and WGS-84 to GCJ-02 conversion, without any framework.

Latitudes and longitudes are decimal degrees. Distances are metres.
"""

from __future__ import annotations

import math

# Mean Earth radius (IUGG), in metres. Treating the Earth as a sphere errs by at most
# about 0.5%, which is ample for matching distances of a few kilometres.
EARTH_RADIUS_M = 6_371_008.8

# GCJ-02 is defined on the Krasovsky 1940 ellipsoid: semi-major axis in metres and
# first eccentricity squared.
KRASOVSKY_A = 6_378_245.0
KRASOVSKY_EE = 0.00669342162296594323

# The rectangle inside which GCJ-02 applies an offset, as common implementations draw it.
# It is coarse, so some points in neighbouring countries are shifted too.
CHINA_MIN_LAT, CHINA_MAX_LAT = 0.8293, 55.8271
CHINA_MIN_LNG, CHINA_MAX_LNG = 72.004, 137.8347


def haversine_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Return the great-circle distance between two points, in metres."""
    phi1 = math.radians(lat1)
    phi2 = math.radians(lat2)
    delta_phi = math.radians(lat2 - lat1)
    delta_lambda = math.radians(lng2 - lng1)

    h = math.sin(delta_phi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(delta_lambda / 2) ** 2
    # min() guards asin against rounding just above 1 for antipodal points.
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def is_valid_coordinate(lat: object, lng: object) -> bool:
    """Check that lat and lng are finite numbers within [-90, 90] and [-180, 180].

    Ints count as numbers because JSON clients may send 118 for 118.0. Bools are rejected
    although Python treats them as ints, because a bool in a coordinate is a client bug.
    """
    for value in (lat, lng):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        # Only floats can be NaN or infinite, and math.isfinite() overflows on huge ints.
        if isinstance(value, float) and not math.isfinite(value):
            return False
    return -90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0


def is_in_china(lat: float, lng: float) -> bool:
    """Return True when the point lies in the rectangle where GCJ-02 applies an offset."""
    return CHINA_MIN_LAT <= lat <= CHINA_MAX_LAT and CHINA_MIN_LNG <= lng <= CHINA_MAX_LNG


def _sine_terms(t: float) -> float:
    # The periodic part that the lat and lng offsets share, in the transformed units.
    return (20.0 * math.sin(6.0 * t * math.pi) + 20.0 * math.sin(2.0 * t * math.pi)) * 2.0 / 3.0


def _lat_offset(x: float, y: float) -> float:
    """Return the raw latitude offset for x = lng - 105 and y = lat - 35."""
    offset = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * math.sqrt(abs(x))
    offset += _sine_terms(x)
    offset += (20.0 * math.sin(y * math.pi) + 40.0 * math.sin(y / 3.0 * math.pi)) * 2.0 / 3.0
    offset += (160.0 * math.sin(y / 12.0 * math.pi) + 320.0 * math.sin(y * math.pi / 30.0)) * 2.0 / 3.0
    return offset


def _lng_offset(x: float, y: float) -> float:
    """Return the raw longitude offset for x = lng - 105 and y = lat - 35."""
    offset = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * math.sqrt(abs(x))
    offset += _sine_terms(x)
    offset += (20.0 * math.sin(x * math.pi) + 40.0 * math.sin(x / 3.0 * math.pi)) * 2.0 / 3.0
    offset += (150.0 * math.sin(x / 12.0 * math.pi) + 300.0 * math.sin(x / 30.0 * math.pi)) * 2.0 / 3.0
    return offset


def wgs84_to_gcj02(lat: float, lng: float) -> tuple[float, float]:
    """Convert a WGS-84 point (raw GPS) to GCJ-02, the system of AMap and WeChat maps.

    Points outside the China rectangle are returned unchanged. The conversion has no
    closed-form inverse, and this module provides none.
    """
    if not is_in_china(lat, lng):
        return lat, lng

    x = lng - 105.0
    y = lat - 35.0
    phi = math.radians(lat)
    sin_phi = math.sin(phi)
    w = 1.0 - KRASOVSKY_EE * sin_phi * sin_phi
    sqrt_w = math.sqrt(w)

    # Scale the raw offsets, which are in metres, to degrees with the ellipsoid's
    # meridian radius (for latitude) and parallel radius (for longitude).
    meridian_radius = KRASOVSKY_A * (1.0 - KRASOVSKY_EE) / (w * sqrt_w)
    parallel_radius = KRASOVSKY_A / sqrt_w * math.cos(phi)
    delta_lat = _lat_offset(x, y) * 180.0 / (meridian_radius * math.pi)
    delta_lng = _lng_offset(x, y) * 180.0 / (parallel_radius * math.pi)
    return lat + delta_lat, lng + delta_lng
