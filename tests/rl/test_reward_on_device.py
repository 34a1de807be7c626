"""`env.reward_on_device`: the rollout's rewards from the compiled device reward right after sampling
(`envs.device_scoring`), equal to the host's; one GRPO update logs the same metrics on and off."""

import logging
import os

import jax
import numpy as np
import pytest

from sftrl_jax import envs, episodes
from sftrl_jax.config import ConfigError
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.envs import device_scoring
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train.metrics import read_jsonl
from tests.envs import gamed_answers
from tests.rl.test_rl_train import make, untimed

WIDTH = 24  # response columns of the runner tests (one compiled shape per batch size)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def gp_policy(tok, gp_envs, solve=True):
    """Answers that reach several outcomes: a solution, a wrong value, an illegal formula, no JSON
    (`solve` False: a fixed formula instead of the hand's solution)."""
    calls = [0]

    def policy(contexts, images):
        out = []
        for k, _ in enumerate(contexts):
            env = gp_envs[k % len(gp_envs)]
            pick = (calls[0] + k) % 4
            sol = env.puzzle.solutions[0] if solve and env.puzzle.solutions else "(1+2)*8"
            text = [f'{{"formula": "{sol}=24"}}', '{"formula": "1+2=3"}', '{"formula": "((1+"}', "no idea"][pick]
            ids = tok.encode(text)[: WIDTH - 1] + [tok.eot_id]
            out.append((ids, [-0.5] * len(ids)))
        calls[0] += 1
        return out

    return policy


def play(tok, scorer, *, n=3, steps=6, corrupt=0.0):
    gp = [envs.make("gp-l") for _ in range(n)]
    if corrupt:
        for env in gp:
            step = env.step

            def bad(text, step=step):
                obs, r, term, trunc, info = step(text)
                return obs, r + corrupt, term, trunc, info

            env.step = bad
    runner = episodes.EpisodeRunner(gp, tok, gp_policy(tok, gp), scorer=scorer)
    return [t for row in episodes.collect(runner, steps) for t in row]


def test_runner_trains_on_the_device_reward_equal_to_the_host(tok):
    scorer = device_scoring.DeviceScorer("gp-l", tok, width=WIDTH)
    host = play(tok, None)
    dev = play(tok, scorer)
    assert [(t.text, t.reward, t.done) for t in dev] == [(t.text, t.reward, t.done) for t in host]
    assert {t.info["outcome"] for t in dev} >= {"CORRECT", "INCORRECT_NUMBER", "ILLEGAL_FORMULA"}
    assert all(t.info["reward_source"] == "device" and not t.info["reward_device_mismatch"] for t in dev)
    assert scorer.rows == len(dev) and scorer.calls == 6  # one compiled batch per turn
    # a host reward that differs: the turn trains on the host's (the reference), counted and logged
    bad = play(tok, scorer, corrupt=0.25)
    assert [t.reward for t in bad] == [t.reward + 0.25 for t in host]
    assert all(t.info["reward_device_mismatch"] and t.info["reward_source"] == "host" for t in bad)
    assert [t.info["reward_device"] for t in bad] == [t.reward for t in host]


def gamed_policy(tok, gp_envs, depth=70):
    """Issue #32's gamed answer every turn: the hand's solution, then "1+1", under duplicate "formula"
    keys, and a pad `depth` levels deep (json.loads reads the last formula: -4)."""

    def policy(contexts, images):
        out = []
        for k, _ in enumerate(contexts):
            text = gamed_answers.gamed_gp(gp_envs[k].puzzle.solutions[0], depth)
            ids = tok.encode(text) + [tok.eot_id]
            out.append((ids, [-0.5] * len(ids)))
        return out

    return policy


def play_gamed(tok, scorer, *, steps=4):
    gp = [envs.make("gp-l") for _ in range(2)]
    runner = episodes.EpisodeRunner(gp, tok, gamed_policy(tok, gp), scorer=scorer)
    return [t for row in episodes.collect(runner, steps) for t in row]


def test_gamed_answer_trains_on_the_host_reward(tok):
    """Issue #32: the device scored the gamed answer +5 (it read the first "formula"), the host -4, and
    the runner trained on +5. Now the device leaves the row to the host and the turn has -4."""
    host = play_gamed(tok, None)
    assert [t.reward for t in host] == [-4.0] * 8
    dev = play_gamed(tok, device_scoring.DeviceScorer("gp-l", tok, width=WIDTH))
    assert [t.reward for t in dev] == [t.reward for t in host]
    assert all(t.info["reward_source"] == "host" and "reward_device_mismatch" not in t.info for t in dev)


class LyingScorer:
    """A device reward that disagrees with the host on every row (+5, CORRECT)."""

    @staticmethod
    def state_of(env):
        return {}

    def score(self, states, responses, *, batch=0):
        return [(5.0, "CORRECT")] * len(responses)


def test_any_device_disagreement_trains_on_the_host_reward_and_is_logged(tok, caplog):
    host = play_gamed(tok, None, steps=2)
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.episodes"):
        dev = play_gamed(tok, LyingScorer(), steps=2)
    assert [t.reward for t in dev] == [t.reward for t in host] == [-4.0] * 4
    for t in dev:
        assert t.info["reward_device_mismatch"] and t.info["reward_source"] == "host"
        assert t.info["reward_device"] == 5.0
    lines = [r.getMessage() for r in caplog.records if "device reward mismatch" in r.getMessage()]
    assert len(lines) == 4
    assert "env 1 (gp-l) episode 1 turn 1: host -4.0 (trained on), device 5.0 (CORRECT)" in lines[-1]
    assert '"formula": "1+1"' in lines[-1]


def test_rows_the_device_cannot_score_use_the_host_reward(tok):
    scorer = device_scoring.DeviceScorer("gp-l", tok, width=WIDTH)
    scorer.fn = envs.device_reward_fn("gp-l", tok, max_bytes=20)  # answers over 20 bytes: DID_NOT_FIT
    scorer._run = jax.jit(scorer.fn.with_outcome)
    host, dev = play(tok, None, steps=2), play(tok, scorer, steps=2)
    assert [t.reward for t in dev] == [t.reward for t in host]
    long = [t for t in dev if len(t.text.encode()) > 20]
    assert long and all(t.info["reward_source"] == "host" for t in long)
    assert all(t.info["reward_source"] == "device" for t in dev if len(t.text.encode()) <= 20)
    state = scorer.state_of(envs.make("gp-l", exact=False))  # refused options: host
    assert state is None


@pytest.mark.slow  # 16 s cold; the device reward is an opt-in check since #31
def test_one_grpo_update_same_metrics_on_and_off(tmp_path, monkeypatch):
    scored = []
    score = device_scoring.DeviceScorer.score

    def spy(self, states, responses, **kw):
        rows = score(self, states, responses, **kw)
        scored.extend(rows)
        return rows

    monkeypatch.setattr(device_scoring.DeviceScorer, "score", spy)
    rows = {}
    for flag in (False, True):
        cfg = make(tmp_path, f"on{flag}", algo__="grpo", env__reward_on_device=flag)
        trainer = Trainer(cfg)
        assert (trainer.learner.reward_scorer is not None) == flag
        trainer.run(stop_after=1)
        rows[flag] = untimed(read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl")))[-1]
    on, off = rows[True], rows[False]
    assert on.pop("train/reward_device_share") == 1.0 and on.pop("train/reward_device_mismatch") == 0
    assert on == off  # rewards, advantages (through the losses), losses, gradients, outcomes
    assert len(scored) == off["train/turns"] and all(r is not None for r in scored)
    assert {"train/loss", "train/reward_mean", "train/grad_norm"} <= set(off), sorted(off)


def test_auto_is_on_for_default_options_and_off_for_host_only_ones():
    for task in envs.ENV_NAMES:
        assert device_scoring.resolve(None, task, {}) is True
    assert device_scoring.resolve(None, "gp-l", {"exact": False}) is False
    assert device_scoring.resolve(None, "gp-l", {"repeat_penalty": -0.5}) is False
    assert device_scoring.resolve(True, "gp-l", {"repeat_penalty": 0}) is True
    assert device_scoring.resolve(False, "virl-l", {}) is False


@pytest.mark.parametrize(
    "options,name",
    [
        ({"exact": False}, "env.options.exact"),
        ({"reference_card_parsing": True}, "env.options.reference_card_parsing"),
        ({"repeat_penalty": -1.0}, "env.options.repeat_penalty"),
    ],
)
def test_explicit_true_with_a_host_only_option_is_a_config_error(tmp_path, options, name):
    with pytest.raises(ConfigError, match=rf"env.reward_on_device is true but {name}"):
        make(tmp_path, "bad", env__reward_on_device=True, env__options=options)
    make(tmp_path, "auto", env__options=options)  # auto: off, no error


def test_scorer_pads_rows_and_columns_to_one_shape(tok):
    scorer = device_scoring.DeviceScorer("gp-l", tok, width=WIDTH)
    env = envs.make("gp-l")
    env.reset(seed=3)
    ids = tok.encode('{"formula": "1+2=3"}')
    out = scorer.score([scorer.state_of(env), None], [ids, ids], batch=3)
    assert out[1] is None and out[0] is not None
    _, reward, _, _, info = env.step(tok.decode(ids))
    assert out[0] == (reward, info["outcome"])
    assert np.isfinite(scorer.seconds)


@pytest.mark.slow  # 10 s cold; the device reward is an opt-in check since #31
def test_two_processes_score_their_own_envs(tok, monkeypatch):
    """Two runners in threads stand for two processes (as tests/rl/test_multihost.py): each scores its
    own envs' rows on the device; both see the turns of one process's runner with the same scorer."""
    import threading

    slots, barrier, rank = [None, None], threading.Barrier(2), threading.local()

    def allgather(obj):
        slots[rank.value] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(episodes.distributed, "allgather_objects", allgather)

    def run(share, scorer):
        gp = [envs.make("gp-l") for _ in range(4)]
        runner = episodes.EpisodeRunner(gp, tok, gp_policy(tok, gp, solve=False), scorer=scorer, share=share)
        turns = [t for row in episodes.collect(runner, 4) for t in row]
        return [(t.env_index, t.text, t.reward, t.info["reward_source"]) for t in turns]

    ref = run((0, 1), device_scoring.DeviceScorer("gp-l", tok, width=WIDTH))
    results, scorers = [None, None], [device_scoring.DeviceScorer("gp-l", tok, width=WIDTH) for _ in range(2)]

    def worker(r):
        rank.value = r
        results[r] = run((r, 2), scorers[r])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == results[1] == ref and {s for *_, s in ref} == {"device"}
    assert [s.rows for s in scorers] == [8, 8]  # 2 envs x 4 turns each
