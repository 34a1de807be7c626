"""The released V-IRL data layout (SPEC.md §2.2), for users who have the real routes and panoramas.

    <data_dir>/route_infos.json         [route_list, route_num], route dicts as in `routes.py`
    <data_dir>/gps_pano_mapping.pkl     {(lat, lng): pano_id}
    <data_dir>/street_views/<pano_id>.jpg             equirectangular panorama
    <data_dir>/street_views/<pano_id>.metadata.json   {"rotation": <degrees>, ...}

The pickle goes through `RestrictedUnpickler`, which refuses every global, so only plain containers,
numbers, strings and tuples load: a pickle that names a function (os.system, ...) is an error, never
a call. Panorama convention: the centre column of a panorama looks along heading `rotation`; column
x looks along `rotation + 360 * (x / W - 0.5)`; the middle row is the horizon. Views are pinhole
crops (FOV 90, pitch 0) sampled bilinearly in numpy.
"""

from __future__ import annotations

import functools
import io
import json
import math
import pathlib
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import geo, render
from sftrl_jax.envs.virl.prompts import VIEW_OFFSETS
from sftrl_jax.envs.virl.routes import parse_route

ROUTE_INFO = "route_infos.json"
# Read whole, so bounded: the released route file is a few MB, a panorama's metadata a few hundred bytes.
MAX_ROUTE_INFO_BYTES = 512 * 2**20
MAX_METADATA_BYTES = 2**20
MAX_JSON_DEPTH = 64  # nesting of arrays / objects; a route file has 6 levels
GPS_TO_PANO = "gps_pano_mapping.pkl"
STREET_VIEWS = "street_views"
MAPPING_RADIUS_M = 20.0
VIEW_FOV_DEG = 90.0


# --------------------------------------------------------------------------- restricted pickle


class RefusedPickleContent(pickle.UnpicklingError):
    """The pickle asks for something the restricted unpickler does not build (a global, a persistent id)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Loads only what pickle builds without importing anything: dicts, lists, tuples, sets, str,
    bytes, int, float, bool, None. Any global (a class, a function such as os.system) is refused."""

    def find_class(self, module: str, name: str):
        raise RefusedPickleContent(
            f"refusing to load global {module}.{name}: only plain containers, numbers and strings are allowed"
        )

    def persistent_load(self, pid):
        raise RefusedPickleContent("refusing a persistent id: only plain containers, numbers and strings are allowed")


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_pickle_restricted(path: str | pathlib.Path) -> Any:
    """Reads a pickle file through `RestrictedUnpickler`; any problem is an EnvError naming the file."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EnvError(f"pickle file not found: {path}") from None
    try:
        return restricted_loads(data)
    except RefusedPickleContent as e:
        raise EnvError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt data: UnpicklingError, EOFError, ValueError, ...
        raise EnvError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- files


def load_gps_pano_mapping(path: str | pathlib.Path) -> dict[tuple[float, float], str]:
    obj = load_pickle_restricted(path)
    if not isinstance(obj, dict):
        raise EnvError(f"{path}: expected a dict {{(lat, lng): pano_id}}, got {type(obj).__name__}")
    out = {}
    for key, pano in obj.items():
        try:
            lat, lng = (float(v) for v in key)
        except (TypeError, ValueError):
            raise EnvError(f"{path}: key {key!r} is not a (lat, lng) pair") from None
        if not isinstance(pano, str):
            raise EnvError(f"{path}: the pano id of {key!r} is {type(pano).__name__}, expected a string")
        out[(lat, lng)] = pano
    return out


def _read_json(path: pathlib.Path, max_bytes: int) -> Any:
    """A JSON file's value; FileNotFoundError passes, any other problem is an EnvError naming the file.

    Bounded before parsing (`max_bytes`) and after (`MAX_JSON_DEPTH`: the checks and messages that
    follow recurse into the values, so a file nested thousands deep must not reach them)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise EnvError(f"{path}: {size:,} bytes, more than the {max_bytes:,} this file may hold")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise EnvError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise EnvError(f"{path}: not valid JSON here (values nested deeper than {MAX_JSON_DEPTH})") from None
    except OSError as e:  # a folder, no permission, ...
        raise EnvError(f"{path}: cannot be read ({e.strerror or e})") from None
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise EnvError(f"{path}: not valid JSON here (values nested deeper than {MAX_JSON_DEPTH})")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return obj


def load_route_infos(path: str | pathlib.Path) -> list[dict]:
    """Reads `[route_list, route_num]` and validates every route (errors name the file, route and key)."""
    path = pathlib.Path(path)
    try:
        obj = _read_json(path, MAX_ROUTE_INFO_BYTES)
    except FileNotFoundError:
        raise EnvError(f"route file not found: {path}") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], list) and isinstance(obj[1], int)):
        raise EnvError(f"{path}: expected a JSON array [route_list, route_num]")
    route_list, route_num = obj
    if not 0 < route_num <= len(route_list):
        raise EnvError(f"{path}: route_num is {route_num} but the file holds {len(route_list)} routes")
    route_list = route_list[:route_num]
    for i, route in enumerate(route_list):
        if not isinstance(route, dict):
            raise EnvError(f"{path}: route {i} is a {type(route).__name__}, expected an object")
        parse_route(route, where=f"{path}: route {i}")
    return route_list


# --------------------------------------------------------------------------- panoramas


@functools.lru_cache(maxsize=8)
def _view_rays(size: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of a pitch-0 pinhole view: heading offset and elevation, degrees, [S, S] each."""
    f = (size / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    x = (np.arange(size) + 0.5 - size / 2.0) / f  # right
    y = (size / 2.0 - np.arange(size) - 0.5) / f  # up
    xx, yy = np.meshgrid(x, y)
    return np.degrees(np.arctan(xx)), np.degrees(np.arctan2(yy, np.sqrt(xx * xx + 1.0)))


def perspective_view(
    pano: np.ndarray, *, heading: float, rotation: float = 0.0, size: int = 256, fov_deg: float = VIEW_FOV_DEG
) -> np.ndarray:
    """A [size, size, 3] uint8 pinhole view (pitch 0) looking along `heading` from an equirectangular
    panorama [H, W, 3] whose centre column looks along `rotation`."""
    h, w = pano.shape[:2]
    dlon, lat = _view_rays(int(size), float(fov_deg))
    u = (((heading - rotation + dlon) / 360.0 + 0.5) % 1.0) * w - 0.5  # column, continuous
    v = np.clip((0.5 - lat / 180.0) * h - 0.5, 0.0, h - 1.0)
    u0 = np.floor(u).astype(np.int64)
    v0 = np.floor(v).astype(np.int64)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    u0, u1 = u0 % w, (u0 + 1) % w  # wraps around the seam
    v1 = np.minimum(v0 + 1, h - 1)
    img = pano.astype(np.float32)
    top = img[v0, u0] * (1 - fu) + img[v0, u1] * fu
    bottom = img[v1, u0] * (1 - fu) + img[v1, u1] * fu
    return np.clip(np.rint(top * (1 - fv) + bottom * fv), 0, 255).astype(np.uint8)


class ReleasedData:
    """Routes, the pano mapping and the street-view folder of one released data folder."""

    def __init__(self, routes: list[dict], mapping: dict[tuple[float, float], str], street_views: pathlib.Path):
        self.routes = routes
        self.mapping = mapping
        self.street_views = pathlib.Path(street_views)
        self._keys = list(mapping.keys())
        self._ids = list(mapping.values())
        self._latlng = np.radians(np.asarray(list(mapping.keys()), dtype=np.float64).reshape(-1, 2))

    @classmethod
    def from_dir(
        cls,
        data_dir: str | pathlib.Path,
        *,
        route_info: str | pathlib.Path | None = None,
        gps_to_pano: str | pathlib.Path | None = None,
        street_views: str | pathlib.Path | None = None,
    ) -> ReleasedData:
        root = pathlib.Path(data_dir)
        if not root.is_dir():
            raise EnvError(f"V-IRL data_dir is not a folder: {root}")
        route_info = pathlib.Path(route_info) if route_info else root / ROUTE_INFO
        gps_to_pano = pathlib.Path(gps_to_pano) if gps_to_pano else root / GPS_TO_PANO
        street_views = pathlib.Path(street_views) if street_views else root / STREET_VIEWS
        return cls(load_route_infos(route_info), load_gps_pano_mapping(gps_to_pano), street_views)

    def relocate(self, latlng: Sequence[float], radius_m: float = MAPPING_RADIUS_M) -> tuple[geo.LatLng, str] | None:
        """The nearest panorama within `radius_m`: ((lat, lng), pano_id), or None."""
        if not self._ids:
            return None
        lat, lng = math.radians(latlng[0]), math.radians(latlng[1])
        dlat, dlng = self._latlng[:, 0] - lat, self._latlng[:, 1] - lng
        a = np.sin(dlat / 2) ** 2 + math.cos(lat) * np.cos(self._latlng[:, 0]) * np.sin(dlng / 2) ** 2
        dist = 2 * geo.EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
        i = int(np.argmin(dist))
        if dist[i] > radius_m:
            return None
        return self._keys[i], self._ids[i]

    def panorama(self, pano_id: str) -> tuple[np.ndarray, float]:
        return _load_panorama(str(self.street_views), pano_id)

    def observation(
        self, geocode: Sequence[float], heading: float, *, pano_id: str | None = None, view_size: int = 256,
        view_offsets: Sequence[float] = VIEW_OFFSETS, where: str = "waypoint",
    ) -> Image.Image:  # fmt: skip
        """The 2x2 grid of perspective views at a waypoint (its panorama, or the nearest within 20 m)."""
        if pano_id is None:
            found = self.relocate(geocode)
            if found is None:
                raise EnvError(
                    f"{where}: no panorama within {MAPPING_RADIUS_M:.0f} m of geocode {tuple(geocode)} in the gps->pano mapping"
                )
            pano_id = found[1]
        pano, rotation = self.panorama(pano_id)
        views = [perspective_view(pano, heading=heading + o, rotation=rotation, size=view_size) for o in view_offsets]
        return Image.fromarray(render.tile_views(views))


@functools.lru_cache(maxsize=8)
def _load_panorama(folder: str, pano_id: str) -> tuple[np.ndarray, float]:
    if not pano_id or "/" in pano_id or "\\" in pano_id or pano_id.startswith("."):
        raise EnvError(f"invalid pano id {pano_id!r}")
    image_path = pathlib.Path(folder) / f"{pano_id}.jpg"
    meta_path = pathlib.Path(folder) / f"{pano_id}.metadata.json"
    if not image_path.is_file():
        raise EnvError(f"pano id {pano_id!r} has no image: {image_path} does not exist")
    try:
        meta = _read_json(meta_path, MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise EnvError(f"pano id {pano_id!r} has no metadata: {meta_path} does not exist") from None
    if not isinstance(meta, dict) or "rotation" not in meta:
        raise EnvError(f"{meta_path}: missing key 'rotation'")
    try:
        rotation = float(meta["rotation"])
        if not math.isfinite(rotation):
            raise ValueError
    except (TypeError, ValueError):
        raise EnvError(f"{meta_path}: 'rotation' must be a finite number, got {meta['rotation']!r:.60}") from None
    try:
        with Image.open(image_path) as im:
            pano = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise EnvError(f"{image_path}: cannot read the panorama ({e})") from None
    return pano, rotation
