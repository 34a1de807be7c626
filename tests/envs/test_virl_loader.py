"""The released V-IRL data format on small synthetic files made here (SPEC.md §2.2)."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from sftrl_jax.envs import make
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import geo, loader, routes
from tests.envs.virl_fixtures import DEST, INT1, INT2, START, hand_route

# Colours by absolute heading quadrant: north, east, south, west.
QUADRANT_RGB = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [240, 240, 240]], dtype=np.uint8)


def quadrant_pano(rotation: float, width: int = 72, height: int = 36) -> np.ndarray:
    """An equirectangular panorama whose columns are coloured by the absolute heading they look along."""
    heading = (rotation + ((np.arange(width) + 0.5) / width - 0.5) * 360.0) % 360.0
    quadrant = (((heading + 45.0) % 360.0) // 90.0).astype(int)
    return np.broadcast_to(QUADRANT_RGB[quadrant][None], (height, width, 3)).copy()


def write_release(root, route_list, panos: dict[tuple[float, float], str], rotation_of=lambda i: 0.0):
    root.mkdir(parents=True, exist_ok=True)
    (root / "route_infos.json").write_text(json.dumps([route_list, len(route_list)]))
    (root / "gps_pano_mapping.pkl").write_bytes(pickle.dumps(panos))
    views = root / "street_views"
    views.mkdir(exist_ok=True)
    for i, pano_id in enumerate(panos.values()):
        rot = rotation_of(i)
        Image.fromarray(quadrant_pano(rot)).save(views / f"{pano_id}.jpg", quality=95)
        (views / f"{pano_id}.metadata.json").write_text(json.dumps({"rotation": rot, "pano_id": pano_id}))
    return root


def hand_panos() -> dict[tuple[float, float], str]:
    """Panoramas every ~20 m along the hand route, plus its start, intersections and destination."""
    points = [START, INT1, INT2, DEST]
    for a, b in ((START, INT1), (INT1, INT2), (INT2, DEST)):
        n = int(geo.distance_m(a, b) // 20)
        points += [geo.interpolate(a, b, i / n) for i in range(1, n)]
    return {(round(p[0], 7), round(p[1], 7)): f"pano{i:03d}" for i, p in enumerate(points)}


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "release", [hand_route()], hand_panos(), rotation_of=lambda i: (37.0 * i) % 360)


def test_perspective_view_geometry():
    for rotation in (0.0, 30.0, 200.0):
        pano = quadrant_pano(rotation, width=360, height=180)
        for heading, quadrant in ((0, 0), (90, 1), (180, 2), (270, 3), (350, 0), (100, 1)):
            view = loader.perspective_view(pano, heading=heading, rotation=rotation, size=32)
            assert view.shape == (32, 32, 3)
            assert (view[16, 16] == QUADRANT_RGB[quadrant]).all()
        # a 90-degree view facing north-east: its left half is north, its right half east
        view = loader.perspective_view(pano, heading=45.0, rotation=rotation, size=32)
        assert (view[16, 4] == QUADRANT_RGB[0]).all() and (view[16, 27] == QUADRANT_RGB[1]).all()


def test_released_data_vl_episode(release):
    env = make("virl-vl", split="train", data_dir=str(release), view_size=32, drop_rate=0.0, seed=0)
    obs, info = env.reset(options={"route_idx": 0})
    img = np.asarray(obs["image"]).astype(int)
    assert img.shape == (69, 69, 3)
    # start heading 350 -> front north, right east, back south, left west (JPEG tolerance)
    for (r, c), quadrant in zip(((16, 16), (16, 53), (53, 16), (53, 53)), range(4)):
        assert np.abs(img[r, c] - QUADRANT_RGB[quadrant]).max() < 40
    assert (img[32:37, :] == 0).all() and (img[:, 32:37] == 0).all()  # separators
    wps = env.rail.waypoints
    assert all(w.pano_id is not None for w in wps)
    fwd = [w for w in wps if w.gt_action == "forward()"]
    assert fwd and all(w.geocode in hand_panos() for w in fwd)
    rewards = []
    while True:
        obs, reward, terminated, truncated, info = env.step(json.dumps({"action": info["gt_action"]}))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert info["is_success"] and set(rewards) == {1.0}


def test_relocation_filters_forward_points(release):
    env = make("virl-l", split="train", data_dir=str(release), drop_rate=0.0, seed=0)
    env.reset()
    legs = [(START, INT1), (INT1, INT2), (INT2, DEST)]
    fwd = [w for w in env.rail.waypoints if w.gt_action == "forward()"]
    for w in fwd:
        assert any(min(geo.distance_m(w.geocode, a), geo.distance_m(w.geocode, b)) > 8 for a, b in legs)
    no_reloc = make("virl-l", split="train", data_dir=str(release), drop_rate=0.0, relocation=False)
    no_reloc.reset()
    assert sum(w.gt_action == "forward()" for w in no_reloc.rail.waypoints) == 15
    assert all(w.pano_id is None for w in no_reloc.rail.waypoints)


def test_procedural_routes_roundtrip_through_the_release_format(tmp_path):
    rs = routes.visual_ood_set()
    root = tmp_path / "ood"
    root.mkdir()
    routes.save_route_infos(rs.routes, root / "route_infos.json")
    (root / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({}))
    loaded = loader.load_route_infos(root / "route_infos.json")
    assert loaded == [json.loads(json.dumps(r)) for r in rs.routes]
    proc = make("virl-l", split="ood-visual", seed=3)
    released = make("virl-l", split="ood-visual", data_dir=str(root), relocation=False, seed=3)
    for i in (0, 9, 17):
        a, _ = proc.reset(options={"route_idx": i})
        b, _ = released.reset(options={"route_idx": i})
        assert a["text"] == b["text"] and proc.rail == released.rail


def test_restricted_unpickler(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (os|posix)\.system"):
        loader.restricted_loads(pickle.dumps(Evil()))
    assert not marker.exists()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({(1.0, 2.0): Evil()}))
    with pytest.raises(EnvError, match=r"evil\.pkl: refusing to load global"):
        loader.load_gps_pano_mapping(path)
    assert not marker.exists()
    plain = {(40.7, -74.0): "abc", (40.8, -73.9): "def", "nested": [1, 2.5, (3, None), {"x": "y"}, True, -(2**70)]}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert loader.restricted_loads(pickle.dumps(plain, protocol=protocol)) == plain
    with_bytes = {"b": b"\x00y", "s": frozenset()}  # protocols < 3 / < 4 would need globals for these
    assert loader.restricted_loads(pickle.dumps(with_bytes, protocol=4)) == with_bytes
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(EnvError, match="not a readable pickle"):
        loader.load_pickle_restricted(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(EnvError, match="expected a dict"):
        loader.load_gps_pano_mapping(path)


def test_route_file_errors_name_file_route_and_key(tmp_path):
    bad = hand_route()
    del bad["start_place"]["relocated_geocode"]
    root = write_release(tmp_path / "r1", [hand_route(), bad], {})
    with pytest.raises(EnvError, match=r"route_infos\.json: route 1: missing key 'start_place\.relocated_geocode'"):
        make("virl-l", data_dir=str(root))
    (root / "route_infos.json").write_text(json.dumps([[hand_route()], 5]))
    with pytest.raises(EnvError, match="route_num is 5 but the file holds 1 routes"):
        make("virl-l", data_dir=str(root))
    (root / "route_infos.json").write_text(json.dumps({"routes": []}))
    with pytest.raises(EnvError, match=r"expected a JSON array \[route_list, route_num\]"):
        make("virl-l", data_dir=str(root))
    (root / "route_infos.json").unlink()
    with pytest.raises(EnvError, match="route file not found: .*route_infos.json"):
        make("virl-l", data_dir=str(root))
    with pytest.raises(EnvError, match="data_dir is not a folder"):
        make("virl-l", data_dir=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("depth", [100_000, 65])
def test_deeply_nested_route_file_is_one_env_error(tmp_path, depth):
    """100,000 levels raised a raw RecursionError from json; 65 parse but are refused before any check
    recurses into them."""
    root = write_release(tmp_path / "r", [hand_route()], {})
    (root / "route_infos.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(EnvError, match=r"route_infos\.json: not valid JSON here \(values nested deeper than 64\)"):
        make("virl-vl", data_dir=str(root))


def test_oversized_or_unreadable_json_is_one_env_error(tmp_path, release, monkeypatch):
    monkeypatch.setattr(loader, "MAX_ROUTE_INFO_BYTES", 100)
    with pytest.raises(EnvError, match=r"route_infos\.json: [\d,]+ bytes, more than the 100 this file may hold"):
        make("virl-l", data_dir=str(release))
    monkeypatch.undo()
    (release / "route_infos.json").unlink()
    (release / "route_infos.json").mkdir()
    with pytest.raises(EnvError, match=r"route_infos\.json: cannot be read"):
        make("virl-l", data_dir=str(release))
    (release / "street_views" / "pano001.metadata.json").write_text('{"rotation": NaN}')
    loader._load_panorama.cache_clear()
    with pytest.raises(EnvError, match=r"pano001\.metadata\.json: 'rotation' must be a finite number, got nan"):
        loader._load_panorama(str(release / "street_views"), "pano001")


def test_missing_panorama_errors_name_the_pano(release):
    (release / "street_views" / "pano000.jpg").unlink()  # the start's panorama
    env = make("virl-vl", data_dir=str(release), view_size=32)
    with pytest.raises(EnvError, match=r"pano id 'pano000' has no image: .*pano000\.jpg does not exist"):
        env.reset(options={"route_idx": 0})
    (release / "street_views" / "pano001.metadata.json").unlink()
    with pytest.raises(EnvError, match=r"pano id 'pano001' has no metadata"):
        loader.ReleasedData.from_dir(release).panorama("pano001")
    far = loader.ReleasedData.from_dir(release)
    with pytest.raises(EnvError, match="no panorama within 20 m of geocode"):
        far.observation((41.0, -74.0), 0.0, view_size=32)
    assert far.relocate((41.0, -74.0)) is None
    near = far.relocate((START[0] - 0.0001, START[1]))  # ~11 m south of the start panorama
    assert near == ((START[0], START[1]), "pano000")


def test_eval_split_subsamples_released_routes(tmp_path):
    route_list = []
    for i in range(60):
        r = hand_route()
        r["route_id"] = f"r{i}"
        route_list.append(r)
    root = write_release(tmp_path / "many", route_list, {})
    env = make("virl-l", split="id", data_dir=str(root))
    assert env.n_routes == 48
    assert [r["route_id"] for r in env.routes] == [f"r{i}" for i in routes.eval_indices(60)]
    assert routes.eval_indices(60) == sorted(random.Random(12).sample(range(60), 48))
    assert make("virl-l", split="train", data_dir=str(root)).n_routes == 60
