"""The V-IRL navigation environments: `virl-l` (text observations) and `virl-vl` (street-view grid).

    env = sftrl_jax.envs.make("virl-vl", split="id")
    obs, info = env.reset(options={"route_idx": 3})
    while True:
        answer = model(obs)                      # JSON with "current observation", "current instruction", "action"
        obs, reward, terminated, truncated, info = env.step(answer)
        if terminated or truncated:
            break

Episode contract (on rails, SPEC.md §2.1 and §2.6):
* `reset` returns a fresh full prompt for the first waypoint (`obs["text"]`, `obs["image"]` for VL)
  and `info["new_conversation"] = True`.
* A correct action (+1) moves the agent to the next waypoint: `obs["text"]` is a FRESH full prompt
  (new history, new image) that starts a NEW conversation, `info["new_conversation"] = True`. A correct
  `stop()` ends the episode: `terminated = True`, `info["is_success"] = True`, empty obs.
* A wrong action (-1, or -1.5 for the intersection check) is not executed; the agent stays at the
  waypoint. `obs["text"]` is "You failed this trial because <message>", to be appended as the next
  user turn after the model's answer in the SAME conversation; `obs["image"]` is None (the image is
  already in the conversation); `info["new_conversation"] = False`.
* Each waypoint allows `verify_iter` graded answers; the next call at that waypoint is not graded:
  reward -1, `truncated = True`, message "Exceed maximum verify steps", `is_success = False`.
* `step` never raises on model text; calling it before `reset` or after the episode ended raises
  EnvError.

Splits: `train` = the training city (1,000 routes, absolute actions); `id` = 48 of its routes (seed
12), absolute; `ood-rule` = the same 48 routes with relative actions; `ood-visual` = 18 routes in 9
cities of other styles, absolute, in a fixed order. `virl-l` accepts `ood-visual` too (not a paper
setting: text-only, so it only tests the unseen landmark and street vocabulary). With `data_dir`, the
routes come from a released-layout folder: `train` and `ood-visual` use all its routes in file
order, `id` / `ood-rule` 48 of them drawn with seed 12.
"""

from __future__ import annotations

import difflib
import inspect
import random
from collections.abc import Sequence
from typing import Any

from sftrl_jax.envs.base import Env, EnvError, Info, Obs, check_split
from sftrl_jax.envs.virl import loader, prompts, rail, verifier
from sftrl_jax.envs.virl import routes as virl_routes
from sftrl_jax.envs.virl.render import DEFAULT_VIEW_SIZE, StreetRenderer

FAILURE_PREFIX = "You failed this trial because "
_RESET_OPTIONS = frozenset({"route_idx"})


class VirlEnv(Env):
    """On-rails V-IRL navigation; see the module docstring for the episode contract.

    Options: `language_only` (virl-l vs virl-vl), `absolute_action` (None = by split: relative for
    ood-rule), `verify_iter` (graded answers per waypoint, 2), `drop_rate` (0.5) and
    `straight_line_length` (5) of the rail, `relocation` (snap to panoramas; released data only),
    `view_size` (pixels per view, 256) and `view_offsets` (headings of the 2x2 views relative to the
    agent; `prompts.REFERENCE_VIEW_OFFSETS` for the reference's diagonal views), `data_dir` (None =
    procedural cities), `template` (a prompt template file), `fix_turn_wrap` / `fix_intersection_check`
    (False = the reference's behaviour, see geo.py and verifier.py), `seed` (for route and rail draws
    when reset gets no seed), `routes` (a list of route dicts instead of the split's, text only).
    """

    def __init__(
        self,
        *,
        split: str = "train",
        language_only: bool = True,
        absolute_action: bool | None = None,
        verify_iter: int = 2,
        drop_rate: float = 0.5,
        straight_line_length: int = 5,
        relocation: bool = True,
        view_size: int = DEFAULT_VIEW_SIZE,
        view_offsets: Sequence[float] = prompts.VIEW_OFFSETS,
        data_dir: str | None = None,
        template: str | None = None,
        fix_turn_wrap: bool = False,
        fix_intersection_check: bool = False,
        seed: int | None = None,
        routes: Sequence[dict] | None = None,
    ):
        self.name = "virl-l" if language_only else "virl-vl"
        self.split = check_split(self.name, split)
        if isinstance(verify_iter, bool) or not isinstance(verify_iter, int) or verify_iter < 1:
            raise EnvError(f"option 'verify_iter' must be an integer >= 1, got {verify_iter!r}")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate <= 1.0:
            raise EnvError(f"option 'drop_rate' must be a number in [0, 1], got {drop_rate!r}")
        if (
            isinstance(straight_line_length, bool)
            or not isinstance(straight_line_length, int)
            or straight_line_length < 0
        ):
            raise EnvError(f"option 'straight_line_length' must be an integer >= 0, got {straight_line_length!r}")
        if isinstance(view_size, bool) or not isinstance(view_size, int) or view_size < 32:
            raise EnvError(f"option 'view_size' must be an integer >= 32 pixels, got {view_size!r}")
        if len(view_offsets) != 4:
            raise EnvError(
                f"option 'view_offsets' must list 4 headings (top-left, top-right, bottom-left, bottom-right), got {view_offsets!r}"
            )
        self.language_only = bool(language_only)
        self.absolute_action = (split != "ood-rule") if absolute_action is None else bool(absolute_action)
        self.verify_iter = verify_iter
        self.drop_rate = float(drop_rate)
        self.straight_line_length = straight_line_length
        self.relocation = bool(relocation)
        self.view_size = view_size
        self.view_offsets = tuple(float(o) for o in view_offsets)
        self.fix_turn_wrap = bool(fix_turn_wrap)
        self.fix_intersection_check = bool(fix_intersection_check)
        self.template = prompts.load_template(self.name, template)
        self._rng = random.Random(seed)

        self._data: loader.ReleasedData | None = None
        self._cities: dict = {}
        if data_dir is not None and routes is not None:
            raise EnvError("give either data_dir or routes, not both")
        if data_dir is not None:
            self._data = loader.ReleasedData.from_dir(data_dir)
            all_routes = self._data.routes
            if split in ("id", "ood-rule"):
                all_routes = [all_routes[i] for i in virl_routes.eval_indices(len(all_routes))]
            self.routes = list(all_routes)
        elif routes is not None:
            if not self.language_only:
                raise EnvError(
                    "custom `routes` are text only (virl-l): street views need a procedural city or data_dir"
                )
            self.routes = list(routes)
            for i, r in enumerate(self.routes):
                virl_routes.parse_route(r, where=f"routes[{i}]")
        else:
            route_set = virl_routes.route_set(split)
            self.routes = list(route_set.routes)
            self._cities = dict(route_set.cities)
        if not self.routes:
            raise EnvError(f"no routes for split {split!r}")
        self._renderers: dict[str, StreetRenderer] = {}
        self._rail: rail.Rail | None = None
        self._done = True
        self._started = False

    # ------------------------------------------------------------------ helpers
    @property
    def n_routes(self) -> int:
        return len(self.routes)

    @property
    def rail(self) -> rail.Rail | None:
        """The current episode's rail (instructions and waypoints), None before the first reset."""
        return self._rail

    def _image(self, wp: rail.Waypoint):
        if self.language_only:
            return None
        where = f"route {self._route_idx} waypoint {self._wp_idx}"
        if self._data is not None:
            return self._data.observation(
                wp.geocode, wp.heading, pano_id=wp.pano_id, view_size=self.view_size,
                view_offsets=self.view_offsets, where=where,
            )  # fmt: skip
        city_name = self.routes[self._route_idx].get("city")
        if city_name not in self._cities:
            raise EnvError(f"{where}: route names city {city_name!r}, which this env does not have")
        if city_name not in self._renderers:
            self._renderers[city_name] = StreetRenderer(
                self._cities[city_name], view_size=self.view_size, view_offsets=self.view_offsets
            )
        return self._renderers[city_name].render(wp.geocode, wp.heading)

    def _current_obs_text(self, wp: rail.Waypoint) -> str:
        if self.language_only:
            return wp.observation
        return f"{prompts.VL_OBSERVATION}; {wp.intersection_obs}"

    def _prompt(self) -> str:
        wps = self._rail.waypoints
        wp = wps[self._wp_idx]
        history = [w.observation for w in wps[: self._wp_idx]] + [self._current_obs_text(wp)]
        actions = [w.gt_action for w in wps[: self._wp_idx]]
        return prompts.build_prompt(
            self.template,
            instruction=self._rail.instruction_text,
            obs_act_seq=prompts.obs_act_seq_text(history, actions),
            absolute=self.absolute_action,
            view_offsets=self.view_offsets,
        )

    def _info(
        self, *, verify_message: str | None, new_conversation: bool, correct: bool | None, kind: str | None
    ) -> Info:
        wps = self._rail.waypoints
        wp = wps[self._wp_idx]
        history = [w.observation for w in wps[: self._wp_idx + 1]]
        return {
            "global_instruction": self._rail.instruction_text,
            "current_instruction": self._rail.instructions[wp.instruction_idx],
            "instruction_idx": wp.instruction_idx,
            "gt_action": wp.gt_action,
            "current_obs": wp.observation,
            "obs_act_seq": prompts.obs_act_seq_text(history, [w.gt_action for w in wps[: self._wp_idx]]),
            "verify_message": verify_message,
            "is_success": self._success,
            "route_idx": self._route_idx,
            "route_id": self.routes[self._route_idx].get("route_id"),
            "waypoint_idx": self._wp_idx,
            "n_waypoints": len(wps),
            "new_conversation": new_conversation,
            "action_correct": correct,
            "reward_kind": kind,
            "tries_left": self._tries_left,
        }

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, Info]:
        if seed is not None:
            self._rng = random.Random(seed)
        options = dict(options or {})
        unknown = sorted(set(options) - _RESET_OPTIONS)
        if unknown:
            raise EnvError(f"unknown V-IRL reset option(s) {unknown}; valid: {sorted(_RESET_OPTIONS)}")
        idx = options.get("route_idx")
        if idx is None:
            idx = self._rng.randrange(self.n_routes)
        elif isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < self.n_routes:
            raise EnvError(
                f"route_idx={idx!r} is out of range for {self.name} split {self.split!r}: valid 0..{self.n_routes - 1}"
            )
        self._route_idx = idx
        self._rail = rail.build_rail(
            self.routes[idx],
            rng=self._rng,
            absolute_action=self.absolute_action,
            drop_rate=self.drop_rate,
            straight_line_length=self.straight_line_length,
            wrap_turns=self.fix_turn_wrap,
            relocate=self._data.relocate if (self._data is not None and self.relocation) else None,
            where=f"route {idx}",
        )
        self._wp_idx = 0
        self._tries_left = self.verify_iter
        self._success = False
        self._done = False
        self._started = True
        obs = {"text": self._prompt(), "image": self._image(self._rail.waypoints[0])}
        return obs, self._info(verify_message=None, new_conversation=True, correct=None, kind=None)

    def device_state(self) -> dict[str, Any]:
        """This turn as arrays for `envs.device_reward_fn` (expected action, whether the ground truth
        the intersection check compares with is at an intersection, graded attempts left)."""
        if not self._started:
            raise EnvError("call reset() before device_state()")
        from sftrl_jax.envs.virl import device_reward

        wp = self._rail.waypoints[self._wp_idx]
        truth = wp.observation if self.fix_intersection_check else wp.landmark_obs
        return device_reward.waypoint_state(gt_action=wp.gt_action, truth=truth, tries_left=self._tries_left)

    def step(self, text: str) -> tuple[Obs, float, bool, bool, Info]:
        if not self._started:
            raise EnvError("call reset() before step()")
        if self._done:
            raise EnvError("this V-IRL episode is over (terminated or truncated); call reset() to start a new one")
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        wp = self._rail.waypoints[self._wp_idx]
        self._tries_left -= 1
        if self._tries_left < 0:
            verdict = verifier.exceeded()
            self._done = True
            info = self._info(verify_message=verdict.message, new_conversation=False, correct=False, kind=verdict.kind)
            return {"text": "", "image": None}, verdict.reward, False, True, info
        verdict = verifier.verify(
            text,
            gt_action=wp.gt_action,
            gt_landmark_obs=wp.landmark_obs,
            gt_observation=wp.observation,
            fix_intersection_check=self.fix_intersection_check,
        )
        if not verdict.correct:
            obs = {"text": FAILURE_PREFIX + verdict.message, "image": None}
            info = self._info(verify_message=verdict.message, new_conversation=False, correct=False, kind=verdict.kind)
            return obs, verdict.reward, False, False, info
        if wp.gt_action == rail.STOP:
            self._success = True
            self._done = True
            info = self._info(verify_message=verdict.message, new_conversation=False, correct=True, kind=verdict.kind)
            return {"text": "", "image": None}, verdict.reward, True, False, info
        self._wp_idx += 1
        self._tries_left = self.verify_iter
        obs = {"text": self._prompt(), "image": self._image(self._rail.waypoints[self._wp_idx])}
        info = self._info(verify_message=verdict.message, new_conversation=True, correct=True, kind=verdict.kind)
        return obs, verdict.reward, False, False, info


def _make(split: str, language_only: bool, options: dict[str, Any]) -> VirlEnv:
    if "language_only" in options:
        raise EnvError("language_only is set by the env name: use 'virl-l' (text) or 'virl-vl' (images)")
    valid = sorted(set(inspect.signature(VirlEnv.__init__).parameters) - {"self", "split", "language_only"})
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EnvError(f"unknown V-IRL option {key!r}{hint}; valid: {', '.join(valid)}")
    return VirlEnv(split=split, language_only=language_only, **options)


def make_virl_l(split: str = "train", **options: Any) -> VirlEnv:
    """V-IRL-L: text observations. See `VirlEnv` for the options."""
    return _make(split, True, options)


def make_virl_vl(split: str = "train", **options: Any) -> VirlEnv:
    """V-IRL-VL: a 2x2 street-view grid per waypoint. See `VirlEnv` for the options."""
    return _make(split, False, options)
