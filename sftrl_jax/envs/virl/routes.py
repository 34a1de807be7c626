"""Routes in the released `route_infos.json` structure, and the procedural route sets of each split.

A route is a plain dict, exactly the structure of one entry of the released file, so the rail builder
(`rail.py`) has one code path for both sources:

    {"route_id": "metro-0007", "city": "Brealton",            # procedural extras, ignored by the loader
     "start_place": {"name": ..., "relocated_geocode": [lat, lng]},
     "init_heading": 212,                                      # degrees; 0 or missing -> random
     "dest_place": {"name": ..., "geocode": [lat, lng]},
     "route_results": {"geocode_list": [[lat, lng], ...],      # each turning intersection, then the destination
                       "landmark_list": [{"name": ..., "geocode": [lat, lng]}, ...]},
     "milestone_info": "{ \"intersection_idx\": \"0\", \"landmarks\": ..., ... }\n{ ... }"}

Milestone block k describes leg k, from the start (k = 0) or intersection k to `geocode_list[k]`:
`landmarks` is what stands at the leg's end, seen from the arrival heading; `distance` the leg length;
`human_heading` the heading before turning into the leg; `to_next_intersection_heading` the leg's
heading and compass word.

Splits (SPEC.md §2.2): `train` = 1,000 routes of one training city; `id` and `ood-rule` = 48 of those
routes drawn with seed 12 (as the reference draws its eval routes from the training database);
`ood-visual` = 2 routes in each of 9 cities of other styles, in a fixed order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import geo
from sftrl_jax.envs.virl.cities import City, generate_city
from sftrl_jax.envs.virl.styles import OOD_STYLES, TRAIN_STYLE

MILESTONE_KEYS = ("intersection_idx", "landmarks", "distance", "human_heading", "to_next_intersection_heading")
NO_LANDMARK = "No landmark nearby"

TRAIN_CITY_SEED = 0
TRAIN_ROUTES = 1000
EVAL_ROUTES = 48
EVAL_SEED = 12
OOD_ROUTES_PER_CITY = 2
OOD_CITY_SEED = 100


@dataclasses.dataclass(frozen=True)
class Milestone:
    intersection_idx: int
    landmarks: str
    distance: str
    human_heading: str
    heading: float  # numeric part of to_next_intersection_heading
    compass: str  # word part of to_next_intersection_heading (computed from heading if absent)


@dataclasses.dataclass(frozen=True)
class RouteSet:
    routes: tuple[dict, ...]
    cities: Mapping[str, City]  # city name -> City (empty for released data)


# --------------------------------------------------------------------------- milestone_info format


def format_milestones(blocks: Sequence[Mapping[str, Any]]) -> str:
    """One brace-delimited block per milestone, one `"key": "value"` line per key."""
    out = []
    for b in blocks:
        lines = [f'    "{k}": "{b[k]}"' for k in MILESTONE_KEYS]
        out.append("{\n" + ",\n".join(lines) + "\n}")
    return "\n".join(out)


_LINE = re.compile(r'^\s*"?([A-Za-z_]+)"?\s*:\s*"?(.*?)"?\s*,?\s*$')
_HEADING = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:\(\s*([a-z]+)\s*\))?")


def parse_milestones(text: str, *, where: str = "route") -> list[Milestone]:
    """Parses `milestone_info` (split on '}', then `key: value` lines); errors name `where` and the key."""
    if not isinstance(text, str):
        raise EnvError(f"{where}: 'milestone_info' must be a string, got {type(text).__name__}")
    milestones = []
    for k, chunk in enumerate(c for c in text.split("}") if c.strip(" \n\t{,")):
        fields = {}
        for line in chunk.replace("{", "\n").splitlines():
            m = _LINE.match(line)
            if m:
                fields[m.group(1)] = m.group(2)
        for key in ("landmarks", "to_next_intersection_heading"):
            if key not in fields:
                raise EnvError(f"{where}: milestone block {k} of 'milestone_info' has no key {key!r}")
        hm = _HEADING.match(fields["to_next_intersection_heading"])
        if not hm:
            raise EnvError(
                f"{where}: milestone block {k}: cannot read a heading from "
                f"to_next_intersection_heading={fields['to_next_intersection_heading']!r}"
            )
        heading = float(hm.group(1))
        compass = hm.group(2) if hm.group(2) in geo.COMPASS_WORDS else geo.compass_word(heading)
        idx = fields.get("intersection_idx", str(k))
        milestones.append(
            Milestone(
                intersection_idx=int(idx) if idx.lstrip("-").isdigit() else k,
                landmarks=fields["landmarks"].strip(),
                distance=fields.get("distance", ""),
                human_heading=fields.get("human_heading", ""),
                heading=heading,
                compass=compass,
            )
        )
    return milestones


def _get(d: Any, path: Sequence[str], where: str) -> Any:
    cur = d
    for i, key in enumerate(path):
        if not isinstance(cur, Mapping) or key not in cur:
            raise EnvError(f"{where}: missing key {'.'.join(path[: i + 1])!r}")
        cur = cur[key]
    return cur


def _geocode(value: Any, name: str, where: str) -> geo.LatLng:
    try:
        lat, lng = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EnvError(f"{where}: {name} must be [lat, lng], got {value!r}") from None
    if not (math.isfinite(lat) and math.isfinite(lng)):
        raise EnvError(f"{where}: {name} must be finite, got {value!r}")
    return (lat, lng)


@dataclasses.dataclass(frozen=True)
class ParsedRoute:
    start: geo.LatLng
    init_heading: float | None  # None when missing or 0 (the reference then draws it at random)
    geocodes: tuple[geo.LatLng, ...]
    milestones: tuple[Milestone, ...]
    dest_name: str


def parse_route(route: Mapping[str, Any], *, where: str = "route") -> ParsedRoute:
    """Validates one route dict and extracts what the rail needs; errors name the route and the key."""
    start = _geocode(_get(route, ("start_place", "relocated_geocode"), where), "start_place.relocated_geocode", where)
    raw_list = _get(route, ("route_results", "geocode_list"), where)
    if not isinstance(raw_list, Sequence) or isinstance(raw_list, str) or not raw_list:
        raise EnvError(f"{where}: route_results.geocode_list must be a non-empty list of [lat, lng]")
    geocodes = tuple(_geocode(g, f"route_results.geocode_list[{i}]", where) for i, g in enumerate(raw_list))
    milestones = tuple(parse_milestones(_get(route, ("milestone_info",), where), where=where))
    if len(milestones) != len(geocodes):
        raise EnvError(
            f"{where}: milestone_info has {len(milestones)} blocks but route_results.geocode_list has "
            f"{len(geocodes)} points; they must match (one block per leg)"
        )
    dest = _get(route, ("dest_place",), where)
    dest_name = str(dest.get("name", "")) if isinstance(dest, Mapping) else ""
    h = route.get("init_heading")
    try:
        init_heading = float(h) if h not in (None, "", 0) else None
    except (TypeError, ValueError):
        raise EnvError(f"{where}: init_heading must be a number, got {h!r}") from None
    if init_heading == 0.0:
        init_heading = None
    return ParsedRoute(start, init_heading, geocodes, milestones, dest_name)


# --------------------------------------------------------------------------- procedural generation


def _landmark_text(city: City, node: int, heading: float) -> tuple[str, dict | None]:
    li = city.node_landmark.get(node)
    if li is None:
        return NO_LANDMARK, None
    lm = city.landmarks[li]
    pos = city.latlng(lm.xy)
    side = geo.side_word(heading, geo.bearing(city.node_latlng(node), pos))
    return f"{lm.name} is on your {side}", {"name": lm.name, "geocode": list(pos)}


def _straight_next(city: City, node: int, heading: float, visited: set[int]) -> int | None:
    best, best_d = None, 30.0
    for nb, _ in city.adjacency[node]:
        d = abs(geo.wrap180(city.edge_heading(node, nb) - heading))
        if nb not in visited and d < best_d:
            best, best_d = nb, d
    return best


def _walk(city: City, rng: random.Random, comp_edges: list[int], n_turns: int, max_blocks: int) -> tuple | None:
    """One attempt at a route: (start_xy, turn_nodes, dest_node), or None when it gets stuck."""
    a, b = (int(v) for v in city.edges[rng.choice(comp_edges)])
    if rng.random() < 0.5:
        a, b = b, a
    f = rng.uniform(0.3, 0.7)
    start_xy = city.nodes[a] + f * (city.nodes[b] - city.nodes[a])
    visited = {a, b}
    cur, heading = b, city.edge_heading(a, b)
    turns = []
    for leg in range(n_turns + 1):
        blocks = rng.randint(0, max_blocks - 1)  # plus the block entered on turning
        for _ in range(blocks):
            nb = _straight_next(city, cur, heading, visited)
            if nb is None:
                break
            heading, cur = city.edge_heading(cur, nb), nb
            visited.add(cur)
        if leg == n_turns:
            for _ in range(4):  # the destination is the next intersection with a landmark
                if cur in city.node_landmark and cur not in turns:
                    return start_xy, turns, cur
                nb = _straight_next(city, cur, heading, visited)
                if nb is None:
                    return None
                heading, cur = city.edge_heading(cur, nb), nb
                visited.add(cur)
            return None
        options = [
            nb
            for nb, _ in city.adjacency[cur]
            if nb not in visited and 35.0 <= abs(geo.wrap180(city.edge_heading(cur, nb) - heading)) <= 145.0
        ]
        if not options:
            return None
        turns.append(cur)
        nb = rng.choice(options)
        heading, cur = city.edge_heading(cur, nb), nb
        visited.add(cur)
    return None


def route_from_path(
    city: City, start_xy, turn_nodes: Sequence[int], dest_node: int, *, init_heading: int, route_id: str
) -> dict:
    """Builds the released-format dict of a path: start point, turning intersections, destination."""
    start = city.latlng(start_xy)
    points = [start] + [city.node_latlng(n) for n in (*turn_nodes, dest_node)]
    blocks, landmark_list = [], []
    prev_heading = float(init_heading)
    for k, node in enumerate((*turn_nodes, dest_node)):
        h = round(geo.bearing(points[k], points[k + 1]), 2)
        text, lm = _landmark_text(city, node, h)
        if lm:
            landmark_list.append(lm)
        blocks.append(
            {
                "intersection_idx": k,
                "landmarks": text,
                "distance": f"{round(geo.distance_m(points[k], points[k + 1]))} meters",
                "human_heading": f"{prev_heading:.2f}",
                "to_next_intersection_heading": f"{h:.2f} ({geo.compass_word(h)})",
            }
        )
        prev_heading = h
    dest_lm = city.landmarks[city.node_landmark[dest_node]]
    return {
        "route_id": route_id,
        "city": city.name,
        "start_place": {"name": f"{route_id} start", "geocode": list(start), "relocated_geocode": list(start)},
        "init_heading": init_heading,
        "dest_place": {"name": dest_lm.name, "geocode": list(city.latlng(dest_lm.xy))},
        "route_results": {"geocode_list": [list(p) for p in points[1:]], "landmark_list": landmark_list},
        "milestone_info": format_milestones(blocks),
    }


def generate_routes(
    city: City, n: int, *, seed: int, min_turns: int = 2, max_turns: int = 8, max_blocks: int = 4, prefix: str = ""
) -> list[dict]:
    """`n` distinct routes in `city` with `min_turns`..`max_turns` turning intersections each."""
    rng = random.Random(f"routes:{seed}:{city.name}")
    comp_edges = [e for e in range(len(city.edges)) if int(city.edges[e][0]) in city.component]
    routes, seen = [], set()
    attempts = 0
    while len(routes) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise EnvError(f"city {city.name!r} is too small for {n} routes with {min_turns}-{max_turns} turns")
        n_turns = rng.randint(min_turns, max_turns)
        walk = _walk(city, rng, comp_edges, n_turns, max_blocks)
        if walk is None:
            continue
        start_xy, turns, dest = walk
        key = (round(float(start_xy[0])), round(float(start_xy[1])), tuple(turns), dest)
        if key in seen:
            continue
        seen.add(key)
        routes.append(
            route_from_path(
                city, start_xy, turns, dest, init_heading=rng.randint(1, 359), route_id=f"{prefix}{len(routes):04d}"
            )
        )
    return routes


@functools.lru_cache(maxsize=4)
def training_set(seed: int = TRAIN_CITY_SEED, n: int = TRAIN_ROUTES) -> RouteSet:
    """The training city and its `n` routes (cached: built once per process, ~1 s)."""
    city = generate_city(seed, TRAIN_STYLE, extent_m=3000.0)
    routes = generate_routes(city, n, seed=seed, prefix=f"{TRAIN_STYLE.name}-")
    return RouteSet(tuple(routes), {city.name: city})


def eval_indices(n_total: int, n: int = EVAL_ROUTES, seed: int = EVAL_SEED) -> list[int]:
    """`n` distinct route indices out of `n_total`, drawn with `seed` (all of them if n >= n_total)."""
    idx = list(range(n_total))
    if n >= n_total:
        return idx
    return sorted(random.Random(seed).sample(idx, n))


@functools.lru_cache(maxsize=4)
def eval_set(seed: int = TRAIN_CITY_SEED, n: int = EVAL_ROUTES, eval_seed: int = EVAL_SEED) -> RouteSet:
    """The ID / rule-OOD routes: `n` routes of the training set drawn with `eval_seed`."""
    train = training_set(seed)
    return RouteSet(tuple(train.routes[i] for i in eval_indices(len(train.routes), n, eval_seed)), train.cities)


@functools.lru_cache(maxsize=4)
def visual_ood_set(seed: int = OOD_CITY_SEED, per_city: int = OOD_ROUTES_PER_CITY) -> RouteSet:
    """2 routes in each of 9 cities of other styles (18 routes, fixed order: city by city)."""
    routes, cities = [], {}
    for i, style in enumerate(OOD_STYLES):
        city = generate_city(seed + i, style, extent_m=1200.0)
        cities[city.name] = city
        routes += generate_routes(city, per_city, seed=seed + i, max_turns=6, prefix=f"{style.name}-")
    return RouteSet(tuple(routes), cities)


def route_set(split: str) -> RouteSet:
    if split == "train":
        return training_set()
    if split in ("id", "ood-rule"):
        return eval_set()
    if split == "ood-visual":
        return visual_ood_set()
    raise EnvError(f"unknown V-IRL split {split!r}")


def save_route_infos(routes: Sequence[Mapping[str, Any]], path) -> None:
    """Writes routes as a released-format `route_infos.json`: `[route_list, route_num]`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([list(routes), len(routes)], f, indent=1)
