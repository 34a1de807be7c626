"""The V-IRL environments end to end: episode contract, splits, errors, determinism, metrics, SFT data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sftrl_jax.envs import make
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import cities, expert, metrics, prompts, rail, routes, styles
from tests.envs.virl_fixtures import INSTRUCTIONS, answer, hand_route

INFO_KEYS = {
    "global_instruction", "current_instruction", "instruction_idx", "gt_action", "current_obs", "obs_act_seq",
    "verify_message", "is_success", "route_idx", "waypoint_idx", "n_waypoints", "new_conversation",
}  # fmt: skip


def hand_env(**kw):
    kw.setdefault("drop_rate", 0.0)
    return make("virl-l", split="train", routes=[hand_route()], **kw)


def run_expert(env, **reset_kw):
    obs, info = env.reset(**reset_kw)
    rewards = []
    while True:
        obs, reward, terminated, truncated, info = env.step(expert.expert_answer(info))
        rewards.append(reward)
        if terminated or truncated:
            return rewards, info


def test_expert_solves_the_hand_route():
    env = hand_env()
    obs, info = env.reset(options={"route_idx": 0})
    assert INFO_KEYS <= set(info)
    assert info["global_instruction"] == "\n".join(f"{i + 1}. {s}" for i, s in enumerate(INSTRUCTIONS))
    assert info["gt_action"] == "turn_direction(north)" and info["n_waypoints"] == 19
    assert obs["image"] is None and info["new_conversation"] is True
    assert "O_1: No landmarks nearby; \nA_1:" in obs["text"]
    rewards, info = run_expert(env)
    assert rewards == [1.0] * 19
    assert info["is_success"] is True and info["gt_action"] == "stop()"
    assert metrics.per_step_accuracy(rewards) == 1.0
    assert metrics.route_success_rate([info["is_success"]]) == 1.0
    with pytest.raises(EnvError, match="episode is over"):
        env.step(answer("stop()"))


def test_correct_step_gives_a_fresh_prompt_with_history():
    env = hand_env()
    obs, info = env.reset()
    obs, reward, term, trunc, info = env.step(answer("turn_direction(north)"))
    assert (reward, term, trunc, info["new_conversation"], info["waypoint_idx"]) == (1.0, False, False, True, 1)
    assert obs["text"].startswith("[Task Description]")
    assert "O_1: No landmarks nearby; \nA_1: turn_direction(north)\nO_2: No landmarks nearby; \nA_2:" in obs["text"]
    assert info["current_instruction"] == INSTRUCTIONS[1] and info["gt_action"] == "forward()"
    assert info["verify_message"] == "Correct action"


def test_wrong_policy_is_truncated_after_two_tries():
    env = hand_env()
    obs, info = env.reset()
    results = [env.step(answer("stop()")) for _ in range(3)]
    assert [r[1] for r in results] == [-1.0, -1.0, -1.0]
    assert [(r[2], r[3]) for r in results] == [(False, False), (False, False), (False, True)]
    first = results[0]
    assert first[0]["text"].startswith("You failed this trial because you make incorrect action.")
    assert first[0]["image"] is None and first[4]["new_conversation"] is False
    assert first[4]["waypoint_idx"] == 0 and first[4]["gt_action"] == "turn_direction(north)"  # not executed
    last = results[2][4]
    assert last["verify_message"] == "Exceed maximum verify steps" and last["is_success"] is False
    assert metrics.per_step_accuracy([r[1] for r in results]) == 0.0
    with pytest.raises(EnvError, match="call reset"):
        env.step("x")


def test_budget_resets_after_a_correct_action_and_retry_then_success():
    env = hand_env()
    env.reset()
    assert env.step(answer("stop()", "an intersection"))[1] == -1.5
    assert env.step(answer("turn_direction(north)"))[1] == 1.0  # second try succeeds
    assert env.step("nope")[1] == -1.0
    _, reward, _, truncated, info = env.step(answer("forward()"))
    assert reward == 1.0 and not truncated and info["tries_left"] == 2


def test_verify_iter_option():
    env = hand_env(verify_iter=1)
    env.reset()
    assert env.step("x")[1:4] == (-1.0, False, False)
    assert env.step(answer("turn_direction(north)"))[1:4] == (-1.0, False, True)  # over budget: not graded


def test_relative_action_space_env():
    env = make("virl-l", split="ood-rule", routes=[hand_route()], drop_rate=0.0)
    obs, info = env.reset()
    assert info["gt_action"] == "turn_direction(left)"
    assert "['left', 'right', 'slightly left', 'slightly right']" in obs["text"]
    assert "First, turn left to face north." in obs["text"]
    rewards, info = run_expert(env)
    assert info["is_success"] and set(rewards) == {1.0}
    fixed = make("virl-l", split="ood-rule", routes=[hand_route()], drop_rate=0.0, fix_turn_wrap=True)
    assert fixed.reset()[1]["gt_action"] == "turn_direction(slightly right)"


def test_splits_and_prompt_sections():
    train = make("virl-l", split="train")
    ident = make("virl-l", split="id")
    rule = make("virl-l", split="ood-rule")
    assert train.n_routes == 1000 and ident.n_routes == 48 and rule.n_routes == 48
    assert ident.routes == rule.routes
    assert {r["route_id"] for r in ident.routes} <= {r["route_id"] for r in train.routes}
    assert ident.routes == [train.routes[i] for i in routes.eval_indices(1000, 48, 12)]
    assert ident.absolute_action and not rule.absolute_action
    obs_id, info_id = ident.reset(seed=1, options={"route_idx": 5})
    obs_rule, info_rule = rule.reset(seed=1, options={"route_idx": 5})
    assert info_id["global_instruction"] == info_rule["global_instruction"]
    assert info_id["gt_action"] != info_rule["gt_action"]
    for section in (
        "[Task Description]",
        "[Instruction]",
        "[Action space]",
        "[Observations and actions sequence]",
        "[Output]",
    ):
        assert section in obs_id["text"]
    assert "[Observation format]" not in obs_id["text"]
    for key in ('"current observation"', '"current instruction"', '"action"'):
        assert key in obs_id["text"]
    vis = make("virl-vl", split="ood-visual")
    assert vis.n_routes == 18
    assert len({r["city"] for r in vis.routes}) == 9
    assert [r["city"] for r in vis.routes][::2] == [r["city"] for r in vis.routes][1::2]  # 2 per city, in order
    assert make("virl-l", split="ood-visual").n_routes == 18  # allowed: text only


def test_vl_observation_and_episode():
    env = make("virl-vl", split="id", seed=0)
    obs, info = env.reset(options={"route_idx": 0})
    assert obs["image"].size == (517, 517) and obs["image"].mode == "RGB"
    assert "[Observation format]" in obs["text"]
    assert "top-left: front view, top-right: right view, bottom-left: back view, bottom-right: left view" in obs["text"]
    assert "O_1: You observe an image of 4 views; \nA_1:" in obs["text"]
    obs, reward, *_, info = env.step(expert.expert_answer(info))
    assert reward == 1.0 and obs["image"] is not None
    obs2, reward, *_ = env.step("wrong")
    assert reward == -1.0 and obs2["image"] is None
    small = make("virl-vl", split="ood-visual", view_size=64, view_offsets=prompts.REFERENCE_VIEW_OFFSETS)
    obs, _ = small.reset(options={"route_idx": 17})
    assert obs["image"].size == (133, 133)
    assert "top-left: back left view, top-right: front left view" in obs["text"]


def test_bad_input_errors():
    env = make("virl-l", split="id")
    with pytest.raises(EnvError, match=r"route_idx=48 is out of range .* valid 0\.\.47"):
        env.reset(options={"route_idx": 48})
    with pytest.raises(EnvError, match=r"route_idx=-1"):
        env.reset(options={"route_idx": -1})
    with pytest.raises(EnvError, match="unknown V-IRL reset option"):
        env.reset(options={"route": 1})
    with pytest.raises(EnvError, match="call reset"):
        make("virl-l", split="id").step("x")
    with pytest.raises(EnvError, match=r"unknown V-IRL option 'drop_rat' \(did you mean 'drop_rate'\?\)"):
        make("virl-l", drop_rat=0.1)
    with pytest.raises(EnvError, match="language_only is set by the env name"):
        make("virl-l", language_only=False)
    with pytest.raises(EnvError, match="verify_iter"):
        make("virl-l", verify_iter=0)
    with pytest.raises(EnvError, match="unknown split"):
        make("virl-l", split="test")
    bad = hand_route()
    del bad["milestone_info"]
    with pytest.raises(EnvError, match=r"routes\[0\]: missing key 'milestone_info'"):
        make("virl-l", routes=[bad])


def test_user_template(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Do this:\n${instruction}\nHistory:\n${obs_act_seq}\n")
    obs, _ = hand_env(template=str(path)).reset()
    assert obs["text"] == "Do this:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(INSTRUCTIONS)) + (
        "\nHistory:\nO_1: No landmarks nearby; \nA_1:\n"
    )
    path.write_text("${instructions}")
    with pytest.raises(EnvError, match=r"unknown placeholder\(s\) \['instructions'\]"):
        hand_env(template=str(path))
    with pytest.raises(EnvError, match="template not found"):
        hand_env(template=str(tmp_path / "missing.txt"))


def test_determinism_from_seeds():
    city = cities.generate_city(5, styles.OOD_STYLES[0], extent_m=800.0)
    a = routes.generate_routes(city, 5, seed=3)
    b = routes.generate_routes(cities.generate_city(5, styles.OOD_STYLES[0], extent_m=800.0), 5, seed=3)
    assert a == b
    assert routes.generate_routes(city, 5, seed=4) != a
    e1, e2 = make("virl-vl", split="ood-visual", seed=7), make("virl-vl", split="ood-visual", seed=7)
    o1, i1 = e1.reset(options={"route_idx": 3})
    o2, i2 = e2.reset(options={"route_idx": 3})
    assert e1.rail == e2.rail
    assert o1["image"].tobytes() == o2["image"].tobytes() and o1["text"] == o2["text"]
    o3, _ = e1.reset(seed=11, options={"route_idx": 3})
    o4, _ = e2.reset(seed=11, options={"route_idx": 3})
    assert e1.rail == e2.rail and o3["image"].tobytes() == o4["image"].tobytes()


_DIGEST = """
import hashlib, json, random
from sftrl_jax.envs.virl import rail, routes
from sftrl_jax.envs.virl.render import StreetRenderer
rs = routes.visual_ood_set()
r = rail.build_rail(rs.routes[4], rng=random.Random(1))
w = r.waypoints[-1]
img = StreetRenderer(rs.cities[rs.routes[4]["city"]], view_size=64).render(w.geocode, w.heading)
print(hashlib.sha256(json.dumps(rs.routes).encode() + repr(r).encode() + img.tobytes()).hexdigest())
"""


def test_determinism_across_processes():
    digests = set()
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, env=env, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_metrics():
    assert metrics.per_step_accuracy([1.0, -1.0, -1.5, 1.0]) == 0.5
    assert metrics.per_step_accuracy([]) == 0.0
    assert metrics.route_success_rate([True, False, False, True]) == 0.5
    assert metrics.binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert metrics.binomial_stderr(0.3, 0) == 0.0
    s = metrics.summarize([[1.0, 1.0], [-1.0, -1.0, -1.0]], [True, False])
    assert s["per_step_accuracy"] == pytest.approx(0.4) and s["route_success_rate"] == 0.5
    assert s["route_success_rate_stderr"] == pytest.approx((0.25 / 2) ** 0.5)
    assert s["per_step_accuracy_stderr"] == pytest.approx((0.4 * 0.6 / 5) ** 0.5)
    assert s["n_turns"] == 5 and s["n_episodes"] == 2


def test_expert_over_eval_routes():
    env = make("virl-l", split="id", seed=0)
    results = [run_expert(env, options={"route_idx": i}) for i in range(0, 48, 6)]
    assert all(info["is_success"] for _, info in results)
    assert metrics.per_step_accuracy([r for rewards, _ in results for r in rewards]) == 1.0


def test_generate_virl_sft(tmp_path):
    out = tmp_path / "l" / "virl_l.json"
    summary = expert.generate_virl_sft("virl-l", "train", 25, out, seed=0)
    assert summary["n_examples"] == 25 and summary["n_images"] == 0 and summary["n_episodes"] >= 1
    data = json.loads(out.read_text())
    assert len(data) == 25 and "image" not in data[0]
    turns = data[0]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"].startswith("[Task Description]")
    first = json.loads(turns[1]["value"])
    assert list(first) == ["current observation", "current instruction", "action"]
    assert first["action"].startswith("turn_direction(") and first["current observation"] == "No landmarks nearby; "
    assert expert.generate_virl_sft("virl-l", "train", 25, tmp_path / "again.json", seed=0)["n_examples"] == 25
    assert (tmp_path / "again.json").read_text() == out.read_text()

    vl = tmp_path / "vl" / "data.json"
    summary = expert.generate_virl_sft("virl-vl", "ood-visual", 4, vl, seed=1, view_size=48)
    data = json.loads(vl.read_text())
    assert summary["n_images"] == 4 and data[2]["image"] == "images/virl-vl-ood-visual-000002.png"
    assert data[0]["conversations"][0]["value"].startswith("<image>\n[Task Description]")
    assert all((vl.parent / d["image"]).is_file() for d in data)
    with pytest.raises(EnvError, match="unknown V-IRL variant"):
        expert.generate_virl_sft("virl", "train", 1, tmp_path / "x.json")
    with pytest.raises(EnvError, match="positive integer"):
        expert.generate_virl_sft("virl-l", "train", 0, tmp_path / "x.json")


def test_rail_waypoint_observation_property():
    w = rail.Waypoint((0.0, 0.0), 0.0, "forward()", "No landmarks nearby", "", 1)
    assert w.observation == "No landmarks nearby; " and not w.is_intersection
