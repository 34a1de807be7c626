"""GeneralPoints (the 24-points card game): gp-l (text) and gp-vl (image), SPEC §1.

Pure core: `cards` (dealing), `solver` (exact solutions), `answer` (reading model text), `arithmetic`
(safe exact evaluation), `verifier` (rewards), `expert` (SFT answers),
`metrics`; host edges: `prompts` (template files), `render` (table image); `env` ties them together.
"""

from sftrl_jax.envs.general_points.cards import Hand, deal, parse_cards
from sftrl_jax.envs.general_points.env import GeneralPointsEnv, make_gp_l, make_gp_vl
from sftrl_jax.envs.general_points.expert import expert_answer
from sftrl_jax.envs.general_points.metrics import (
    EpisodeStats,
    binomial_stderr,
    outcome_counts,
    recognition_accuracy,
    success_rate,
)
from sftrl_jax.envs.general_points.prompts import feedback, load_template
from sftrl_jax.envs.general_points.render import render_cards, render_hand
from sftrl_jax.envs.general_points.solver import is_solvable, solutions
from sftrl_jax.envs.general_points.verifier import REWARDS, Puzzle, Verdict, evaluate, parse_answer, score, score_many

__all__ = [
    "REWARDS",
    "EpisodeStats",
    "GeneralPointsEnv",
    "Hand",
    "Puzzle",
    "Verdict",
    "binomial_stderr",
    "deal",
    "evaluate",
    "expert_answer",
    "feedback",
    "is_solvable",
    "load_template",
    "make_gp_l",
    "make_gp_vl",
    "outcome_counts",
    "parse_answer",
    "parse_cards",
    "recognition_accuracy",
    "render_cards",
    "render_hand",
    "score",
    "score_many",
    "solutions",
    "success_rate",
]
