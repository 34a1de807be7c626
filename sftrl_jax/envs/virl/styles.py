"""City styles: street layout parameters, look (palette, facades, signage) and naming vocabulary.

The training city uses `TRAIN_STYLE`; the nine visual-OOD cities each use one of `OOD_STYLES`, which
differ from it in every visible respect (sky, road and facade colours, window pattern, sign shape,
sign font size and case) and in their landmark vocabulary, so "visual OOD" means a city that looks
and reads differently, as the paper's other-continent street views do.
"""

from __future__ import annotations

import dataclasses

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    # Street layout.
    block_m: tuple[float, float]  # block size along the two grid axes, metres
    rotation_deg: float  # grid rotation; 0 = streets run north-south / east-west
    jitter_m: float  # std of the random offset of each intersection
    remove_edge_p: float  # fraction of street segments removed (irregular, merged blocks)
    n_diagonals: int  # diagonal avenues cutting through blocks
    road_half_m: float  # half road width
    sidewalk_m: float  # sidewalk width; facades stand at road_half_m + sidewalk_m
    landmark_p: float  # probability that an intersection has a landmark
    # Look.
    sky: tuple[RGB, RGB]  # top, horizon
    road: RGB
    marking: RGB
    sidewalk: RGB
    facades: tuple[RGB, ...]
    window: RGB
    window_pattern: str  # grid | bands | tall | glass | shutters
    building_m: tuple[float, float]  # facade height range
    sign_shape: str  # rect | rounded | oval | banner
    sign_colors: tuple[tuple[RGB, RGB], ...]  # (background, text)
    sign_font_scale: float
    sign_upper: bool
    # Names.
    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    kinds: tuple[str, ...]  # landmark kinds ("Bakery", ...)
    street_suffixes: tuple[str, str, str]  # rows, columns, diagonals
    kind_first_p: float  # probability of "<Kind> <Name>" rather than "<Name> <Kind>"


_EN_ONSETS = ("b", "br", "c", "ch", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "w", "gr")
_EN_VOWELS = ("a", "e", "i", "o", "u", "ea", "oo", "ay")
_EN_CODAS = ("", "n", "r", "l", "s", "ck", "ft", "rd", "ton", "ley", "ford", "well")

TRAIN_STYLE = Style(
    name="metro",
    block_m=(240.0, 80.0),
    rotation_deg=29.0,
    jitter_m=6.0,
    remove_edge_p=0.06,
    n_diagonals=3,
    road_half_m=7.0,
    sidewalk_m=4.0,
    landmark_p=0.6,
    sky=((110, 150, 205), (200, 215, 230)),
    road=(70, 70, 74),
    marking=(235, 200, 60),
    sidewalk=(160, 155, 150),
    facades=((150, 75, 60), (120, 60, 50), (170, 150, 120), (90, 90, 100), (185, 110, 80), (110, 100, 90)),
    window=(45, 60, 80),
    window_pattern="grid",
    building_m=(14.0, 45.0),
    sign_shape="rect",
    sign_colors=(((20, 20, 20), (250, 250, 250)), ((160, 20, 30), (255, 255, 255)), ((250, 250, 245), (20, 20, 20))),
    sign_font_scale=1.0,
    sign_upper=False,
    onsets=_EN_ONSETS,
    vowels=_EN_VOWELS,
    codas=_EN_CODAS,
    kinds=(
        "Cafe",
        "Deli",
        "Pharmacy",
        "Bank",
        "Hotel",
        "Bakery",
        "Pizzeria",
        "Bookstore",
        "Gym",
        "Florist",
        "Diner",
        "Theater",
        "Laundromat",
        "Barbershop",
        "Bistro",
        "Market",
        "Library",
        "Gallery",
        "Tavern",
        "Hardware",
        "Bagels",
        "Grocery",
        "Optician",
        "Noodle Bar",
    ),  # fmt: skip
    street_suffixes=("Street", "Avenue", "Broadway"),
    kind_first_p=0.2,
)


def _ood(name: str, **kw) -> Style:
    return dataclasses.replace(TRAIN_STYLE, name=name, **kw)


OOD_STYLES: tuple[Style, ...] = (
    _ood(
        "riviera", block_m=(110.0, 95.0), rotation_deg=-12.0, jitter_m=9.0, n_diagonals=2,
        sky=((80, 160, 235), (220, 235, 245)), road=(120, 110, 100), marking=(245, 245, 240),
        sidewalk=(205, 190, 165), facades=((225, 170, 90), (230, 200, 150), (200, 120, 80), (240, 220, 180)),
        window=(60, 90, 70), window_pattern="shutters", building_m=(10.0, 22.0), sign_shape="banner",
        sign_colors=(((30, 70, 40), (245, 235, 200)), ((120, 30, 40), (250, 240, 220))), sign_font_scale=0.9,
        onsets=("v", "r", "m", "t", "l", "b", "g", "f", "s", "c"), vowels=("a", "e", "i", "o"),
        codas=("", "", "ll", "nt", "rr", "zz", "n"),
        kinds=("Trattoria", "Gelateria", "Osteria", "Enoteca", "Farmacia", "Panificio", "Albergo", "Libreria"),
        street_suffixes=("Via", "Corso", "Viale"), kind_first_p=0.8,
    ),
    _ood(
        "monsoon", block_m=(70.0, 60.0), rotation_deg=8.0, jitter_m=12.0, remove_edge_p=0.15, n_diagonals=1,
        sky=((200, 190, 160), (240, 230, 210)), road=(95, 85, 75), marking=(250, 250, 250),
        sidewalk=(180, 150, 110), facades=((240, 150, 60), (90, 170, 160), (230, 90, 120), (250, 220, 90)),
        window=(40, 40, 45), window_pattern="bands", building_m=(8.0, 20.0), sign_shape="rect",
        sign_colors=(((250, 210, 30), (200, 20, 20)), ((20, 90, 170), (255, 255, 255))), sign_font_scale=1.2,
        sign_upper=True, onsets=("r", "s", "sh", "k", "p", "d", "v", "m", "n", "g", "j"),
        vowels=("a", "aa", "i", "u", "ee", "o"), codas=("", "n", "r", "sh", "m", "l", "esh"),
        kinds=("Sweets", "Chemist", "Dhaba", "Textiles", "Jewellers", "Tailors", "Lodge", "Tea Stall"),
        street_suffixes=("Marg", "Road", "Chowk"), kind_first_p=0.1,
    ),
    _ood(
        "pampas", block_m=(120.0, 120.0), rotation_deg=0.0, jitter_m=3.0, n_diagonals=4,
        sky=((130, 180, 230), (225, 230, 235)), road=(60, 60, 60), marking=(255, 255, 255),
        sidewalk=(150, 140, 140), facades=((215, 215, 205), (190, 175, 160), (160, 170, 185), (225, 200, 185)),
        window=(30, 40, 50), window_pattern="tall", building_m=(15.0, 35.0), sign_shape="oval",
        sign_colors=(((250, 250, 250), (20, 60, 140)), ((20, 20, 20), (230, 200, 90))), sign_font_scale=1.0,
        onsets=("c", "d", "r", "m", "s", "b", "ll", "v", "p"), vowels=("a", "e", "o", "io", "ue"),
        codas=("", "s", "n", "l", "z", "do"),
        kinds=("Parrilla", "Confiteria", "Kiosco", "Heladeria", "Libreria", "Almacen", "Farmacia", "Cantina"),
        street_suffixes=("Calle", "Avenida", "Diagonal"), kind_first_p=0.7,
    ),
    _ood(
        "fogbank", block_m=(90.0, 130.0), rotation_deg=-35.0, jitter_m=14.0, remove_edge_p=0.12, n_diagonals=0,
        sky=((150, 155, 165), (200, 200, 205)), road=(55, 58, 60), marking=(250, 250, 250),
        sidewalk=(125, 125, 125), facades=((140, 60, 50), (230, 225, 215), (60, 70, 60), (180, 170, 150)),
        window=(230, 230, 220), window_pattern="grid", building_m=(9.0, 18.0), sign_shape="rounded",
        sign_colors=(((20, 40, 90), (240, 210, 120)), ((10, 60, 40), (240, 240, 230))), sign_font_scale=0.85,
        onsets=("wh", "st", "c", "b", "h", "th", "w", "k", "fr"), vowels=("i", "o", "ea", "ai", "e"),
        codas=("ck", "ll", "m", "ton", "ham", "bury", "wick"),
        kinds=("Arms", "Chemist", "Pub", "Newsagent", "Ironmonger", "Chippy", "Tea Room", "Tailor"),
        street_suffixes=("Lane", "Road", "Row"), kind_first_p=0.0,
    ),
    _ood(
        "harbour", block_m=(55.0, 75.0), rotation_deg=15.0, jitter_m=10.0, n_diagonals=1,
        sky=((70, 110, 150), (190, 200, 210)), road=(85, 85, 90), marking=(240, 240, 240),
        sidewalk=(140, 140, 150), facades=((190, 200, 210), (80, 90, 110), (210, 180, 150), (120, 140, 160)),
        window=(140, 190, 220), window_pattern="glass", building_m=(30.0, 80.0), sign_shape="rect",
        sign_colors=(((200, 20, 30), (255, 230, 60)), ((10, 10, 10), (80, 230, 120))), sign_font_scale=1.3,
        sign_upper=True, onsets=("w", "ch", "l", "k", "h", "s", "t", "y", "f"), vowels=("a", "o", "ing", "ui", "e"),
        codas=("", "ng", "n", "k", "m"),
        kinds=("Noodle House", "Tea House", "Dim Sum", "Herbalist", "Goldsmith", "Bakehouse", "Mart", "Clinic"),
        street_suffixes=("Street", "Road", "Terrace"), kind_first_p=0.0,
    ),
    _ood(
        "laneway", block_m=(180.0, 60.0), rotation_deg=21.0, jitter_m=4.0, n_diagonals=2,
        sky=((100, 170, 225), (230, 235, 240)), road=(75, 75, 70), marking=(250, 250, 250),
        sidewalk=(175, 160, 145), facades=((190, 100, 60), (80, 130, 140), (220, 210, 190), (60, 60, 60)),
        window=(25, 30, 35), window_pattern="tall", building_m=(12.0, 40.0), sign_shape="rounded",
        sign_colors=(((240, 240, 230), (160, 30, 30)), ((30, 30, 30), (240, 180, 40))), sign_font_scale=0.95,
        onsets=("m", "b", "k", "w", "g", "t", "f", "n", "j"), vowels=("a", "e", "i", "oo", "ar"),
        codas=("", "n", "ra", "ley", "ong", "dle"),
        kinds=("Espresso Bar", "Milk Bar", "Roastery", "Op Shop", "Bottle Shop", "Newsagency", "Pho", "Chemist"),
        street_suffixes=("Street", "Parade", "Place"), kind_first_p=0.0,
    ),
    _ood(
        "savanna", block_m=(100.0, 85.0), rotation_deg=-5.0, jitter_m=15.0, remove_edge_p=0.18, n_diagonals=2,
        sky=((140, 190, 230), (240, 230, 200)), road=(110, 90, 75), marking=(240, 240, 240),
        sidewalk=(190, 140, 100), facades=((240, 240, 235), (90, 160, 90), (240, 180, 60), (60, 120, 200)),
        window=(50, 50, 60), window_pattern="bands", building_m=(6.0, 16.0), sign_shape="banner",
        sign_colors=(((0, 120, 60), (255, 255, 255)), ((250, 200, 0), (30, 30, 30))), sign_font_scale=1.15,
        sign_upper=True, onsets=("ad", "ol", "b", "k", "t", "y", "f", "g", "ch"), vowels=("a", "e", "u", "o", "i"),
        codas=("", "de", "mi", "la", "yo", "n"),
        kinds=("Buka", "Provisions", "Patent Stores", "Salon", "Suya Spot", "Phone Centre", "Fashion House", "Eatery"),
        street_suffixes=("Street", "Way", "Close"), kind_first_p=0.1,
    ),
    _ood(
        "bayside", block_m=(75.0, 140.0), rotation_deg=-8.0, jitter_m=5.0, n_diagonals=1,
        sky=((120, 175, 225), (235, 220, 205)), road=(65, 65, 70), marking=(240, 240, 240),
        sidewalk=(190, 185, 175), facades=((240, 235, 225), (170, 200, 220), (240, 200, 190), (200, 220, 180)),
        window=(70, 80, 90), window_pattern="tall", building_m=(9.0, 20.0), sign_shape="oval",
        sign_colors=(((30, 90, 130), (255, 255, 255)), ((240, 240, 240), (200, 60, 40))), sign_font_scale=0.9,
        onsets=("s", "m", "v", "p", "l", "c", "t", "fr"), vowels=("a", "e", "io", "o", "ie"),
        codas=("", "sa", "to", "no", "ra", "l"),
        kinds=("Taqueria", "Creamery", "Coffee Roasters", "Record Store", "Sourdough", "Cycle Shop", "Bodega", "Inn"),
        street_suffixes=("Street", "Avenue", "Boulevard"), kind_first_p=0.0,
    ),
    _ood(
        "uptown", block_m=(260.0, 85.0), rotation_deg=29.0, jitter_m=5.0, n_diagonals=2,
        sky=((170, 120, 110), (240, 200, 160)), road=(50, 50, 55), marking=(255, 255, 255),
        sidewalk=(120, 115, 120), facades=((60, 60, 70), (150, 150, 160), (100, 80, 70), (200, 200, 190)),
        window=(250, 220, 130), window_pattern="glass", building_m=(25.0, 90.0), sign_shape="rounded",
        sign_colors=(((250, 120, 20), (20, 20, 20)), ((240, 240, 240), (20, 80, 160))), sign_font_scale=1.1,
        onsets=("j", "v", "q", "z", "x", "k", "br", "pl"), vowels=("a", "o", "y", "ae", "u"),
        codas=("x", "z", "q", "rk", "sh"),
        kinds=("Steakhouse", "Ramen Bar", "Juice Bar", "Pawn Shop", "Cinema", "Arcade", "Tattoo Studio", "Spa"),
        street_suffixes=("Street", "Avenue", "Way"), kind_first_p=0.0,
    ),
)  # fmt: skip
