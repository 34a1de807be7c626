"""The evaluation protocol with scripted policies of known behaviour: exact rates and counts."""

import json

import pytest

from sftrl_jax import episodes as rollout
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.envs.general_points import expert as gp_expert
from sftrl_jax.envs.virl import expert as virl_expert
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import evaluate as ev


class Recorder:
    """Keeps the last info of an env, so a scripted policy can play from the env's own state."""

    def __init__(self, env):
        self.env, self.info = env, None

    def reset(self, seed=None, options=None):
        obs, self.info = self.env.reset(seed=seed, options=options)
        return obs, self.info

    def step(self, text):
        obs, r, term, trunc, self.info = self.env.step(text)
        return obs, r, term, trunc, self.info


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def run(tok, proto, answer, batch_size=8):
    """`answer(info) -> text` plays every active env."""
    runner = ev.make_runner(None, tok, proto, batch_size=batch_size)
    runner.envs = [Recorder(e) for e in runner.envs]

    def policy(contexts, images):
        active = [i for i in range(len(runner.envs)) if runner.active[i]]
        assert len(active) == len(contexts)
        return [(tok.encode(answer(runner.envs[i].info)) + [tok.eot_id], [0.0]) for i in active]

    runner.policy = policy
    turns = rollout.run_episodes(runner, proto.n_episodes)
    return turns, ev.summarize(proto, turns)


def test_gp_protocol_constants():
    assert ev.protocol("gp-l", "id") == ev.EvalProtocol("gp-l", "id", 234, 42, 5)
    assert ev.protocol("gp-vl", "id", recognition=True).verify_iter == 1
    assert ev.protocol("virl-l", "ood-rule").n_episodes == 48
    assert ev.protocol("virl-vl", "ood-visual").n_episodes == 18


def test_gp_always_correct_and_always_illegal(tok):
    proto = ev.protocol("gp-l", "ood-rule", n_episodes=40)
    turns, s = run(tok, proto, lambda info: gp_expert.expert_answer(info["cards"], info["numbers"]))
    assert (s["episodes"], s["turns"], s["success_rate"]) == (40, 40, 1.0)
    assert s["turns/CORRECT"] == 40 and s["turns/ILLEGAL_FORMULA"] == 0
    turns, s = run(tok, proto, lambda info: '{"formula": "x*3=24"}')
    assert (s["episodes"], s["turns"], s["success_rate"]) == (40, 40 * 6, 0.0)
    counts = {k[len("turns/") :]: v for k, v in s.items() if k.startswith("turns/") and v}
    assert counts == {"ILLEGAL_FORMULA": 40 * 5, "STEP_LIMIT": 40}
    assert s["reward_mean"] == pytest.approx((5 * -3 - 1) / 6)


def test_gp_vl_recognition_is_one_turn_per_episode(tok):
    proto = ev.protocol("gp-vl", "ood-visual", recognition=True, n_episodes=10)
    _, s = run(tok, proto, lambda info: "{\"cards\": ['A', 'A', 'A', 'A'], \"formula\": \"1\"}")
    wrong = s["turns"] - round(s["recognition_accuracy"] * s["turns"])
    assert s["turns"] == 10 and s["episodes"] == 10
    assert 0 < wrong <= 10  # an all-aces hand is almost never dealt
    _, s = run(tok, proto, lambda info: gp_expert.expert_answer(info["cards"], info["numbers"]))
    assert (s["recognition_accuracy"], s["success_rate"], s["turns"]) == (1.0, 1.0, 10)


def test_virl_expert_and_wrong_policy(tok, tmp_path):
    proto = ev.protocol("virl-l", "id", n_episodes=6)
    turns, s = run(tok, proto, virl_expert.expert_answer)
    assert s["route_success_rate"] == 1.0 and s["per_step_accuracy"] == 1.0
    assert sorted({t.info["route_idx"] for t in turns}) == list(range(6))
    turns, s = run(
        tok,
        proto,
        lambda info: '{"action": "forward()"}' if info["gt_action"] != "forward()" else '{"action": "stop()"}',
    )
    assert s["route_success_rate"] == 0.0 and s["per_step_accuracy"] == 0.0
    assert s["turns"] == 6 * 3  # 2 graded wrong answers + the truncation, at the first waypoint
    ev.write_outputs(tmp_path, proto, turns, s)
    rows = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and rows[0]["sample_id"] == 0 and rows[2]["truncated"] is True
    assert json.loads((tmp_path / "summary.json").read_text())["route_success_rate"] == 0.0
    assert "| virl-l | id | per_step_accuracy | 0.0% ± 0.0 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "args, match",
    [
        (("gp-x", "id"), "unknown task 'gp-x'"),
        (("gp-l", "train"), "unknown eval split 'train'"),
        (("gp-l", "ood-visual"), "gp-l has no visual variant"),
    ],
)
def test_bad_protocol_arguments(args, match):
    with pytest.raises(UserError, match=match):
        ev.protocol(*args)


def test_bad_checkpoints_for_eval(tmp_path, capsys):
    """A missing folder, a folder that is no checkpoint, another model family, a text model on a -vl task."""
    from sftrl_jax import cli
    from sftrl_jax.models import build
    from sftrl_jax.models import config as config_lib
    from sftrl_jax.models.checkpoint import save_checkpoint
    from sftrl_jax.train.state import load_for_eval

    with pytest.raises(UserError, match="does not exist"):
        load_for_eval(str(tmp_path / "nope"), "gp-l")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither our checkpoint"):
        load_for_eval(str(tmp_path / "empty"), "gp-l")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"})
    )
    with pytest.raises(UserError, match="Qwen2VLForConditionalGeneration"):
        load_for_eval(str(qwen), "gp-l")
    assert cli.main(["eval", "--ckpt", str(qwen), "--task", "gp-l", "--split", "id"]) == 2
    assert "Qwen2VLForConditionalGeneration" in capsys.readouterr().err
    text = tmp_path / "llama"
    save_checkpoint(build.create_model(config_lib.LlamaConfig.tiny(vocab_size=2048)), str(text))
    with pytest.raises(UserError, match="task gp-vl shows images, but .* is a text-only LlamaForCausalLM"):
        load_for_eval(str(text), "gp-vl")
