"""V-IRL answer parsing and rewards (SPEC.md §2.6), including a fuzz test of arbitrary model text."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftrl_jax.envs import make
from sftrl_jax.envs.virl import verifier
from sftrl_jax.envs.virl.prompts import OUTPUT_FORMAT
from tests.envs.virl_fixtures import answer, hand_route

FWD = dict(gt_action="forward()", gt_landmark_obs="No landmarks nearby", gt_observation="No landmarks nearby; ")
AT = dict(
    gt_action="turn_direction(east)",
    gt_landmark_obs="Hotel Aurora is on your right front",
    gt_observation="Hotel Aurora is on your right front; You observe an intersection",
)


def test_parse_answer_json_embedded_and_regex():
    assert verifier.parse_answer(answer("forward()"))["action"] == "forward()"
    fenced = "Sure!\n```json\n" + answer("stop()", "x") + "\n```\nDone."
    assert verifier.parse_answer(fenced) == {"current observation": "x", "current instruction": "", "action": "stop()"}
    broken = '{"current observation": "I see an intersection", "action": "turn_direction(east)",,}'
    assert verifier.parse_answer(broken) == {
        "current observation": "I see an intersection",
        "current instruction": None,
        "action": "turn_direction(east)",
    }
    assert verifier.parse_answer('{"action": 3}')["action"] is None
    assert verifier.parse_answer("nothing here") == dict.fromkeys(verifier.KEYS)
    assert verifier.parse_answer(None)["action"] is None


def test_correct_action():
    v = verifier.verify(answer("forward()"), **FWD)
    assert (v.reward, v.message, v.kind, v.correct) == (1.0, "Correct action", "correct", True)
    # the observation text does not matter when the action is right
    v = verifier.verify(answer("turn_direction(east)", "whatever, no intersection here"), **AT)
    assert v.reward == 1.0
    # exact string equality: no case folding or trimming
    assert verifier.verify(answer("Forward()"), **FWD).reward == -1.0
    assert verifier.verify(answer(" forward()"), **FWD).reward == -1.0


def test_incorrect_action():
    v = verifier.verify(answer("stop()"), **FWD)
    assert v.reward == -1.0 and v.kind == "incorrect_action"
    assert v.message == (
        "you make incorrect action. Please avoid this action and try again in the same format:\n" + OUTPUT_FORMAT
    )
    assert verifier.verify("garbage", **FWD).reward == -1.0
    assert verifier.verify("", **AT).reward == -1.0  # reference: at an intersection, silence is only -1


def test_intersection_penalty_reference_quirk():
    # claiming an intersection on a plain stretch: -1.5, correct feedback
    v = verifier.verify(answer("stop()", "I observe an intersection"), **FWD)
    assert v.reward == -1.5 and v.kind == "incorrect_observation"
    assert v.message.startswith("you are not at any intersection. Please avoid this observation")
    # the quirk: the ground truth compared is the landmark text, so even AT an intersection the same
    # claim is penalised -1.5 with "you are not at any intersection"
    v = verifier.verify(answer("forward()", "You observe an Intersection"), **AT)
    assert v.reward == -1.5 and v.message.startswith("you are not at any intersection")
    # and failing to mention the intersection is only -1
    assert verifier.verify(answer("forward()", "nothing"), **AT).reward == -1.0


def test_intersection_penalty_fixed_variant():
    fixed = dict(fix_intersection_check=True)
    assert verifier.verify(answer("forward()", "You observe an intersection"), **AT, **fixed).reward == -1.0
    v = verifier.verify(answer("forward()", "nothing"), **AT, **fixed)
    assert v.reward == -1.5 and v.message.startswith("you are at an intersection. Please avoid this observation")
    v = verifier.verify(answer("stop()", "an intersection!"), **FWD, **fixed)
    assert v.reward == -1.5 and v.message.startswith("you are not at any intersection")
    assert verifier.verify(answer("stop()", "street"), **FWD, **fixed).reward == -1.0


def test_exceeded_and_unused_constant():
    v = verifier.exceeded()
    assert (v.reward, v.message, v.kind) == (-1.0, "Exceed maximum verify steps", "exceeded")
    assert verifier.INCORRECT_INSTRUCTION == -1.75


def test_adversarial_braces_are_bounded():
    text = "{" * 20000 + '"action": "forward()"'
    assert verifier.verify(text, **FWD).reward == 1.0  # found by the regex fallback


_ENV = make("virl-l", split="train", routes=[hand_route()], drop_rate=0.5, seed=0)
_ACTIONS = ["forward()", "stop()", "turn_direction(north)", "turn_direction(east)", "turn_direction(northeast)"]
_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c) | st.dictionaries(st.sampled_from([*verifier.KEYS, "x"]), c),
    max_leaves=8,
)


def _half_json(action: str, observation: str) -> str:
    return '{"action": "' + action + '", "current observation": "' + observation + '"'


_model_text = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    st.builds(answer, st.one_of(st.sampled_from(_ACTIONS), st.text(max_size=30)), st.text(max_size=60)),
    st.builds(_half_json, st.one_of(st.sampled_from(_ACTIONS), st.text(max_size=20)), st.text(max_size=40)),
    _json_like.map(json.dumps),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_model_text)
def test_fuzz_arbitrary_model_text(text):
    if _ENV._done:
        _ENV.reset()
    gt = _ENV.rail.waypoints[_ENV._wp_idx].gt_action
    obs, reward, terminated, truncated, info = _ENV.step(text)
    assert reward in (1.0, -1.0, -1.5)
    assert isinstance(obs["text"], str)
    if info["action_correct"]:
        assert reward == 1.0 and verifier.parse_answer(text)["action"] == gt
    else:
        assert reward <= 0
        assert verifier.parse_answer(text)["action"] != gt or truncated
