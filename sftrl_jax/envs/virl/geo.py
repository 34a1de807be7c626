"""Headings, bearings, distances and the direction words of V-IRL (SPEC.md §2.3).

Conventions: a heading is in degrees, 0 = north, 90 = east, clockwise. Geocodes are `(lat, lng)` in
degrees. Cities are built in a local metric frame (x east, y north, metres) around a centre and
converted with an equirectangular projection, which is exact enough over a few kilometres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EARTH_RADIUS_M = 6_371_000.0

COMPASS_WORDS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
# 45-degree bins of the angle from the agent's heading to a landmark, clockwise from straight ahead.
SIDE_WORDS = ("front", "right front", "right", "right behind", "behind", "left behind", "left", "left front")
RELATIVE_WORDS = ("left", "right", "slightly left", "slightly right")

LatLng = tuple[float, float]


def normalize(heading: float) -> float:
    """Heading in [0, 360)."""
    return float(heading) % 360.0


def wrap180(angle: float) -> float:
    """Angle in (-180, 180]."""
    a = float(angle) % 360.0
    return a - 360.0 if a > 180.0 else a


def distance_m(a: Sequence[float], b: Sequence[float]) -> float:
    """Great-circle (haversine) distance in metres between two (lat, lng) points."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def bearing(a: Sequence[float], b: Sequence[float]) -> float:
    """Initial great-circle heading (0 = N, clockwise) from point a to point b, in [0, 360)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    dl = lng2 - lng1
    y = math.sin(dl) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(dl)
    return normalize(math.degrees(math.atan2(y, x)))


def interpolate(a: Sequence[float], b: Sequence[float], t: float) -> LatLng:
    """Point at fraction t of the way from a to b (linear in lat/lng; legs are short)."""
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _bin8(angle: float) -> int:
    return int(((float(angle) + 22.5) % 360.0) // 45.0) % 8


def compass_word(heading: float) -> str:
    """The 8-point compass word whose 45-degree bin (centred on it) holds `heading`."""
    return COMPASS_WORDS[_bin8(heading)]


def side_word(agent_heading: float, target_bearing: float) -> str:
    """Where a target lies for an agent facing `agent_heading`: 'front', 'right front', ..., 'left front'."""
    return SIDE_WORDS[_bin8(target_bearing - agent_heading)]


def relative_turn_word(heading: float, previous_heading: float, *, wrap: bool = False) -> str:
    """The relative turn word of SPEC.md §2.3 for turning from `previous_heading` to `heading`.

    delta < -45 -> 'left'; delta > 45 -> 'right'; -45 <= delta <= 0 -> 'slightly left';
    0 < delta <= 45 -> 'slightly right'. The reference computes delta = heading - previous without
    wrapping it, so 350 -> 10 (a 20-degree right turn) gives delta = -340 -> 'left'; that is the
    default here. `wrap=True` first maps delta into (-180, 180], the geometrically right word.
    """
    delta = float(heading) - float(previous_heading)
    if wrap:
        delta = wrap180(delta)
    if delta < -45.0:
        return "left"
    if delta > 45.0:
        return "right"
    if delta <= 0.0:
        return "slightly left"
    return "slightly right"


class LocalFrame:
    """Equirectangular projection between (lat, lng) and metres (x east, y north) around a centre."""

    def __init__(self, center: Sequence[float]):
        self.lat0, self.lng0 = float(center[0]), float(center[1])
        self._m_per_deg_lat = math.pi * EARTH_RADIUS_M / 180.0
        self._m_per_deg_lng = self._m_per_deg_lat * math.cos(math.radians(self.lat0))

    def to_xy(self, latlng: Sequence[float]) -> tuple[float, float]:
        return (
            (float(latlng[1]) - self.lng0) * self._m_per_deg_lng,
            (float(latlng[0]) - self.lat0) * self._m_per_deg_lat,
        )

    def to_latlng(self, xy: Sequence[float]) -> LatLng:
        return (
            self.lat0 + float(xy[1]) / self._m_per_deg_lat,
            self.lng0 + float(xy[0]) / self._m_per_deg_lng,
        )


def xy_heading(dx: float, dy: float) -> float:
    """Heading (0 = N, clockwise) of a metric displacement (dx east, dy north)."""
    return normalize(math.degrees(math.atan2(dx, dy)))


def heading_vector(heading: float) -> tuple[float, float]:
    """Unit metric vector (east, north) of a heading."""
    r = math.radians(heading)
    return (math.sin(r), math.cos(r))
