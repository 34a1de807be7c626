"""GeneralPoints environment (gp-l text, gp-vl image): deal, prompt, verify, sequential revision.

    env = sftrl_jax.envs.make("gp-vl", split="ood-visual")
    obs, info = env.reset(seed=0)                 # obs = {"text": prompt, "image": PIL image}
    obs, reward, terminated, truncated, info = env.step(model_text)

Conversation contract (SPEC §1.7). The first user message is `obs["text"]` (for gp-vl with
`obs["image"]` as the first content item). After a turn that is neither terminated nor truncated, the
caller appends the model's text as an assistant message and `obs["text"]` as the next user message; it
is the feedback "You failed this trial because <verify message>" and carries no image
(`obs["image"]` is None). `verify_iter` attempts are graded; the call after the last graded attempt
returns reward -1 with `truncated=True` and message "step_limit_reached" without grading the text.
`terminated=True` only for a correct formula (+5). Once the episode is over `obs["text"]` is "" and a
further `step` raises EnvError (a caller bug, unlike model text, which is always scored).

`reset(seed=...)` reseeds the dealer, so a seed fixes the hand (the reference ignored it);
`reset(options={"cards": ["A", "3", "K", "10"]})` deals that hand (suits optional: "KS", ("K", "S")).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sftrl_jax.envs.base import Env, EnvError, Info, Obs, check_split
from sftrl_jax.envs.general_points import cards as cards_lib
from sftrl_jax.envs.general_points import prompts, render, solver, verifier

# split -> rule options; gp-vl adds the card colour (black for training and rule-OOD, red for visual OOD)
_SPLIT_RULES = {
    "train": dict(face_cards_as_10=True, ood=False),
    "id": dict(face_cards_as_10=True, ood=False),
    "ood-rule": dict(face_cards_as_10=False, ood=True),
    "ood-visual": dict(face_cards_as_10=True, ood=False),
}
_VL_COLORS = {"train": "black", "id": "black", "ood-rule": "black", "ood-visual": "red"}
_RESET_OPTIONS = ("cards", "allow_unsolvable")
REPEAT_MESSAGE = "repeated an earlier answer"  # reward_breakdown entry of `repeat_penalty`


class GeneralPointsEnv(Env):
    """The 24-points game with a verifier, graded penalties and multi-turn revision.

    Options (the reference's names in brackets): `language_only` (same; False switches on the image and
    the card-recognition check), `target` [target_points], `verify_iter`, `face_cards_as_10`
    [treat_face_cards_as_10], `ood` (every hand has a J, Q or K), `color` [face_cards_color]:
    'mixed' | 'black' | 'red' (all suits, despite the reference's name), `template` (path of a prompt
    template file; None = ours), `face_card_msg` (rule sentence; None = the reference's), `exact`
    (exact rational check; False = the reference's float `==`), `reference_card_parsing` (read card
    lists exactly as the reference does, quirks included), `repeat_penalty` (ours, not in the paper; 0 =
    the paper's rewards: added to the reward of a graded answer whose formula was already answered in
    the episode; the feedback text is unchanged; `info["repeated"]` says whether it was a repeat),
    `reward_floor` (ours, not in the paper; None = the paper's unbounded sums; a number <= -3 bounds the
    verifier's reward from below, before `repeat_penalty` is added: `verifier.score`'s docstring),
    `face_values` (ours: [J, Q, K] values 1..13 replacing `face_cards_as_10`'s rule, stated by default in
    the reference's rule sentence with these values; e.g. warm-up data under many rules).
    """

    def __init__(
        self,
        *,
        name: str = "gp-l",
        split: str = "train",
        language_only: bool = True,
        target: int = 24,
        verify_iter: int = 5,
        face_cards_as_10: bool = True,
        ood: bool = False,
        color: str = "mixed",
        template: str | os.PathLike | None = None,
        face_card_msg: str | None = None,
        exact: bool = True,
        reference_card_parsing: bool = False,
        repeat_penalty: float = 0.0,
        reward_floor: float | None = None,
        face_values: Sequence[int] | None = None,
    ):
        for key, val in dict(
            language_only=language_only,
            face_cards_as_10=face_cards_as_10,
            ood=ood,
            exact=exact,
            reference_card_parsing=reference_card_parsing,
        ).items():
            if not isinstance(val, bool | np.bool_):
                raise EnvError(f"option {key!r} must be true or false, got {val!r}")
        if isinstance(target, bool) or not isinstance(target, int | np.integer) or not 1 <= target <= 10**6:
            raise EnvError(f"option 'target' must be an integer in 1..1000000, got {target!r}")
        if isinstance(verify_iter, bool) or not isinstance(verify_iter, int | np.integer) or verify_iter < 1:
            raise EnvError(f"option 'verify_iter' must be an integer >= 1, got {verify_iter!r}")
        cards_lib.suits_for(color)  # validates
        if (
            isinstance(repeat_penalty, bool)
            or not isinstance(repeat_penalty, int | float | np.integer | np.floating)
            or not -100.0 <= repeat_penalty <= 0.0
        ):
            raise EnvError(f"option 'repeat_penalty' must be a number in [-100, 0], got {repeat_penalty!r}")
        if reward_floor is not None:
            try:
                verifier.check_reward_floor(reward_floor)
            except ValueError:
                raise EnvError(
                    f"option 'reward_floor' must be a finite number <= -3 (or null for the paper's rewards), "
                    f"got {reward_floor!r}"
                ) from None
        if face_values is not None:
            ok = isinstance(face_values, list | tuple) and len(face_values) == 3
            ok = ok and all(
                not isinstance(v, bool) and isinstance(v, int | np.integer) and 1 <= v <= 13 for v in face_values
            )
            if not ok:
                raise EnvError(f"option 'face_values' must be three integers 1..13 (J, Q, K), got {face_values!r}")
            face_values = tuple(int(v) for v in face_values)
        if face_card_msg is not None and not isinstance(face_card_msg, str):
            raise EnvError(f"option 'face_card_msg' must be a string, got {face_card_msg!r}")
        self.name, self.split = name, split
        self.language_only, self.target, self.verify_iter = bool(language_only), int(target), int(verify_iter)
        self.face_cards_as_10, self.ood, self.color = bool(face_cards_as_10), bool(ood), color
        self.exact, self.reference_card_parsing = bool(exact), bool(reference_card_parsing)
        self.repeat_penalty = float(repeat_penalty)
        self.reward_floor = None if reward_floor is None else float(reward_floor)
        self.template = prompts.load_template(template, variant="gp-l" if self.language_only else "gp-vl")
        self.face_values = face_values
        if face_card_msg is None:
            face_card_msg = prompts.face_card_message(face_cards_as_10, face_values)
        self.face_card_msg = face_card_msg
        self._rng = np.random.default_rng()
        self.hand: cards_lib.Hand | None = None
        self.puzzle: verifier.Puzzle | None = None
        self._remaining = 0
        self._turn = 0
        self._success = False
        self._over = True
        self._tried: set[str] = set()

    # ------------------------------------------------------------------------------------------- API
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, Info]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(_RESET_OPTIONS))
        if unknown:
            raise EnvError(f"unknown reset option {unknown[0]!r}; valid: {', '.join(_RESET_OPTIONS)}")
        if options.get("cards") is not None:
            hand = cards_lib.parse_cards(options["cards"], rng=self._rng, color=self.color)
            values = hand.values(face_cards_as_10=self.face_cards_as_10, face_values=self.face_values)
            if not options.get("allow_unsolvable", False) and not solver.is_solvable(values, self.target):
                raise EnvError(
                    f"hand {list(hand.symbols)} (numbers {list(values)}) cannot make {self.target}; "
                    "pass options={'cards': ..., 'allow_unsolvable': True} to deal it anyway"
                )
        else:
            hand = cards_lib.deal(
                self._rng,
                face_cards_as_10=self.face_cards_as_10,
                ood=self.ood,
                color=self.color,
                target=self.target,
                face_values=self.face_values,
            )
        self.hand = hand
        values = hand.values(face_cards_as_10=self.face_cards_as_10, face_values=self.face_values)
        self.puzzle = verifier.Puzzle(values, hand.symbols, self.target)
        self._remaining, self._turn, self._success, self._over = self.verify_iter, 0, False, False
        self._tried = set()
        text = self.template.render(
            target=self.target, face_card_msg=self.face_card_msg, cards=hand.symbols if self.language_only else None
        )
        image = None if self.language_only else render.render_hand(hand)
        return {"text": text, "image": image}, self._info(None)

    def step(self, text: str) -> tuple[Obs, float, bool, bool, Info]:
        if self.puzzle is None:
            raise EnvError("step() before reset(): call env.reset() to deal a hand first")
        if self._over:
            raise EnvError(
                f"the episode is over after {self._turn} turns ({'solved' if self._success else 'step limit reached'}); "
                "call env.reset() before stepping again"
            )
        self._turn += 1
        self._remaining -= 1
        if self._remaining == -1:
            self._over = True
            info = self._info(None)
            info.update(
                verify_message=verifier.STEP_LIMIT_MESSAGE,
                outcome="STEP_LIMIT",
                reward_breakdown=[(verifier.STEP_LIMIT_REWARD, verifier.STEP_LIMIT_MESSAGE)],
            )
            return {"text": "", "image": None}, verifier.STEP_LIMIT_REWARD, False, True, info
        verdict = verifier.score(
            text,
            self.puzzle,
            language_only=self.language_only,
            exact=self.exact,
            reference_card_parsing=self.reference_card_parsing,
            reward_floor=self.reward_floor,
        )
        terminated = verdict.is_correct
        self._success = self._success or terminated
        self._over = terminated
        info = self._info(verdict)
        reward = verdict.reward
        formula = verdict.answer.formula
        has_formula = formula not in (None, "None")  # the parser's "missing field" value
        info["repeated"] = not terminated and has_formula and formula in self._tried
        if has_formula:
            self._tried.add(formula)
        if info["repeated"] and self.repeat_penalty:
            # reward shaping, not in the paper: the feedback text stays the verifier's
            reward += self.repeat_penalty
            info["reward_breakdown"].append((self.repeat_penalty, REPEAT_MESSAGE))
        obs_text = "" if terminated else prompts.feedback(verdict.message)
        return {"text": obs_text, "image": None}, reward, terminated, False, info

    def device_state(self) -> dict[str, np.ndarray]:
        """This turn as arrays for `envs.device_reward_fn` (card values, sorted symbol codes, target,
        solution strings, graded attempts left); stack them over envs on a leading axis."""
        if self.puzzle is None:
            raise EnvError("device_state() before reset(): call env.reset() to deal a hand first")
        if not self.exact or self.reference_card_parsing or self.repeat_penalty:
            raise EnvError(
                "the device reward implements exact=True, reference_card_parsing=False and repeat_penalty=0 "
                "only: set env.reward_on_device false for these options"
            )
        from sftrl_jax.envs.general_points import device_reward

        return device_reward.puzzle_state(
            self.puzzle, remaining=self._remaining, check_cards=not self.language_only, reward_floor=self.reward_floor
        )

    def render(self) -> Image.Image:
        """The table image of the current hand (also for gp-l, whose observations carry no image)."""
        if self.hand is None:
            raise EnvError("render() before reset(): call env.reset() to deal a hand first")
        return render.render_hand(self.hand)

    # ---------------------------------------------------------------------------------------- helpers
    def _info(self, verdict: verifier.Verdict | None) -> Info:
        hand, puzzle = self.hand, self.puzzle
        return {
            "cards": list(hand.symbols),
            "suits": list(hand.suits),
            "numbers": list(puzzle.values),
            "solutions": list(puzzle.solutions),
            "target": self.target,
            "verify_message": None if verdict is None else verdict.message,
            "remaining_steps": self._remaining,
            "turn": self._turn,
            "is_success": self._success,
            "outcome": None if verdict is None else verdict.outcome,
            "reward_breakdown": [] if verdict is None else list(verdict.penalties),
            "formula": None if verdict is None else verdict.answer.formula,
            "recognized_cards": None if verdict is None else list(verdict.answer.cards),
            "repeated": False,
        }


def _make(variant: str, split: str, options: dict[str, Any]) -> GeneralPointsEnv:
    check_split(variant, split)
    language_only = variant == "gp-l"
    if "language_only" in options and bool(options["language_only"]) != language_only:
        raise EnvError(f"{variant} has language_only={language_only}; use the other variant instead of overriding it")
    allowed = [p for p in inspect.signature(GeneralPointsEnv).parameters if p not in ("name", "split")]
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EnvError(f"unknown option {key!r} for {variant}{hint}; valid options: {', '.join(allowed)}")
    kwargs: dict[str, Any] = dict(_SPLIT_RULES[split], language_only=language_only)
    if not language_only:
        kwargs["color"] = _VL_COLORS[split]
    kwargs.update(options)  # explicit options win over the split's defaults
    return GeneralPointsEnv(name=variant, split=split, **kwargs)


def make_gp_l(split: str = "train", **options: Any) -> GeneralPointsEnv:
    """GP-L (text). Splits: train/id (J/Q/K = 10), ood-rule (J/Q/K = 11/12/13, a face card in every hand)."""
    if split == "ood-visual":
        raise EnvError(
            "split 'ood-visual' only changes the card colours in the image, so it applies to gp-vl only; "
            "gp-l splits are train, id and ood-rule"
        )
    return _make("gp-l", split, options)


def make_gp_vl(split: str = "train", **options: Any) -> GeneralPointsEnv:
    """GP-VL (image). train/id: black suits, J/Q/K = 10; ood-rule: black, J/Q/K = 11/12/13 with a face
    card in every hand; ood-visual: red suits with the ID rule."""
    return _make("gp-vl", split, options)
