"""Bad input stops an RL run with a message naming the fault, and keeps the checkpoints written:
GRPO group_size < 2, an env (reward function) that raises, malformed observations and rewards."""

import math
import os

import pytest

from sftrl_jax import cli
from sftrl_jax import episodes as rollout
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train.metrics import read_jsonl

from .test_rl_train import make


def test_grpo_group_size_below_two_is_refused(tmp_path, capsys):
    cfg = make(tmp_path, "grpo", algo__="grpo")
    code = cli.main(["rl", "--config", str(tmp_path / "grpo.yaml"), "grpo.group_size=1"])
    err = capsys.readouterr().err
    assert code == 2 and "sftrl rl: error:" in err and "grpo.group_size must be >= 2" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(cfg.train.run_dir)  # refused before anything was written


class Echo:
    """A one-turn env that scores 'ok' +1; `obs`/`reward`/`fail` let a test break it."""

    name = "echo"

    def __init__(self, *, obs=None, reward=1.0, fail=False):
        self.bad_obs, self.reward, self.fail = obs, reward, fail

    def reset(self, seed=None, options=None):
        return {"text": f"episode {seed}", "image": None}, {}

    def step(self, text):
        if self.fail:
            raise ZeroDivisionError("division by zero in the reward")
        obs = self.bad_obs if self.bad_obs is not None else {"text": "try again", "image": None}
        return obs, self.reward, False, False, {}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def answer_ok(tok):
    return lambda contexts, images: [(tok.encode("ok"), [-0.1] * len(tok.encode("ok"))) for _ in contexts]


@pytest.mark.parametrize(
    "env,message",
    [
        (
            Echo(fail=True),
            r"env 0 \(echo\) step at episode 0 turn 0 raised while scoring the answer 'ok': "
            r"ZeroDivisionError: division by zero in the reward",
        ),
        (Echo(obs="try again"), r"env 0 \(echo\) step .* returned an observation of type str; expected a dict"),
        (Echo(obs={"txt": "x"}), r"returned an observation without 'text' \(keys: \['txt'\]\)"),
        (Echo(obs={"text": b"x", "image": None}), r"observation 'text' of type bytes; expected str"),
        (Echo(obs={"text": "", "image": None}), r"empty observation 'text' for an episode that goes on"),
        (Echo(obs={"text": "x", "image": "cards.png"}), r"observation 'image' str; expected None, a PIL image"),
        (Echo(reward=math.nan), r"returned reward nan; expected a finite number"),
        (Echo(reward="5"), r"returned reward '5'; expected a finite number"),
    ],
)
def test_runner_names_the_broken_env(tok, env, message):
    runner = rollout.EpisodeRunner([env], tok, answer_ok(tok))
    with pytest.raises(rollout.RolloutError, match=message):
        runner.step()


def test_malformed_reset_observation(tok):
    class BadReset(Echo):
        def reset(self, seed=None, options=None):
            return {"text": "x", "image": [[1, 2]]}, {}  # a list, not an image

    runner = rollout.EpisodeRunner([Echo(), BadReset()], tok, answer_ok(tok))
    with pytest.raises(rollout.RolloutError, match=r"env 1 \(echo\) reset\(seed=1\) returned observation 'image' list"):
        runner.step()


class Breaks:
    """Wraps a real env; from the `after`-th step call on (counted over all wrapped envs) it fails."""

    calls = 0

    def __init__(self, env, after, how):
        self.env, self.after, self.how = env, after, how
        self.name = env.name

    def reset(self, seed=None, options=None):
        return self.env.reset(seed=seed, options=options)

    def step(self, text):
        Breaks.calls += 1
        out = self.env.step(text)
        if Breaks.calls > self.after:
            if self.how == "raises":
                raise KeyError("reward table has no entry 'PARTIAL'")
            return ({"image": None}, *out[1:])
        return out


def test_failing_env_stops_the_run_and_keeps_checkpoints(tmp_path, xla_cache):
    for how, message in (
        (
            "raises",
            r"env \d \(gp-l\) step at episode \d+ turn \d raised while scoring the answer .*"
            r"KeyError: \"reward table has no entry 'PARTIAL'\"",
        ),
        ("malformed", r"env \d \(gp-l\) step at episode \d+ turn \d returned an observation without 'text'"),
    ):
        cfg = make(tmp_path, how, train__updates=3)
        trainer = Trainer(cfg)
        Breaks.calls = 0
        trainer.learner.envs = [
            Breaks(e, after=8, how=how) for e in trainer.learner.envs
        ]  # update 1 = 2 steps x 4 envs
        with pytest.raises(rollout.RolloutError, match=message):
            trainer.run()
        run = cfg.train.run_dir
        assert [r["step"] for r in read_jsonl(os.path.join(run, "metrics.jsonl"))] == [1]
        with ckpt_lib.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
            assert ckpt.all_steps() == [1]  # update 1's checkpoint is kept; a resume starts there
        assert not os.path.exists(os.path.join(run, "final"))
