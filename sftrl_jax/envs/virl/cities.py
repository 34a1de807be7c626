"""Procedural cities: a street graph (jittered, rotated grid + diagonal avenues + merged blocks), named
streets and named landmarks near intersections, in one `Style`.

Geometry lives in a local metric frame (x east, y north); `City.latlng` converts to geocodes. Everything
is a pure function of `(seed, style, extent)`; Python's `random.Random` is used because its stream is
stable across Python and numpy versions.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np

from sftrl_jax.envs.virl import geo, names
from sftrl_jax.envs.virl.styles import Style


@dataclasses.dataclass(frozen=True)
class Landmark:
    name: str
    kind: str
    xy: tuple[float, float]
    node: int  # the intersection it stands at
    sign: int  # index into the style's sign colours


@dataclasses.dataclass(frozen=True)
class City:
    name: str
    style: Style
    seed: int
    frame: geo.LocalFrame
    nodes: np.ndarray  # [n_nodes, 2] metres (x east, y north)
    edges: np.ndarray  # [n_edges, 2] node ids
    edge_height: np.ndarray  # [n_edges, 2] facade height (m) on the left / right of edge a->b
    edge_facade: np.ndarray  # [n_edges, 2] facade colour index, same sides
    adjacency: tuple[tuple[tuple[int, int], ...], ...]  # node -> ((neighbour, edge id), ...)
    landmarks: tuple[Landmark, ...]
    node_landmark: dict[int, int]  # node -> landmark index
    component: frozenset[int]  # nodes of the largest connected part (routes live there)

    def latlng(self, xy) -> geo.LatLng:
        lat, lng = self.frame.to_latlng(xy)
        return (round(lat, 7), round(lng, 7))

    def node_latlng(self, node: int) -> geo.LatLng:
        return self.latlng(self.nodes[node])

    def edge_heading(self, a: int, b: int) -> float:
        d = self.nodes[b] - self.nodes[a]
        return geo.xy_heading(float(d[0]), float(d[1]))


def _grid_shape(style: Style, extent_m: float) -> tuple[int, int]:
    return (max(4, round(extent_m / style.block_m[0]) + 1), max(4, round(extent_m / style.block_m[1]) + 1))


def generate_city(seed: int, style: Style, *, extent_m: float = 1500.0, name: str | None = None) -> City:
    """Builds a city of about `extent_m` x `extent_m` metres in `style`, reproducibly from `seed`."""
    rng = random.Random(f"city:{seed}:{style.name}")
    nx, ny = _grid_shape(style, extent_m)
    rot = math.radians(style.rotation_deg)
    ca, sa = math.cos(rot), math.sin(rot)
    nid = lambda i, j: i * ny + j

    # Intersections: a grid rotated clockwise by rotation_deg (so headings shift by it), then jittered.
    pts = []
    for i in range(nx):
        for j in range(ny):
            u, v = (i - (nx - 1) / 2) * style.block_m[0], (j - (ny - 1) / 2) * style.block_m[1]
            x, y = u * ca + v * sa, -u * sa + v * ca
            pts.append((x + rng.gauss(0.0, style.jitter_m), y + rng.gauss(0.0, style.jitter_m)))
    nodes = np.asarray(pts, dtype=np.float64)

    street_names: list[str] = []
    used_names: set[str] = set()

    def new_street(kind: int, index: int) -> int:
        while True:
            s = names.street_name(rng, style, kind, index)
            if s not in used_names:
                used_names.add(s)
                street_names.append(s)
                return len(street_names) - 1

    col_street = [new_street(1, i) for i in range(nx)]
    row_street = [new_street(0, j) for j in range(ny)]
    edges: list[tuple[int, int, int]] = []
    for i in range(nx):
        for j in range(ny):
            if i + 1 < nx:
                edges.append((nid(i, j), nid(i + 1, j), row_street[j]))
            if j + 1 < ny:
                edges.append((nid(i, j), nid(i, j + 1), col_street[i]))

    # Irregular blocks: drop some segments, never isolating an intersection.
    degree = [0] * len(pts)
    for a, b, _ in edges:
        degree[a] += 1
        degree[b] += 1
    keep = []
    for a, b, s in edges:
        if rng.random() < style.remove_edge_p and degree[a] > 2 and degree[b] > 2:
            degree[a] -= 1
            degree[b] -= 1
            continue
        keep.append((a, b, s))
    edges = keep

    # Diagonal avenues: block diagonals in one direction each, never two crossing in one block.
    used_blocks: set[tuple[int, int]] = set()
    for _ in range(style.n_diagonals):
        di = 1
        dj = rng.choice((1, -1))
        i, j = 0, rng.randrange(ny - 1) if dj == 1 else rng.randrange(1, ny)
        if rng.random() < 0.5:  # start on the bottom/top edge instead of the left edge
            i, j = rng.randrange(nx - 1), (0 if dj == 1 else ny - 1)
        street = new_street(2, len(street_names))
        while 0 <= i + di < nx and 0 <= j + dj < ny:
            block = (i, min(j, j + dj))
            if block not in used_blocks:
                used_blocks.add(block)
                edges.append((nid(i, j), nid(i + di, j + dj), street))
            i, j = i + di, j + dj

    n_edges = len(edges)
    edge_arr = np.asarray([(a, b) for a, b, _ in edges], dtype=np.int64)
    adjacency: list[list[tuple[int, int]]] = [[] for _ in pts]
    for e, (a, b, _) in enumerate(edges):
        adjacency[a].append((b, e))
        adjacency[b].append((a, e))
    lo, hi = style.building_m
    edge_height = np.asarray([[rng.uniform(lo, hi), rng.uniform(lo, hi)] for _ in range(n_edges)])
    edge_facade = np.asarray([[rng.randrange(len(style.facades)) for _ in range(2)] for _ in range(n_edges)])

    # Largest connected component.
    seen: set[int] = set()
    best: set[int] = set()
    for start in range(len(pts)):
        if start in seen:
            continue
        comp, stack = {start}, [start]
        while stack:
            for nb, _ in adjacency[stack.pop()]:
                if nb not in comp:
                    comp.add(nb)
                    stack.append(nb)
        seen |= comp
        if len(comp) > len(best):
            best = comp

    # Landmarks: at a corner between two adjacent streets, or a little way along one street.
    setback = style.road_half_m + style.sidewalk_m + 3.0
    landmarks: list[Landmark] = []
    node_landmark: dict[int, int] = {}
    used_lm: set[str] = set()
    for n in range(len(pts)):
        if rng.random() >= style.landmark_p or not adjacency[n]:
            continue
        hs = sorted(geo.xy_heading(*(nodes[nb] - nodes[n])) for nb, _ in adjacency[n])
        if rng.random() < 0.7 or len(hs) == 1:
            k = rng.randrange(len(hs))
            h0, h1 = hs[k], hs[(k + 1) % len(hs)]
            gap = (h1 - h0) % 360.0 or 360.0
            direction = h0 + gap / 2
            dist = setback / max(math.sin(math.radians(min(gap, 180.0) / 2)), 0.5)
            dx, dy = geo.heading_vector(direction)
            xy = (nodes[n][0] + dx * dist, nodes[n][1] + dy * dist)
        else:
            along = rng.choice(hs)
            side = rng.choice((90.0, -90.0))
            (ax, ay), (px, py) = geo.heading_vector(along), geo.heading_vector(along + side)
            t = rng.uniform(setback + 6.0, setback + 18.0)
            xy = (nodes[n][0] + ax * t + px * setback, nodes[n][1] + ay * t + py * setback)
        lm_name, kind = names.landmark_name(rng, style, used_lm)
        node_landmark[n] = len(landmarks)
        landmarks.append(
            Landmark(lm_name, kind, (float(xy[0]), float(xy[1])), n, rng.randrange(len(style.sign_colors)))
        )

    center = (rng.uniform(-40.0, 55.0), rng.uniform(-170.0, 170.0))
    city_name = name or names.proper_name(rng, style, min_syllables=2, max_syllables=3)
    return City(
        name=city_name,
        style=style,
        seed=seed,
        frame=geo.LocalFrame(center),
        nodes=nodes,
        edges=edge_arr,
        edge_height=edge_height,
        edge_facade=edge_facade,
        adjacency=tuple(tuple(a) for a in adjacency),
        landmarks=tuple(landmarks),
        node_landmark=node_landmark,
        component=frozenset(best),
    )
