"""V-IRL answers for the device-reward differential tests: model-like answers and near misses."""

from __future__ import annotations

import json

from sftrl_jax.envs.virl import expert
from tests.envs import device_reward_cases as cases_lib

_ACTIONS = ("forward()", "stop()", "turn_direction(north)", "turn_direction(southeast)", "turn_direction(left)")


def answer(env, rng, *, vocab: int, byte_ids: list[int]):
    """Mostly the expert's JSON (right or with a wrong action), in prose or code fences, broken JSON
    read by the regexes, escapes, duplicate keys, intersection wording; some random tokens."""
    info = env._info(verify_message=None, new_conversation=False, correct=None, kind=None)
    fields = json.loads(expert.expert_answer(info))
    r = rng.random()
    if r < 0.45:
        fields["action"] = str(rng.choice([info["gt_action"], *_ACTIONS]))
    if rng.random() < 0.3:
        fields["current observation"] = str(
            rng.choice(
                ["You observe an intersection", "no INTERSECTION here", "Intersection!", "intersectio n", "a shop"]
            )
        )
    text = json.dumps(fields, indent=int(rng.integers(0, 3)))
    kind = int(rng.integers(12))
    if kind == 0:
        return f"Sure.\n```json\n{text}\n```\nDone."
    if kind == 1:  # broken JSON: the regexes read it
        return text.replace("}", ",}") if rng.random() < 0.5 else text[:-1]
    if kind == 2:  # escapes
        return text.replace("(", "\\u0028").replace("intersection", "inters\\u0065ction")
    if kind == 3:  # duplicate keys, the last wins
        return text[:-1] + f', "action": "{rng.choice(_ACTIONS)}"}}'
    if kind == 4:
        return text.replace(f'"{fields["action"]}"', str(rng.choice(["null", "1", "[]", '"x"'])), 1)
    if kind == 5:  # embedded objects, several braces
        return "{not json} {" + '"a": 1} ' + text
    if kind == 6:
        sp = str(rng.choice(["\u00a0", "\u3000", "\t", "\n", " "]))
        return f'"action"{sp}:{sp}"{fields["action"]}"  "current observation": "{fields["current observation"]}"'
    if kind == 7:
        return f'"action": "{fields["action"][:3]}\\\n{fields["action"][3:]}"'
    if kind == 8:
        return rng.integers(0, vocab, size=int(rng.integers(0, 100))).tolist()
    if kind == 9:
        return cases_lib.jsonish(rng, keys=("action", "current observation", "current instruction"))
    if kind == 10:
        return text.replace('"action"', '"act\\u0069on"')
    return text
