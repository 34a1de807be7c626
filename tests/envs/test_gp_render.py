"""GP-VL rendering: geometry of the reference, suit colours, determinism."""

from __future__ import annotations

import numpy as np

from sftrl_jax import envs
from sftrl_jax.envs.general_points import render


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)


def test_geometry():
    assert (render.CARD_W, render.CARD_H, render.CARD_Y) == (270, 378, 411)
    assert render.CARD_X == (5, 302, 599, 896)
    img = render.render_cards([1, 7, 10, 13], ["S", "C", "S", "C"])
    assert img.mode == "RGB" and img.size == (1200, 1200)
    px = _pixels(img)
    inside = np.zeros(px.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in render.CARD_BOXES:
        inside[y0:y1, x0:x1] = True
        # card body is white just inside the left edge at mid height
        assert tuple(px[(y0 + y1) // 2, x0 + 6]) == (255, 255, 255)
    assert (px[~inside] == render.BACKGROUND).all()  # nothing drawn outside the four boxes
    assert (px[inside] != render.BACKGROUND).any(axis=-1).mean() > 0.97  # the boxes are covered


def test_suit_colours():
    black = _pixels(render.render_cards([2, 5, 9, 12], ["S", "C", "S", "C"]))
    red = _pixels(render.render_cards([2, 5, 9, 12], ["H", "D", "H", "D"]))
    is_red = lambda p: (p[..., 0] > 150) & (p[..., 1] < 90) & (p[..., 2] < 90)
    is_dark = lambda p: p.max(axis=-1) < 60
    assert is_red(red).sum() > 5000 and is_red(black).sum() == 0
    assert is_dark(black).sum() > 5000 and is_dark(red).sum() == 0
    assert not np.array_equal(black, red)


def test_ranks_look_different():
    images = [_pixels(render.render_cards([r], ["S"])) for r in range(1, 14)]
    for i in range(13):
        for j in range(i + 1, 13):
            assert not np.array_equal(images[i], images[j])


def test_deterministic():
    a = render.render_cards([1, 3, 13, 10], ["S", "H", "C", "D"]).tobytes()
    b = render.render_cards([1, 3, 13, 10], ["S", "H", "C", "D"]).tobytes()
    render.card_face.cache_clear()
    c = render.render_cards([1, 3, 13, 10], ["S", "H", "C", "D"]).tobytes()
    assert a == b == c


def test_env_image_is_the_hand():
    env = envs.make("gp-vl", split="ood-visual")
    obs, info = env.reset(seed=4)
    ranks = {"A": 1, "J": 11, "Q": 12, "K": 13}
    expect = render.render_cards([ranks.get(c) or int(c) for c in info["cards"]], info["suits"])
    assert obs["image"].tobytes() == expect.tobytes()
    obs2, _ = env.reset(seed=4)
    assert obs2["image"].tobytes() == obs["image"].tobytes()
