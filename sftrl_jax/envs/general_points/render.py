"""GP-VL image: four procedurally drawn cards on a casino-green 1200x1200 table.

Geometry follows the reference (SPEC §1.4): cards 270x378 px, left edges at x = 5 + 297*i, top at
y = 411, background #35654d. The cards themselves are drawn here (no image assets): a white rounded
card, the rank in two opposite corners with a small suit, pips laid out as on real cards for A..10 and
a framed large letter for J/Q/K. Suits are polygons and ellipses; spades and clubs black, hearts and
diamonds red. Each of the 52 card faces is drawn once (2x supersampled, then downsized) and cached,
so an image costs one canvas and four pastes. The output depends only on the hand.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from sftrl_jax.envs.general_points import cards as cards_lib

CANVAS_SIZE = 1200
BACKGROUND = (0x35, 0x65, 0x4D)  # '#35654d'
CARD_W = int(CANVAS_SIZE / 4 * 0.9)  # 270
CARD_H = int(CARD_W * 7 / 5)  # 378
CARD_Y = (CANVAS_SIZE - CARD_H) // 2  # 411
CARD_X = tuple(5 + int(i * CARD_W * 1.1) for i in range(4))  # 5, 302, 599, 896
CARD_BOXES = tuple((x, CARD_Y, x + CARD_W, CARD_Y + CARD_H) for x in CARD_X)
RED = (200, 16, 32)
BLACK = (0, 0, 0)
CARD_WHITE = (255, 255, 255)
_EDGE = (150, 150, 150)
_SS = 2  # supersampling factor

# Pip centres in the pip box, (x, y) in [0, 1]; pips below the middle are drawn upside down.
_L, _M, _R = 0.0, 0.5, 1.0
_PIPS = {
    1: [(_M, 0.5)],
    2: [(_M, 0.0), (_M, 1.0)],
    3: [(_M, 0.0), (_M, 0.5), (_M, 1.0)],
    4: [(_L, 0.0), (_R, 0.0), (_L, 1.0), (_R, 1.0)],
    5: [(_L, 0.0), (_R, 0.0), (_M, 0.5), (_L, 1.0), (_R, 1.0)],
    6: [(_L, 0.0), (_R, 0.0), (_L, 0.5), (_R, 0.5), (_L, 1.0), (_R, 1.0)],
    7: [(_L, 0.0), (_R, 0.0), (_M, 0.25), (_L, 0.5), (_R, 0.5), (_L, 1.0), (_R, 1.0)],
    8: [(_L, 0.0), (_R, 0.0), (_M, 0.25), (_L, 0.5), (_R, 0.5), (_M, 0.75), (_L, 1.0), (_R, 1.0)],
    9: [(x, y) for y in (0.0, 1 / 3, 2 / 3, 1.0) for x in (_L, _R)] + [(_M, 0.5)],
    10: [(x, y) for y in (0.0, 1 / 3, 2 / 3, 1.0) for x in (_L, _R)] + [(_M, 1 / 6), (_M, 5 / 6)],
}


def suit_color(suit: str) -> tuple[int, int, int]:
    return RED if suit in cards_lib.RED_SUITS else BLACK


def draw_suit(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, size: float, fill, *, flip=False) -> None:
    """One suit symbol of height ~`size` centred at (cx, cy); `flip` turns it upside down."""
    s = size / 2
    sign = -1 if flip else 1

    def pt(dx: float, dy: float) -> tuple[float, float]:
        return cx + dx * s, cy + sign * dy * s

    def disc(dx: float, dy: float, r: float) -> None:
        x, y = pt(dx, dy)
        draw.ellipse((x - r * s, y - r * s, x + r * s, y + r * s), fill=fill)

    if suit == "D":
        draw.polygon([pt(0, -1), pt(0.72, 0), pt(0, 1), pt(-0.72, 0)], fill=fill)
    elif suit == "H":
        disc(-0.45, -0.4, 0.5)
        disc(0.45, -0.4, 0.5)
        draw.polygon([pt(-0.93, -0.22), pt(0.93, -0.22), pt(0, 1)], fill=fill)
    elif suit == "S":
        disc(-0.45, 0.25, 0.48)
        disc(0.45, 0.25, 0.48)
        draw.polygon([pt(-0.92, 0.1), pt(0.92, 0.1), pt(0, -1)], fill=fill)
        draw.polygon([pt(0, 0.3), pt(0.35, 1), pt(-0.35, 1)], fill=fill)
    elif suit == "C":
        disc(0, -0.48, 0.42)
        disc(-0.5, 0.15, 0.42)
        disc(0.5, 0.15, 0.42)
        disc(0, 0.05, 0.25)
        draw.polygon([pt(0, 0.0), pt(0.35, 1), pt(-0.35, 1)], fill=fill)
    else:
        raise ValueError(f"unknown suit {suit!r}")


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _corner_layer(rank: int, suit: str, w: int, h: int) -> Image.Image:
    """Transparent card-sized layer with the rank and a small suit in the top-left corner."""
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    color = suit_color(suit)
    text = cards_lib.symbol(rank)
    font = _font(46 * _SS)
    cx = 30 * _SS
    draw.text((cx, 12 * _SS), text, font=font, fill=color, anchor="mt")
    draw_suit(draw, suit, cx, 84 * _SS, 30 * _SS, color)
    return layer


@functools.lru_cache(maxsize=64)
def card_face(rank: int, suit: str) -> Image.Image:
    """RGBA image CARD_W x CARD_H of one card (transparent outside its rounded corners). Cached."""
    w, h = CARD_W * _SS, CARD_H * _SS
    card = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(card)
    draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=18 * _SS, fill=CARD_WHITE, outline=_EDGE, width=2 * _SS)
    color = suit_color(suit)
    if rank in _PIPS:
        pip = (0.36 if rank == 1 else 0.17) * w
        x0, x1, y0, y1 = 0.3 * w, 0.7 * w, 0.2 * h, 0.8 * h
        if rank == 1:
            x0, x1, y0, y1 = 0.5 * w, 0.5 * w, 0.5 * h, 0.5 * h
        for fx, fy in _PIPS[rank]:
            draw_suit(draw, suit, x0 + fx * (x1 - x0), y0 + fy * (y1 - y0), pip, color, flip=fy > 0.5)
    else:  # J, Q, K: a frame with a large letter and a suit above and below it
        draw.rectangle((0.2 * w, 0.15 * h, 0.8 * w, 0.85 * h), outline=color, width=3 * _SS)
        draw.text((0.5 * w, 0.5 * h), cards_lib.symbol(rank), font=_font(120 * _SS), fill=color, anchor="mm")
        draw_suit(draw, suit, 0.5 * w, 0.25 * h, 0.12 * w, color)
        draw_suit(draw, suit, 0.5 * w, 0.75 * h, 0.12 * w, color, flip=True)
    corner = _corner_layer(rank, suit, w, h)
    card.alpha_composite(corner)
    card.alpha_composite(corner.rotate(180))
    return card.resize((CARD_W, CARD_H), Image.Resampling.LANCZOS)


def render_cards(ranks: Sequence[int], suits: Sequence[str]) -> Image.Image:
    """The 1200x1200 RGB table image with the cards left to right."""
    if len(ranks) != len(suits) or len(ranks) > len(CARD_X):
        raise ValueError(f"need up to 4 cards with one suit each, got ranks {list(ranks)} and suits {list(suits)}")
    canvas = Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), BACKGROUND)
    for x, rank, suit in zip(CARD_X, ranks, suits):
        face = card_face(int(rank), suit)
        canvas.paste(face, (x, CARD_Y), mask=face)
    return canvas


def render_hand(hand: cards_lib.Hand) -> Image.Image:
    return render_cards(hand.ranks, hand.suits)
