"""A hand-built V-IRL route (released format) shared by the V-IRL tests.

Start at (40, -74) facing 350 degrees; leg 0 runs ~200 m north (heading string 10.00, so the
reference's no-wrap rule calls the first turn "left" where the wrapped rule says "slightly right"),
leg 1 ~170 m east, leg 2 ~140 m north-east to the destination.
"""

from __future__ import annotations

import json

from sftrl_jax.envs.virl import routes

START = (40.0, -74.0)
INT1 = (40.0018, -74.0)
INT2 = (40.0018, -73.998)
DEST = (40.0027, -73.99682)

INSTRUCTIONS = [
    "First, turn left to face north.",
    "Move forward until you reach next intersection where Hotel Aurora is on your right front.",
    "Turn right to face east.",
    "Move forward until you reach next intersection.",
    "Turn slightly left to face northeast.",
    "Move forward until you reach destination where Blue Door Cafe is on your left.",
]


def hand_route() -> dict:
    blocks = [
        {
            "intersection_idx": 0,
            "landmarks": "Hotel Aurora is on your right front",
            "distance": "200 meters",
            "human_heading": "350.00",
            "to_next_intersection_heading": "10.00 (north)",
        },
        {
            "intersection_idx": 1,
            "landmarks": "No landmark nearby",
            "distance": "170 meters",
            "human_heading": "10.00",
            "to_next_intersection_heading": "90.00 (east)",
        },
        {
            "intersection_idx": 2,
            "landmarks": "Blue Door Cafe is on your left",
            "distance": "140 meters",
            "human_heading": "90.00",
            "to_next_intersection_heading": "45.00 (northeast)",
        },
    ]
    return {
        "route_id": "hand-0",
        "start_place": {"name": "start", "relocated_geocode": list(START)},
        "init_heading": 350,
        "dest_place": {"name": "Blue Door Cafe", "geocode": list(DEST)},
        "route_results": {"geocode_list": [list(INT1), list(INT2), list(DEST)], "landmark_list": []},
        "milestone_info": routes.format_milestones(blocks),
    }


def answer(action: str, observation: str = "No landmarks nearby; ", instruction: str = "") -> str:
    return json.dumps({"current observation": observation, "current instruction": instruction, "action": action})
