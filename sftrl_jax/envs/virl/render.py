"""Synthetic street views of a procedural city, four per waypoint, tiled 2x2 (SPEC.md §2.4).

Each view is a 90-degree pinhole camera 2.5 m above the street centre line, drawn by a column ray
caster: buildings are facades set back from every street segment (gaps at intersections show the
cross streets), coloured and windowed in the city's style; the ground is road, lane markings and
sidewalk; every landmark within `SIGN_RANGE_M` gets a sign with its name in the view that faces it
(the view whose centre is closest to the landmark's bearing), at the horizontal position of that
bearing. Views are tiled top-left, top-right, bottom-left, bottom-right with 5-px black separators,
so the image is (2 * view_size + 5) pixels square. The reference pastes 1200-px views (2405 px); we
default to 256-px views (517 px), ample for the model's 560-px tiles and fast enough for RL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sftrl_jax.envs.virl import geo
from sftrl_jax.envs.virl.cities import City
from sftrl_jax.envs.virl.prompts import VIEW_OFFSETS

SEPARATOR_PX = 5
DEFAULT_VIEW_SIZE = 256
CAMERA_HEIGHT_M = 2.5
MAX_RANGE_M = 160.0
SIGN_RANGE_M = 70.0
SIGN_HEIGHT_M = 5.0
GROUND_RANGE_M = 60.0


def tile_views(views: Sequence[np.ndarray]) -> np.ndarray:
    """Four [S, S, ...] views -> one [2S+5, 2S+5, ...] grid (TL, TR, BL, BR) with black (zero)
    separators; works on [S, S, 3] uint8 images and on [S, S] packed words alike."""
    if len(views) != 4:
        raise ValueError(f"need 4 views, got {len(views)}")
    s = views[0].shape[0]
    grid = np.zeros((2 * s + SEPARATOR_PX, 2 * s + SEPARATOR_PX, *views[0].shape[2:]), dtype=views[0].dtype)
    for k, v in enumerate(views):
        r, c = divmod(k, 2)
        y, x = r * (s + SEPARATOR_PX), c * (s + SEPARATOR_PX)
        grid[y : y + s, x : x + s] = v
    return grid


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _rgb(c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


class _CityGeometry:
    """Per-city arrays for the ray caster (built once per city)."""

    def __init__(self, city: City):
        st = city.style
        setback = st.road_half_m + st.sidewalk_m
        corner = self._corners(city, setback)
        p0s, p1s, heights, colors, normals = [], [], [], [], []
        for e, (a, b) in enumerate(city.edges):
            pa, pb = city.nodes[a], city.nodes[b]
            d = pb - pa
            length = float(np.hypot(*d))
            u = d / max(length, 1e-9)
            n = np.array([-u[1], u[0]])  # left of a -> b
            for side, sign in ((0, 1.0), (1, -1.0)):
                # Left of a->b: the wedge anticlockwise of the edge at a, clockwise of b->a at b.
                start = corner.get((int(a), int(b), "ccw" if sign > 0 else "cw"))
                end = corner.get((int(b), int(a), "cw" if sign > 0 else "ccw"))
                off = n * sign * setback
                start = pa + u * setback + off if start is None else start
                end = pb - u * setback + off if end is None else end
                if float((end - start) @ u) <= 1.0:  # corners crossed on a very short edge
                    continue
                p0s.append(start)
                p1s.append(end)
                heights.append(city.edge_height[e, side])
                colors.append(city.edge_facade[e, side])
                normals.append(n * sign)  # facing the street
        self.p0 = np.asarray(p0s, dtype=np.float64)
        self.seg = np.asarray(p1s, dtype=np.float64) - self.p0
        self.seg_len = np.hypot(self.seg[:, 0], self.seg[:, 1])
        self.mid = self.p0 + self.seg / 2
        self.height = np.asarray(heights, dtype=np.float32)
        self.color = np.asarray(colors, dtype=np.int64)
        light = np.array([math.sin(math.radians(135.0)), math.cos(math.radians(135.0))])  # from the south-east
        self.shade = (0.78 + 0.22 * (np.asarray(normals) @ light)).astype(np.float32)
        self.street_a = city.nodes[city.edges[:, 0]]
        self.street_d = city.nodes[city.edges[:, 1]] - self.street_a
        self.street_len2 = np.maximum((self.street_d**2).sum(1), 1e-9)
        self.street_mid = self.street_a + self.street_d / 2
        self.lm_xy = np.asarray([lm.xy for lm in city.landmarks], dtype=np.float64).reshape(-1, 2)

    @staticmethod
    def _corners(city: City, setback: float) -> dict[tuple[int, int, str], np.ndarray]:
        """Where the facades of two angularly adjacent streets meet at each intersection.

        Key (node, neighbour, "cw" | "ccw"): the corner of the wedge clockwise / anticlockwise of the
        street from node to neighbour. The corner lies on the bisector at setback / sin(wedge / 2), so
        facades close up across a straight side (180-degree wedge, e.g. the far side of a T junction)
        and meet at a point at sharp corners; near-dead-ends (wedge >= 300) keep a gap.
        """
        out = {}
        for node, nbrs in enumerate(city.adjacency):
            if len(nbrs) < 2:
                continue
            hs = sorted((city.edge_heading(node, nb), nb) for nb, _ in nbrs)
            for i, (h0, nb0) in enumerate(hs):
                h1, nb1 = hs[(i + 1) % len(hs)]
                wedge = (h1 - h0) % 360.0
                if wedge <= 1e-6 or wedge >= 300.0:
                    continue
                dx, dy = geo.heading_vector(h0 + wedge / 2)
                dist = setback / math.sin(math.radians(wedge / 2))
                point = city.nodes[node] + np.array([dx, dy]) * dist
                out[(node, nb0, "cw")] = point
                out[(node, nb1, "ccw")] = point
        return out


_GEOMETRY: dict[tuple[str, int, str], _CityGeometry] = {}


def _geometry(city: City) -> _CityGeometry:
    key = (city.name, city.seed, city.style.name)
    if key not in _GEOMETRY:
        _GEOMETRY[key] = _CityGeometry(city)
    return _GEOMETRY[key]


def _fmod(x: np.ndarray, period: float) -> np.ndarray:
    """x mod period for x >= 0 (np.mod is several times slower, and we call it on whole images)."""
    return x - np.floor(x * (1.0 / period)) * period


def _pack(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] colours -> [...] uint32 RGBA words, so an image is one gather of 4-byte words."""
    c = np.clip(np.rint(rgb), 0, 255).astype(np.uint32)
    return (c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16) | np.uint32(0xFF000000)).astype("<u4")


def _unpack(words: np.ndarray) -> np.ndarray:
    return words.view(np.uint8).reshape(*words.shape, 4)[..., :3].copy()


def _window_mask(pattern: str, s_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
    """Where a facade shows glass, from metres along the facade (s_m) and above ground (y_m)."""
    upper = y_m > 4.0
    if pattern == "bands":
        return upper & (_fmod(y_m, 3.2) > 1.2) & (_fmod(y_m, 3.2) < 2.2)
    if pattern == "tall":
        return upper & (_fmod(s_m, 3.0) > 0.9) & (_fmod(s_m, 3.0) < 2.0) & (_fmod(y_m, 4.0) > 0.6)
    if pattern == "glass":
        return upper & (_fmod(s_m, 2.0) > 0.15) & (_fmod(y_m, 3.5) > 0.25)
    # grid and shutters
    return upper & (_fmod(s_m, 4.0) > 1.2) & (_fmod(s_m, 4.0) < 2.8) & (_fmod(y_m, 3.5) > 1.0) & (_fmod(y_m, 3.5) < 2.6)


class StreetRenderer:
    """Renders the 2x2 street-view grid of a position in one city."""

    def __init__(self, city: City, *, view_size: int = DEFAULT_VIEW_SIZE, view_offsets: Sequence[float] = VIEW_OFFSETS):
        if int(view_size) < 32:
            raise ValueError(f"view_size must be >= 32 pixels, got {view_size}")
        self.city, self.style = city, city.style
        self.size = int(view_size)
        self.offsets = tuple(float(o) for o in view_offsets)
        self.geo = _geometry(city)
        s = self.size
        self.focal = s / 2.0  # 90-degree field of view
        self.col_angle = np.arctan((np.arange(s) + 0.5 - s / 2.0) / self.focal)  # [S] radians, + = right
        self.rows = np.arange(s, dtype=np.float32)[:, None] + 0.5  # [S, 1]
        top, horizon = _rgb(self.style.sky[0]), _rgb(self.style.sky[1])
        frac = np.clip(self.rows / (s / 2.0), 0.0, 1.0)[:, :, None]  # [S, 1, 1]
        self.sky = (top * (1 - frac) + horizon * frac) * np.ones((1, s, 1), np.float32)  # [S, S, 3]
        self.sky = _pack(self.sky)  # [S, S] RGBA words
        self.half = s // 2
        self.palette = np.asarray(self.style.facades, dtype=np.float32)
        st = self.style
        road = _rgb(st.road)
        ground = [(0, 0, 0), road, _rgb(st.sidewalk), _rgb(st.sidewalk) * 0.8, _rgb(st.marking)]
        ground.append(road * 0.6 + _rgb(st.sky[1]) * 0.4)  # far ground fading into haze
        self.ground_lut = _pack(np.asarray(ground, np.float32))[:, None]  # [6, 1]

    # ------------------------------------------------------------------ one view
    def _view(self, pos: np.ndarray, heading: float) -> np.ndarray:
        st, g, s, f = self.style, self.geo, self.size, self.focal
        horizon = s / 2.0
        ang = math.radians(heading) + self.col_angle  # [S]
        d = np.stack([np.sin(ang), np.cos(ang)], axis=1)  # [S, 2] ray directions

        # Ray casting: nearest facade hit per column.
        near = np.flatnonzero(np.hypot(*(g.mid - pos).T) < MAX_RANGE_M + g.seg_len / 2)
        cols = np.arange(s)
        if len(near):
            w, seg = g.p0[near] - pos, g.seg[near]  # [K, 2]
            denom = d[:, None, 0] * seg[None, :, 1] - d[:, None, 1] * seg[None, :, 0]  # [S, K]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (w[None, :, 0] * seg[None, :, 1] - w[None, :, 1] * seg[None, :, 0]) / denom
                u = (w[None, :, 0] * d[:, None, 1] - w[None, :, 1] * d[:, None, 0]) / denom
            t = np.where((t > 0.5) & (u >= 0.0) & (u <= 1.0), t, np.inf)
            k = np.argmin(t, axis=1)
            hit_t, idx = t[cols, k], near[k]
            s_m = (u[cols, k] * g.seg_len[idx]).astype(np.float32)  # metres along the facade
        else:
            hit_t, idx, s_m = np.full(s, np.inf), np.zeros(s, np.int64), np.zeros(s, np.float32)
        hit = hit_t < MAX_RANGE_M
        z = np.where(hit, hit_t * np.cos(self.col_angle), MAX_RANGE_M).astype(np.float32)  # [S] depth
        height = g.height[idx]
        top = np.where(hit, horizon - f * (height - CAMERA_HEIGHT_M) / z, horizon)[None, :]  # [1, S]
        bot = np.where(hit, horizon + f * CAMERA_HEIGHT_M / z, horizon)[None, :]

        # Materials: 0 sky, 1 road, 2 sidewalk, 3 lot, 4 lane marking, 5 far ground, 6 facade, 7 glass,
        # 8 shop front, 9 shutter. Colours come from a per-column table, so each pixel is one lookup.
        rows = self.rows
        mat = np.zeros((s, s), np.uint8)
        mat[self.half :] = np.repeat(np.repeat(self._ground(pos, d), 2, axis=0), 2, axis=1)[: s - self.half, :s]
        mat[rows < bot] = 0
        wall = (rows >= top) & (rows < bot)
        y_m = CAMERA_HEIGHT_M + (horizon - rows) * z[None, :] / f  # [S, S] metres above the ground
        sm = s_m[None, :]
        glass = _window_mask(st.window_pattern, sm, y_m)
        shop = (y_m < 3.2) & (y_m > 0.3) & (_fmod(sm, 9.0) > 1.0)
        mat[wall] = 6
        mat[wall & glass] = 7
        mat[wall & shop] = 8
        if st.window_pattern == "shutters":
            shutter = (_fmod(sm, 4.0) > 0.8) & (_fmod(sm, 4.0) < 1.2) & (y_m > 4.0)
            shutter &= (_fmod(y_m, 3.5) > 1.0) & (_fmod(y_m, 3.5) < 2.6)
            mat[wall & shutter] = 9

        base = self.palette[g.color[idx]] * g.shade[idx][:, None]  # [S, 3]
        fog = (np.clip(z / MAX_RANGE_M, 0.0, 1.0) * 0.6)[:, None]
        haze = _rgb(st.sky[1])
        lut = np.empty((10, s), np.uint32)
        lut[:6] = self.ground_lut
        walls = np.stack([base, np.broadcast_to(_rgb(st.window), base.shape), base * 0.35 + _rgb(st.window) * 0.4,
                          np.broadcast_to(_rgb((40, 110, 70)), base.shape)])  # fmt: skip
        lut[6:] = _pack(walls * (1 - fog) + haze * fog)
        out = np.take(lut.reshape(-1), mat.astype(np.int32) * s + cols[None, :])  # [S, S] RGBA words
        return np.where(mat == 0, self.sky, out)  # [S, S] packed RGBA words

    def _ground(self, pos: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Ground materials of the lower half of a view, at half resolution: [S/4, S/2] uint8."""
        st, g, f = self.style, self.geo, self.focal
        rows = self.rows[self.half :: 2, 0] - self.half  # pixels below the horizon
        dist = f * CAMERA_HEIGHT_M / np.maximum(rows, 0.5)  # [R] forward distance of each row
        c = slice(None, None, 2)
        rng = dist[:, None] / np.cos(self.col_angle[c])[None, :]  # [R, C] range along each ray
        gx, gy = pos[0] + rng * d[c, 0], pos[1] + rng * d[c, 1]
        # Streets within reach: point-to-segment distance from the camera.
        tt = np.clip(((pos - g.street_a) * g.street_d).sum(1) / g.street_len2, 0.0, 1.0)
        gap = np.hypot(*(g.street_a + tt[:, None] * g.street_d - pos).T)
        close = np.flatnonzero(gap < GROUND_RANGE_M)
        mat = np.full(gx.shape, 3, np.uint8)
        if len(close):
            a, dd, l2 = g.street_a[close], g.street_d[close], g.street_len2[close]
            px, py = gx[None] - a[:, 0, None, None], gy[None] - a[:, 1, None, None]  # [K, R, C]
            tk = np.clip((px * dd[:, 0, None, None] + py * dd[:, 1, None, None]) / l2[:, None, None], 0.0, 1.0)
            ex, ey = px - tk * dd[:, 0, None, None], py - tk * dd[:, 1, None, None]
            dk2 = ex * ex + ey * ey  # squared distance to each centre line
            j = np.argmin(dk2, axis=0)
            best2 = np.take_along_axis(dk2, j[None], 0)[0]
            along = np.take_along_axis(tk, j[None], 0)[0] * np.sqrt(l2)[j]
            mat[best2 <= (st.road_half_m + st.sidewalk_m) ** 2] = 2
            mat[best2 <= st.road_half_m**2] = 1
            mat[(best2 < 0.25**2) & (_fmod(along, 6.0) < 3.0)] = 4
        mat[dist > GROUND_RANGE_M] = 5
        return mat

    # ------------------------------------------------------------------ signs
    def _signs(self, draw: ImageDraw.ImageDraw, pos: np.ndarray, heading: float) -> None:
        g, st, s, f = self.geo, self.style, self.size, self.focal
        if not len(g.lm_xy):
            return
        rel = g.lm_xy - pos
        dist = np.hypot(rel[:, 0], rel[:, 1])
        visible = [i for i in np.argsort(-dist) if 1.0 < dist[i] < SIGN_RANGE_M]
        for i in visible:
            lm = self.city.landmarks[i]
            beta = geo.wrap180(geo.xy_heading(*rel[i]) - heading)
            view = min(range(4), key=lambda v: abs(geo.wrap180(beta - self.offsets[v])))
            local = geo.wrap180(beta - self.offsets[view])
            if abs(local) > 50.0:
                continue
            r, c = divmod(view, 2)
            ox, oy = c * (s + SEPARATOR_PX), r * (s + SEPARATOR_PX)
            depth = dist[i] * max(math.cos(math.radians(local)), 0.3)
            size = int(np.clip(1.4 * s / dist[i] * st.sign_font_scale, s / 22.0, s / 9.0))
            text = lm.name.upper() if st.sign_upper else lm.name
            font = _font(size)
            lines = [text]
            if draw.textlength(text, font=font) > 0.85 * s and " " in text:
                cut = text.rfind(" ", 0, len(text) // 2 + 1)
                cut = cut if cut > 0 else text.find(" ")
                lines = [text[:cut], text[cut + 1 :]]
            while size > 8 and max(draw.textlength(t, font=font) for t in lines) > 0.85 * s:
                size -= 1
                font = _font(size)
            tw = max(draw.textlength(t, font=font) for t in lines)
            th = size * len(lines) + 2 * (len(lines) - 1)
            pad = max(2, size // 3)
            bw, bh = tw + 2 * pad, th + 2 * pad
            cx = s / 2.0 + f * math.tan(math.radians(max(min(local, 44.0), -44.0)))
            cy = s / 2.0 - f * (SIGN_HEIGHT_M - CAMERA_HEIGHT_M) / depth
            x0 = float(np.clip(cx - bw / 2, 2, s - bw - 2))
            y0 = float(np.clip(cy - bh / 2, 2, s - bh - 2))
            box = (ox + x0, oy + y0, ox + x0 + bw, oy + y0 + bh)
            bg, fg = st.sign_colors[lm.sign % len(st.sign_colors)]
            if st.sign_shape == "rounded":
                draw.rounded_rectangle(box, radius=pad + 2, fill=bg, outline=fg, width=1)
            elif st.sign_shape == "oval":
                grow = bh * 0.35
                draw.ellipse((box[0] - grow, box[1] - grow / 2, box[2] + grow, box[3] + grow / 2), fill=bg, outline=fg)
            elif st.sign_shape == "banner":
                notch = bh / 3
                draw.polygon(
                    [(box[0] - notch, box[1]), (box[2] + notch, box[1]), (box[2], (box[1] + box[3]) / 2),
                     (box[2] + notch, box[3]), (box[0] - notch, box[3]), (box[0], (box[1] + box[3]) / 2)],
                    fill=bg,
                )  # fmt: skip
            else:
                draw.rectangle(box, fill=bg, outline=fg, width=1)
            for j, t in enumerate(lines):
                lw = draw.textlength(t, font=font)
                draw.text((box[0] + (bw - lw) / 2, box[1] + pad + j * (size + 2)), t, fill=fg, font=font)

    # ------------------------------------------------------------------ public
    def render_views(self, xy: Sequence[float], heading: float) -> list[np.ndarray]:
        """The four [S, S, 3] uint8 views (no signs) at metric position `xy`, agent facing `heading`."""
        pos = np.asarray(xy, dtype=np.float64)
        return [_unpack(self._view(pos, heading + o)) for o in self.offsets]

    def render(self, geocode: Sequence[float], heading: float) -> Image.Image:
        """The tiled 2x2 observation (with landmark signs) at a (lat, lng) for an agent facing `heading`."""
        pos = np.asarray(self.city.frame.to_xy(geocode), dtype=np.float64)
        grid = tile_views([self._view(pos, heading + o) for o in self.offsets])
        grid |= np.uint32(0xFF000000)  # opaque separators
        image = Image.frombuffer("RGBA", grid.shape[::-1], grid, "raw", "RGBA", 0, 1).convert("RGB")
        self._signs(ImageDraw.Draw(image), pos, heading)
        return image


def benchmark(*, view_size: int = DEFAULT_VIEW_SIZE, n: int = 50, seed: int = 0) -> dict[str, float]:
    """Times `render` on the waypoints of training routes: {"median_ms", "p90_ms", "mean_ms", "n"}.

    .venv/bin/python -c "from sftrl_jax.envs.virl import render; print(render.benchmark())"
    """
    import random
    import time

    from sftrl_jax.envs.virl import rail, routes

    rs = routes.training_set()
    rng = random.Random(seed)
    renderers: dict[str, StreetRenderer] = {}
    jobs = []
    while len(jobs) < n:
        route = rs.routes[rng.randrange(len(rs.routes))]
        city = rs.cities[route["city"]]
        if city.name not in renderers:
            renderers[city.name] = StreetRenderer(city, view_size=view_size)
        jobs += [(renderers[city.name], w) for w in rail.build_rail(route, rng=rng).waypoints]
    jobs = jobs[:n]
    jobs[0][0].render(jobs[0][1].geocode, jobs[0][1].heading)  # warm caches (fonts, geometry)
    times = []
    for r, w in jobs:
        t = time.perf_counter()
        r.render(w.geocode, w.heading)
        times.append(1000.0 * (time.perf_counter() - t))
    times.sort()
    return {
        "median_ms": times[len(times) // 2],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "mean_ms": sum(times) / len(times),
        "n": float(len(times)),
    }
