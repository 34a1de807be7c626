"""V-IRL geometry words, route format, instructions and rail construction (SPEC.md §2.3)."""

from __future__ import annotations

import random

import pytest

from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import geo, rail, routes
from tests.envs.virl_fixtures import INSTRUCTIONS, INT1, START, hand_route


def test_compass_and_side_words():
    assert [geo.compass_word(h) for h in (0, 22.4, 22.5, 90, 135, 180, 225, 270, 315, 337.5, 359.9)] == [
        "north", "north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest",
        "north", "north",
    ]  # fmt: skip
    assert geo.side_word(90, 90) == "front"
    assert geo.side_word(90, 135) == "right front"
    assert geo.side_word(90, 180) == "right"
    assert geo.side_word(90, 225) == "right behind"
    assert geo.side_word(90, 270) == "behind"
    assert geo.side_word(90, 315) == "left behind"
    assert geo.side_word(90, 0) == "left"
    assert geo.side_word(90, 45) == "left front"


def test_relative_turn_word_reference_quirk_and_fixed_variant():
    rel = geo.relative_turn_word
    assert [rel(h, 100) for h in (0, 54.9, 55, 100, 100.1, 145, 145.1)] == [
        "left", "left", "slightly left", "slightly left", "slightly right", "slightly right", "right",
    ]  # fmt: skip
    assert rel(10, 350) == "left"  # reference: delta = -340, no wrap
    assert rel(10, 350, wrap=True) == "slightly right"
    assert rel(350, 10) == "right"
    assert rel(350, 10, wrap=True) == "slightly left"
    assert rel(270, 0, wrap=True) == "left"


def test_bearing_and_distance():
    assert geo.bearing(START, INT1) == pytest.approx(0.0, abs=1e-6)
    assert geo.bearing(INT1, START) == pytest.approx(180.0, abs=1e-6)
    assert geo.bearing((0, 0), (0, 0.001)) == pytest.approx(90.0, abs=1e-6)
    assert geo.distance_m(START, INT1) == pytest.approx(200.15, abs=0.1)  # 0.0018 deg of latitude
    frame = geo.LocalFrame((40.0, -74.0))
    x, y = frame.to_xy((40.001, -73.999))
    assert frame.to_latlng((x, y)) == pytest.approx((40.001, -73.999))
    assert geo.xy_heading(1, 0) == pytest.approx(90.0)


def test_milestones_roundtrip_and_parse():
    route = hand_route()
    parsed = routes.parse_route(route)
    assert [m.heading for m in parsed.milestones] == [10.0, 90.0, 45.0]
    assert [m.compass for m in parsed.milestones] == ["north", "east", "northeast"]
    assert parsed.milestones[0].landmarks == "Hotel Aurora is on your right front"
    assert parsed.init_heading == 350.0
    assert parsed.geocodes[0] == INT1


def test_instruction_text_for_hand_built_route():
    r = rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=0.0)
    assert list(r.instructions) == INSTRUCTIONS
    assert r.instruction_text.splitlines()[0] == "1. First, turn left to face north."
    assert r.instruction_text.splitlines()[5].startswith("6. Move forward until you reach destination where")
    fixed = rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=0.0, wrap_turns=True)
    assert fixed.instructions[0] == "First, turn slightly right to face north."


def test_rail_waypoints_with_drop_rate_zero():
    r = rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=0.0, straight_line_length=5)
    wps = r.waypoints
    assert len(wps) == 1 + 3 * (5 + 1)
    actions = [w.gt_action for w in wps]
    assert actions == (
        ["turn_direction(north)"] + ["forward()"] * 5 + ["turn_direction(east)"] + ["forward()"] * 5
        + ["turn_direction(northeast)"] + ["forward()"] * 5 + ["stop()"]
    )  # fmt: skip
    assert wps[0].observation == "No landmarks nearby; "
    assert wps[0].geocode == START and wps[0].heading == 350.0
    assert wps[6].observation == "Hotel Aurora is on your right front; You observe an intersection"
    assert wps[6].geocode == INT1 and wps[6].heading == 10.0
    assert wps[12].observation == "No landmark nearby; You observe an intersection"
    assert wps[-1].observation == "Blue Door Cafe is on your left; "
    assert [w.instruction_idx for w in wps] == [0] + [1] * 5 + [2] + [3] * 5 + [4] + [5] * 5 + [5]
    # forward points are evenly spaced strictly inside the leg
    lats = [w.geocode[0] for w in wps[1:6]]
    assert lats == pytest.approx([40.0 + 0.0018 * i / 6 for i in range(1, 6)])
    assert rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=0.0, straight_line_length=2).waypoints[
        1
    ].geocode == pytest.approx((40.0006, -74.0))


def test_rail_drop_rate_statistics():
    counts = []
    for seed in range(400):
        r = rail.build_rail(hand_route(), rng=random.Random(seed), drop_rate=0.5)
        counts.append(sum(w.gt_action == "forward()" for w in r.waypoints))
        assert sum(w.is_intersection for w in r.waypoints) == 2  # intersections are never dropped
        assert r.waypoints[-1].gt_action == "stop()"
    mean_kept = sum(counts) / (400 * 15)
    assert abs(mean_kept - 0.5) < 0.03  # binomial sd over 6000 draws is 0.0065
    assert min(counts) < 5 < max(counts)
    none = rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=1.0)
    assert len(none.waypoints) == 4


def test_both_action_spaces_same_route():
    ab = rail.build_rail(hand_route(), rng=random.Random(3), drop_rate=0.5, absolute_action=True)
    rel = rail.build_rail(hand_route(), rng=random.Random(3), drop_rate=0.5, absolute_action=False)
    assert ab.instructions == rel.instructions
    assert [w.geocode for w in ab.waypoints] == [w.geocode for w in rel.waypoints]
    turns_ab = [w.gt_action for w in ab.waypoints if w.gt_action.startswith("turn")]
    turns_rel = [w.gt_action for w in rel.waypoints if w.gt_action.startswith("turn")]
    assert turns_ab == ["turn_direction(north)", "turn_direction(east)", "turn_direction(northeast)"]
    assert turns_rel == ["turn_direction(left)", "turn_direction(right)", "turn_direction(slightly left)"]
    assert [w.gt_action for w in ab.waypoints if not w.gt_action.startswith("turn")] == [
        w.gt_action for w in rel.waypoints if not w.gt_action.startswith("turn")
    ]


def test_short_leg_gets_no_forward_points_and_missing_heading_is_drawn():
    route = hand_route()
    route["route_results"]["geocode_list"][1] = [INT1[0], INT1[1] + 0.00004]  # ~3.4 m from INT1
    del route["init_heading"]
    r = rail.build_rail(route, rng=random.Random(0), drop_rate=0.0)
    assert len(r.waypoints) == 1 + 6 + 1 + 6
    assert r.init_heading == float(random.Random(0).randint(0, 359))


def test_relocation_snaps_and_filters_points_near_leg_ends():
    # panoramas every ~22 m along leg 0 only: points near INT1 (and START) snap too close to the ends
    panos = [(40.0 + 0.0002 * i, -74.0) for i in range(10)]

    def relocate(p):
        best = min(panos, key=lambda q: geo.distance_m(p, q))
        return (best, f"p{panos.index(best)}") if geo.distance_m(p, best) <= 20 else None

    r = rail.build_rail(hand_route(), rng=random.Random(0), drop_rate=0.0, relocate=relocate)
    fwd = [w for w in r.waypoints if w.gt_action == "forward()"]
    assert all(w.pano_id is not None for w in fwd)
    assert all(min(geo.distance_m(w.geocode, START), geo.distance_m(w.geocode, INT1)) > 8 for w in fwd)
    assert len(fwd) == 5  # legs 1 and 2 have no panorama within 20 m: all their points go
    assert r.waypoints[0].pano_id == "p0"


def test_route_errors_name_the_key():
    route = hand_route()
    del route["route_results"]["geocode_list"]
    with pytest.raises(EnvError, match=r"route 7: missing key 'route_results.geocode_list'"):
        rail.build_rail(route, rng=random.Random(0), where="route 7")
    route = hand_route()
    route["milestone_info"] = route["milestone_info"].replace('"to_next_intersection_heading"', '"heading_x"')
    with pytest.raises(EnvError, match="to_next_intersection_heading"):
        routes.parse_route(route)
    route = hand_route()
    route["route_results"]["geocode_list"].pop()
    with pytest.raises(EnvError, match="3 blocks but route_results.geocode_list has 2"):
        routes.parse_route(route)


def test_procedural_routes_follow_the_format():
    rs = routes.visual_ood_set()
    assert len(rs.routes) == 18 and len(rs.cities) == 9
    assert len({c.style.name for c in rs.cities.values()}) == 9
    for route in rs.routes:
        parsed = routes.parse_route(route)
        assert 2 <= len(parsed.geocodes) - 1 <= 8
        assert parsed.milestones[-1].landmarks.startswith(route["dest_place"]["name"])
        assert route["city"] in rs.cities
        r = rail.build_rail(route, rng=random.Random(0), drop_rate=0.0)
        assert r.waypoints[-1].gt_action == "stop()"
        for k, h in enumerate(parsed.milestones[1:], start=1):  # a leg's heading matches its geocodes
            assert abs(geo.wrap180(geo.bearing(parsed.geocodes[k - 1], parsed.geocodes[k]) - h.heading)) < 0.01
