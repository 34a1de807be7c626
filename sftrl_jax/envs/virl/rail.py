"""From a route dict to the instruction list and the "rail" of waypoints the agent is walked along.

SPEC.md §2.3. For milestone k (leg k) with heading h_k and compass word c_k, the relative word rel_k
compares h_k with h_{k-1} (the initial heading for k = 0). Instructions, numbered from 1:

    First, turn <rel_0> to face <c_0>.                       (later legs: "Turn <rel_k> to face <c_k>.")
    Move forward until you reach next intersection where <landmark_k>.   (or "... next intersection.")
    ...
    Move forward until you reach destination where <landmark_last>.      (or "... destination.")

Waypoints: the start (answer: the first turn), then per leg `straight_line_length` evenly spaced points
strictly inside the leg, each kept with probability 1 - drop_rate (answer `forward()`), then the leg's
end: an intersection (answer: the next turn) or the destination (answer `stop()`). Legs of 5 m or less
get no forward points. With relocation, a forward point is snapped to the nearest panorama and kept
only if that panorama is more than 8 m from both ends of the leg.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any

from sftrl_jax.envs.virl import geo
from sftrl_jax.envs.virl.routes import parse_route

NO_LANDMARKS = "No landmarks nearby"  # text observation of the start and forward points
AT_INTERSECTION = "You observe an intersection"
MIN_LEG_M = 5.0
MIN_END_DISTANCE_M = 8.0

FORWARD = "forward()"
STOP = "stop()"

# (lat, lng) -> ((lat, lng) of the nearest panorama, panorama id), or None if none is near enough.
Relocate = Callable[[geo.LatLng], "tuple[geo.LatLng, str] | None"]


def turn_action(word: str) -> str:
    return f"turn_direction({word})"


@dataclasses.dataclass(frozen=True)
class Waypoint:
    geocode: geo.LatLng
    heading: float  # the direction the agent faces while observing this waypoint
    gt_action: str
    landmark_obs: str
    intersection_obs: str
    instruction_idx: int  # 0-based index into Rail.instructions of the sentence to carry out here
    pano_id: str | None = None  # released data only

    @property
    def observation(self) -> str:
        """The oracle text observation, e.g. 'No landmarks nearby; ' (SPEC.md §2.4)."""
        return f"{self.landmark_obs}; {self.intersection_obs}"

    @property
    def is_intersection(self) -> bool:
        return bool(self.intersection_obs)


@dataclasses.dataclass(frozen=True)
class Rail:
    instructions: tuple[str, ...]
    waypoints: tuple[Waypoint, ...]
    init_heading: float

    @property
    def instruction_text(self) -> str:
        return "\n".join(f"{i + 1}. {s}" for i, s in enumerate(self.instructions))


def _has_landmark(text: str) -> bool:
    return bool(text) and not text.lower().startswith("no landmark")


def instructions_for(compass: list[str], relative: list[str], landmarks: list[str]) -> list[str]:
    """The instruction sentences (without numbers) for legs with these words and end landmarks."""
    out = []
    last = len(compass) - 1
    for k, (c, rel, lm) in enumerate(zip(compass, relative, landmarks)):
        out.append(f"{'First, turn' if k == 0 else 'Turn'} {rel} to face {c}.")
        target = "destination" if k == last else "next intersection"
        out.append(
            f"Move forward until you reach {target} where {lm}."
            if _has_landmark(lm)
            else f"Move forward until you reach {target}."
        )
    return out


def build_rail(
    route: Mapping[str, Any],
    *,
    rng: random.Random,
    absolute_action: bool = True,
    drop_rate: float = 0.5,
    straight_line_length: int = 5,
    wrap_turns: bool = False,
    relocate: Relocate | None = None,
    where: str = "route",
) -> Rail:
    """Builds the rail of one route (see the module docstring). Draws from `rng`: the initial heading
    when the route has none, then one keep/drop draw per interpolated point in order."""
    parsed = parse_route(route, where=where)
    init_heading = parsed.init_heading if parsed.init_heading is not None else float(rng.randint(0, 359))
    ms = parsed.milestones
    headings = [m.heading for m in ms]
    compass = [m.compass for m in ms]
    relative = [
        geo.relative_turn_word(h, init_heading if k == 0 else headings[k - 1], wrap=wrap_turns)
        for k, h in enumerate(headings)
    ]
    landmarks = [m.landmarks for m in ms]
    instructions = instructions_for(compass, relative, landmarks)
    gt_turn = [turn_action(c if absolute_action else r) for c, r in zip(compass, relative)]

    def snap(p: geo.LatLng) -> tuple[geo.LatLng, str | None]:
        if relocate is None:
            return p, None
        r = relocate(p)
        return (p, None) if r is None else r

    start, start_pano = snap(parsed.start)
    waypoints = [Waypoint(start, init_heading, gt_turn[0], NO_LANDMARKS, "", 0, start_pano)]
    prev = parsed.start
    last = len(ms) - 1
    for k, end in enumerate(parsed.geocodes):
        if geo.distance_m(prev, end) > MIN_LEG_M:
            for i in range(1, straight_line_length + 1):
                keep = rng.random() >= drop_rate
                point = geo.interpolate(prev, end, i / (straight_line_length + 1))
                pano = None
                if relocate is not None:
                    r = relocate(point)
                    if r is None:
                        continue
                    point, pano = r
                    if min(geo.distance_m(point, prev), geo.distance_m(point, end)) <= MIN_END_DISTANCE_M:
                        continue
                if keep:
                    waypoints.append(Waypoint(point, headings[k], FORWARD, NO_LANDMARKS, "", 2 * k + 1, pano))
        geocode, pano = snap(end)
        if k < last:
            waypoints.append(
                Waypoint(geocode, headings[k], gt_turn[k + 1], landmarks[k], AT_INTERSECTION, 2 * k + 2, pano)
            )
        else:
            waypoints.append(Waypoint(geocode, headings[k], STOP, landmarks[k], "", 2 * k + 1, pano))
        prev = end
    return Rail(
        instructions=tuple(instructions),
        waypoints=tuple(waypoints),
        init_heading=init_heading,
    )
