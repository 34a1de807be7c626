"""Gamed answers (issue #32): duplicate answer keys with JSON nested past the device's depth.

`{"formula": "<a solution>", "formula": "1+1", "pad": [[[...63 levels...]]]}` scored +5 on the device
and -4 on the host: `json.loads` reads it (its limit is Python's recursion limit) and keeps the last
"formula", while the device took the deep object for unparsable and fell back to the regex, which
reads the first. Now `device_json.scan` reports such a row undecided and the device reward leaves it
to the host (outcome JSON_TOO_DEEP; `DeviceScorer.score` gives None). The differential fuzz plays
adversarial answers through real envs and checks that the value a run would train on (the device's
where it decides, else the host's) is the host's on every row.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import envs
from sftrl_jax.data import tokenizer as tokenizer_lib
from sftrl_jax.envs import device_json, device_scoring, device_text
from sftrl_jax.envs.general_points import render
from tests.envs import device_reward_cases as cases_lib
from tests.envs import gamed_answers

DEPTHS = (1, 30, 60, 61, 62, 63, 64, 100, 200)  # the pad's depth (the answer's object adds one level)

# One compiled shape per task (GP-L and GP-VL share the program): rows of more ids or bytes are left
# to the host (DID_NOT_FIT), as in a run.
LENGTH, MAX_BYTES, BATCH = 640, 1536, 512
_CALLS: dict[str, object] = {}


def _device(tok, task: str):
    """The task's reward with this module's byte budget and its jitted `with_outcome` (compiled once)."""
    kind = task[:3]
    fn = envs.device_reward_fn(task, tok, max_bytes=MAX_BYTES)
    if kind not in _CALLS:
        _CALLS[kind] = jax.jit(fn.with_outcome)
    return fn, _CALLS[kind]


def _scorer(tok, task: str) -> device_scoring.DeviceScorer:
    """The rollout's scorer over `_device`'s program (rows padded to LENGTH ids)."""
    scorer = device_scoring.DeviceScorer(task, tok, width=LENGTH)
    scorer.fn, scorer._run = _device(tok, task)
    return scorer


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer()


@pytest.fixture(autouse=True)
def _no_images(monkeypatch):
    monkeypatch.setattr(render, "render_hand", lambda hand: None)  # gp-vl's image is not graded


def _scan_end(text: str) -> int:
    raw = text.encode()
    b = np.full((1, len(raw) + 4), device_text.END, np.int32)
    b[0, : len(raw)] = list(raw)
    _, _, end = jax.jit(device_json.scan)(jnp.asarray(b), jnp.zeros((1,), jnp.int32))
    return int(end[0])


@pytest.mark.parametrize(
    "text,want",
    [
        ('{"a": ' + "[" * 61 + "]" * 61 + "}", "parses"),  # 62 levels: the device reads it
        ('{"a": ' + "[" * 62 + "]" * 62 + "}", device_json.TOO_DEEP),  # 63: Python's recursion limit decides
        ('{"a": ' + "[" * 200 + "]" * 200 + "}", device_json.TOO_DEEP),
        ('{"a": ' + "[" * 70 + "} ", device_json.TOO_DEEP),  # broken after the depth: undecided too
        ('{"a": x' + "[" * 100, -1),  # broken before it: a plain failure
    ],
    ids=["62-levels", "63-levels", "201-levels", "broken-past-62", "broken-before"],
)
def test_scan_reports_nesting_past_max_depth_as_undecided(text, want):
    end = _scan_end(text)
    assert end == (len(text) - 1 if want == "parses" else want)


def _score_both(tok, task, make_text):
    """[(depth, first, device row or None, host reward)] of one env's first turn per case, the device
    rows from the rollout's `DeviceScorer` in one call."""
    env = envs.make(task)
    scorer = _scorer(tok, task)
    cases, states, ids = [], [], []
    for depth in DEPTHS:
        for first in (True, False):
            env.reset(seed=7)
            states.append(scorer.state_of(env))
            ids.append(tok.encode(make_text(env, depth, first)))
            _, host, _, _, _ = env.step(tok.decode(ids[-1]))
            cases.append((depth, first, host))
    rows = scorer.score(states, ids, batch=BATCH)
    return [(depth, first, row, host) for (depth, first, host), row in zip(cases, rows)]


def test_gamed_gp_answer_is_left_to_the_host(tok):
    def text(env, depth, first):
        return gamed_answers.gamed_gp(env.puzzle.solutions[0], depth, solution_first=first)

    for depth, first, row, host in _score_both(tok, "gp-l", text):
        assert host == (-4.0 if first else 5.0)  # json.loads: the last "formula" counts
        if 1 + depth > device_json.MAX_DEPTH:
            assert row is None, (depth, first, row, host)  # was (5.0, "CORRECT") with host -4
        else:
            assert row is not None and row[0] == host, (depth, first, row, host)


def test_gamed_virl_answer_is_left_to_the_host(tok):
    def text(env, depth, first):
        gt = env._info(verify_message=None, new_conversation=False, correct=None, kind=None)["gt_action"]
        assert gt != "forward()"
        return gamed_answers.gamed_virl(gt, depth, action_first=first)

    for depth, first, row, host in _score_both(tok, "virl-l", text):
        assert host == (-1.0 if first else 1.0)
        if 1 + depth > device_json.MAX_DEPTH:
            assert row is None, (depth, first, row, host)  # was (1.0, "correct") with host -1
        else:
            assert row is not None and row[0] == host, (depth, first, row, host)


# -------------------------------------------------------------------------------- differential fuzz


def _differential(tok, task: str, cases: cases_lib.Cases) -> dict[str, int]:
    """Device vs host over `cases`; returns the counts (see `_check_fuzz`)."""
    fn, call = _device(tok, task)
    fits = [i for i in range(len(cases)) if len(cases.ids[i]) <= LENGTH]
    part = cases_lib.Cases(
        *[[getattr(cases, f)[i] for i in fits] for f in ("ids", "states", "rewards", "outcomes", "texts")]
    )
    r, o = cases_lib.run_device(fn, part, length=LENGTH, batch=BATCH, pad_id=tok.pad_id, call=call)
    rewards = np.zeros(len(cases), np.float32)
    outcomes = [device_text.DID_NOT_FIT] * len(cases)
    for k, i in enumerate(fits):
        rewards[i], outcomes[i] = r[k], o[k]
    n = collections.Counter(total=len(cases))
    for i in range(len(cases)):
        host = np.float32(cases.rewards[i])
        decided = outcomes[i] not in device_text.HOST_OUTCOMES
        trained = rewards[i] if decided else host  # what a run trains on where the device decides
        n["trained_not_host"] += bool(trained != host)
        n["raw_disagreements"] += bool(decided and (rewards[i] != host or outcomes[i] != cases.outcomes[i]))
        n["decided" if decided else outcomes[i]] += 1
        deep = cases_lib.max_nesting(cases.texts[i]) > device_json.MAX_DEPTH
        n["nested_past_62"] += deep
        if outcomes[i] == device_text.JSON_TOO_DEEP:
            assert deep, cases.texts[i]  # the device leaves only what it cannot read to the host
            n["too_deep_device_value_not_host"] += bool(rewards[i] != host)  # trained on before the fix
            n["too_deep_in_answers_favour"] += bool(rewards[i] > host)
    return dict(n)


def _fuzz(tok, n_gp_episodes: int, n_virl_episodes: int, seed: int) -> dict[str, dict[str, int]]:
    rng = np.random.default_rng(seed)
    out = {}
    gp = cases_lib.Cases()
    for task, n_ep in (("gp-l", n_gp_episodes // 2), ("gp-vl", n_gp_episodes - n_gp_episodes // 2)):
        c = cases_lib.play(
            envs.make(task), tok, gamed_answers.gp_answer, n_ep, rng, outcome_key="outcome", stop_ids=tok.stop_ids
        )
        for i in range(len(c)):
            gp.add(c.ids[i], c.states[i], c.rewards[i], c.outcomes[i], c.texts[i])
    out["gp-l/gp-vl"] = _differential(tok, "gp-l", gp)
    virl = cases_lib.play(
        envs.make("virl-l"),
        tok,
        gamed_answers.virl_answer,
        n_virl_episodes,
        rng,
        outcome_key="reward_kind",
        stop_ids=tok.stop_ids,
    )
    out["virl-l"] = _differential(tok, "virl-l", virl)
    return out


def _check_fuzz(counts: dict[str, dict[str, int]], *, min_total: int, seconds: float) -> None:
    total = sum(c["total"] for c in counts.values())
    summed = collections.Counter()
    for c in counts.values():
        summed.update(c)
    print(f"\ngaming fuzz: {total} answers in {seconds:.1f} s; {dict(summed)}")
    for task, c in counts.items():
        print(f"  {task}: {c}")
    assert total >= min_total
    assert summed["trained_not_host"] == 0 and summed["raw_disagreements"] == 0, counts
    # the mix is adversarial: deep rows, many of which the old device scored differently from the host
    assert summed["JSON_TOO_DEEP"] >= total // 5 and summed["too_deep_device_value_not_host"] >= total // 100, counts
    assert summed["decided"] >= total // 2  # and the device still decides most rows


def test_gaming_fuzz_2k_device_decides_only_what_the_host_would(tok):
    t0 = time.perf_counter()
    counts = _fuzz(tok, 300, 250, seed=11)
    _check_fuzz(counts, min_total=2_000, seconds=time.perf_counter() - t0)


@pytest.mark.slow
def test_gaming_fuzz_20k_device_decides_only_what_the_host_would(tok):
    t0 = time.perf_counter()
    counts = _fuzz(tok, 3000, 2500, seed=12)
    _check_fuzz(counts, min_total=20_000, seconds=time.perf_counter() - t0)
