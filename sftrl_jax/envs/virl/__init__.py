"""V-IRL navigation (SPEC.md §2): procedural cities, the released route format, V-IRL-L and V-IRL-VL.

Modules: `geo` (headings and direction words), `styles` / `names` / `cities` (procedural cities),
`routes` (route dicts in the released format, the split route sets), `rail` (instructions and
waypoints), `prompts` (+ `templates/`), `verifier` (rewards), `render` (synthetic street views),
`loader` (released data: restricted pickle, panoramas), `env` (the environments), `expert` (expert
answers, SFT data), `metrics`. See docs/VIRL.md.
"""

from sftrl_jax.envs.virl.env import VirlEnv, make_virl_l, make_virl_vl
from sftrl_jax.envs.virl.expert import expert_answer, generate_virl_sft
from sftrl_jax.envs.virl.loader import ReleasedData, RestrictedUnpickler, load_pickle_restricted, perspective_view
from sftrl_jax.envs.virl.metrics import binomial_stderr, per_step_accuracy, route_success_rate, summarize
from sftrl_jax.envs.virl.rail import Rail, Waypoint, build_rail
from sftrl_jax.envs.virl.render import StreetRenderer, tile_views
from sftrl_jax.envs.virl.routes import (
    RouteSet,
    eval_set,
    parse_route,
    route_set,
    save_route_infos,
    training_set,
    visual_ood_set,
)
from sftrl_jax.envs.virl.verifier import Verdict, parse_answer, verify

__all__ = [
    "Rail",
    "ReleasedData",
    "RestrictedUnpickler",
    "RouteSet",
    "StreetRenderer",
    "Verdict",
    "VirlEnv",
    "Waypoint",
    "binomial_stderr",
    "build_rail",
    "eval_set",
    "expert_answer",
    "generate_virl_sft",
    "load_pickle_restricted",
    "make_virl_l",
    "make_virl_vl",
    "parse_answer",
    "parse_route",
    "per_step_accuracy",
    "perspective_view",
    "route_set",
    "route_success_rate",
    "save_route_infos",
    "summarize",
    "tile_views",
    "training_set",
    "verify",
    "visual_ood_set",
]
