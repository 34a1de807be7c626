"""The RL loop end to end on a tiny random Llama: rollouts through the sampler, PPO and GRPO updates,
trainer-sampler log-prob gap ~ 0 on the first epoch, SIGKILL + resume gives the same metrics and
params as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sftrl_jax import config
from sftrl_jax.rl import batching
from sftrl_jax.rl.config import RLConfig
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train.metrics import read_jsonl

TINY = {
    "model": {
        "preset": "llama-tiny",
        "text_overrides": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 1024,
        },
    },
    "env": {"task": "gp-l", "num_envs": 4},
    "sampling": {"max_new_tokens": 12, "temperature": 1.0},
    "ppo": {"epochs": 2, "samples_per_step": 4, "micro_batch": 4},
    "grpo": {"group_size": 2, "samples_per_step": 4, "micro_batch": 4},
    "optim": {"lr": 1.0e-3, "grad_clip": 1.0},
    "eval": {"every": 0, "splits": []},
    "train": {
        "updates": 2,
        "steps_per_update": 2,
        "prompts_per_update": 2,
        "length_buckets": [512, 1024],
        "devices": 1,
        "progress": False,
        "async_checkpointing": False,
    },
}


def make(tmp_path, name, **over):
    d = json.loads(json.dumps(TINY))
    d["train"]["run_dir"] = str(tmp_path / name)
    for k, v in over.items():
        a, b = k.split("__")
        d[a] = v if b == "" else {**d.get(a, {}), b: v}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return config.load(RLConfig, p)


KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    from sftrl_jax import config
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl.train import train
    from sftrl_jax.train import checkpoint
    save = checkpoint.Checkpointer.save
    def save_then_die(self, step, *a, **k):
        out = save(self, step, *a, **k)
        if step == {kill_step}:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after the checkpoint landed
        return out
    checkpoint.Checkpointer.save = save_then_die
    train(config.load(RLConfig, sys.argv[1]))
""")

TIMING = ("time", "train/rollout_tokens_per_s", "train/rollout_seconds", "train/train_seconds")


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_params(run_dir, ckpt="final"):
    from flax import nnx

    from sftrl_jax.models.checkpoint import load_checkpoint

    model = load_checkpoint(os.path.join(run_dir, ckpt))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


@pytest.mark.slow  # 83 s on a cold cache; RL resume after SIGKILL stays in the default suite with GRPO (test_rl_faults)
def test_ppo_sigkill_resume_gives_identical_metrics(tmp_path, xla_cache):
    cfg = make(tmp_path, "full")
    Trainer(cfg).run()
    full = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in full] == [1, 2]
    m = full[0]
    assert m["train/turns"] == 8 and m["train/logprob_gap_first_step"] < 1e-5
    assert m["train/trainer_sampler_turn_logp_gap"] < 1e-4, m["train/trainer_sampler_turn_logp_gap"]
    # the old log-probs come from the training forward (ppo.old_logp: trainer), computed in the
    # first step's own batch layout: the first step's ratio is exactly 1
    assert m["train/ratio_dev_first_step"] == 0.0, m["train/ratio_dev_first_step"]
    assert m["train/gflops"] > 0 and m["train/finite"] == 1.0
    assert sum(v for k, v in m.items() if k.startswith("train/outcome/")) == 8  # every turn scored

    killed = make(tmp_path, "killed")
    code = KILL_AFTER_SAVE.format(kill_step=1)
    path = tmp_path / "killed.yaml"
    env = dict(os.environ, **xla_cache)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(killed.train.run_dir, "final"))
    trainer = Trainer(killed)  # resumes from update 1
    assert trainer.update_idx == 1
    saved = trainer.learner._rollout_state
    # Episodes were in progress at the checkpoint (2 turns of 4 envs, 5 attempts each): they are replayed.
    assert saved is not None and any(row["texts"] for row in saved["envs"]), saved
    trainer.run()
    resumed = read_jsonl(os.path.join(killed.train.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2]
    assert untimed(resumed) == untimed(full)  # bitwise-equal metrics after the resume
    a, b = final_params(cfg.train.run_dir), final_params(killed.train.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("old_logp", [pytest.param("sampler", marks=pytest.mark.slow), "trainer"])  # sampler: 9 s cold
def test_grpo_update(tmp_path, old_logp):
    cfg = make(tmp_path, "grpo", algo__="grpo", grpo__old_logp=old_logp)
    Trainer(cfg).run(stop_after=1)
    m = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))[-1]
    assert m["train/episodes_finished"] == 4 and m["train/logprob_gap_first_step"] < 1e-5
    if old_logp == "trainer":  # old log-probs from the training forward in the step's layout: ratio 1
        assert m["train/log_ratio_dev_first_step"] == 0.0, m["train/log_ratio_dev_first_step"]
    else:  # the sampler's log-probs: the first step's |log ratio| is the trainer-sampler gap
        assert m["train/log_ratio_dev_first_step"] == m["train/logprob_gap_first_step"] > 0


def test_ppo_first_step_sees_its_old_log_probs_bit_for_bit(tmp_path):
    """The values pass (old log-probs, values) and the reference pass run each turn in the layout of
    the first optimiser step (same companions, padded length and micro-batch row), so the first
    step's ratio is exactly 1 and its reference KL exactly 0, with micro-batches smaller than a step
    and turns of several lengths."""
    cfg = make(
        tmp_path,
        "layout",
        ppo__samples_per_step=8,
        ppo__micro_batch=2,
        ppo__kl_coef=0.1,
        train__length_buckets=list(range(64, 1025, 4)),
    )
    Trainer(cfg).run(stop_after=1)
    m = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))[-1]
    assert m["train/ratio_dev_first_step"] == 0.0, m["train/ratio_dev_first_step"]
    assert m["train/ref_kl_first_step"] == 0.0, m["train/ref_kl_first_step"]


def test_grpo_steps_cover_an_epoch():
    steps = batching.epoch_steps(np.array([5, 2, 7, 0, 1, 3, 6, 4, 8]), 4)
    assert steps == [[5, 2, 7, 0], [1, 3, 6, 4]]  # the partial last step is dropped
    assert batching.epoch_steps(np.array([2, 0, 1]), 4) == [[2, 0, 1, 2]]  # one short step: repeated up to S


def test_vl_task_needs_a_vision_model(tmp_path):
    from sftrl_jax.config import ConfigError

    with pytest.raises(ConfigError, match="has no vision tower"):
        Trainer(make(tmp_path, "vl", env__task="gp-vl"))


def test_in_run_evaluation_keeps_the_prompt_wording(tmp_path, monkeypatch):
    """A policy trained on another template is evaluated on it; the split's rules stay the split's."""
    from sftrl_jax.envs.general_points import prompts
    from sftrl_jax.rl import config as rl_config
    from sftrl_jax.rl import train as rl_train

    template = str(prompts.SHORT_TEMPLATE)
    options = {"template": template, "verify_iter": 3, "face_cards_as_10": True}
    assert rl_config.eval_env_options(options) == {"template": template}
    seen = []

    def fake_evaluate(policy, tokenizer, proto, **kw):
        seen.append((proto.split, kw["env_options"]))
        return dict(
            task=proto.task, split=proto.split, recognition=False, episodes=2, success_rate=0.5, success_rate_stderr=0.3
        )

    monkeypatch.setattr(rl_train.eval_lib, "evaluate", fake_evaluate)
    trainer = Trainer(make(tmp_path, "ev", env__options=options, eval__splits=["id", "ood-rule"]))
    rows = trainer.evaluate(_NullWriter())
    assert seen == [("id", {"template": template}), ("ood-rule", {"template": template})]
    assert [r["value"] for r in rows] == [0.5, 0.5]


class _NullWriter:
    def write(self, step, metrics, prefix=""):
        pass


@pytest.mark.parametrize("algo", [pytest.param("ppo", marks=pytest.mark.slow), "grpo"])  # ppo: 16 s cold
def test_kl_penalty_uses_the_starting_policy_as_reference(tmp_path, algo, monkeypatch):
    """`<algo>.kl_coef` > 0: the reference's token log-probs reach the loss (KL 0 at the first step,
    where the policy is the reference; > 0 in the next update), and a resumed run keeps the starting
    policy as its reference, not the checkpoint's parameters."""
    from sftrl_jax.rl import grpo as grpo_lib

    # A random policy fails every episode alike: equal returns, zero group advantages, and (now that
    # the first step's KL gradient is exactly 0) no update at all. Give the episodes +-1 instead.
    monkeypatch.setattr(grpo_lib, "episode_advantages", lambda eps, groups, cfg: np.resize([1.0, -1.0], len(eps)))
    over = {f"{algo}__kl_coef": 0.5, "algo__": algo, "train__save_every": 1}
    cfg = make(tmp_path, f"{algo}_kl", **over)
    Trainer(cfg).run()  # 2 updates
    rows = [r for r in read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl")) if "train/ref_kl" in r]
    assert len(rows) == 2
    assert rows[0]["train/ref_kl_first_step"] == 0.0  # the reference pass runs in the first step's layout
    assert rows[1]["train/ref_kl_first_step"] > 1e-7
    resumed = Trainer(cfg)
    fresh = Trainer(make(tmp_path, f"{algo}_fresh", **over))
    assert resumed.update_idx == 2
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), resumed.learner.ref_params, fresh.state.params)
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), resumed.learner.ref_params, resumed.state.params)
    assert not all(jax.tree.leaves(moved))


def test_exact_cpu_passes_compile_without_ynnpack_fusions(tmp_path, monkeypatch):
    """The RL passes are compiled without YNNPACK fusions on CPU (`train.exact_cpu_passes`, on by
    default): which fusions XLA hands to YNNPACK depends on the whole program, and with them the
    update step's first forward rounded differently from the values pass on a trained model
    (first-step |ratio - 1| 4.0e-5 -> exactly 0 without them, docs/RESULTS.md session 9)."""
    import jax.numpy as jnp

    from sftrl_jax import ops

    def f(x, w):
        h = x @ w
        return jnp.sum(jax.nn.log_softmax(h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6), -1))

    x, w = jnp.ones((64, 128)), jnp.ones((128, 256))
    compiled = lambda opts: jax.jit(jax.value_and_grad(f, 1), compiler_options=opts).lower(x, w).compile().as_text()  # noqa: E731
    policy = ops.policy_for(None, exact=True)
    options = lambda enabled: ops.exact_compiler_options(policy, enabled=enabled)  # noqa: E731
    assert "ynn_fusion" in compiled(options(False))  # XLA's default here: YNNPACK fusions
    assert "ynn_fusion" not in compiled(options(True))
    assert options(False) is None

    seen = []
    real = ops.exact_compiler_options
    monkeypatch.setattr(
        ops, "exact_compiler_options", lambda policy, enabled=True: seen.append(enabled) or real(policy, enabled)
    )
    Trainer(make(tmp_path, "exact"))
    Trainer(make(tmp_path, "fast", train__exact_cpu_passes=False))
    assert seen == [True, False]


@pytest.mark.slow  # 10 s cold
def test_ppo_success_reward_mode_reaches_gae(tmp_path, monkeypatch):
    """ppo.reward_mode="success": GAE sees 1 on solved turns and 0 elsewhere (not the env's table);
    the logged rewards stay the environment's."""
    from sftrl_jax import episodes as rollout
    from sftrl_jax.rl import ppo as ppo_lib

    seen = {}
    real_rewards, real_adv = rollout.rewards_array, ppo_lib.advantages_for

    def rewards_spy(buffer, mode="env"):
        seen["mode"], seen["env"] = mode, real_rewards(buffer)[0]
        seen["solved"] = np.array([[float(t.terminated and t.reward > 0) for t in row] for row in buffer])
        graded = [t for row in buffer for t in row if t.info["outcome"] not in (None, "STEP_LIMIT")]
        seen["repeated"] = sum(t.info["repeated"] for t in graded) / len(graded)
        return real_rewards(buffer, mode)

    def adv_spy(rewards, *a, **k):
        seen["gae"] = np.asarray(rewards)
        return real_adv(rewards, *a, **k)

    monkeypatch.setattr(rollout, "rewards_array", rewards_spy)
    monkeypatch.setattr(ppo_lib, "advantages_for", adv_spy)
    cfg = make(tmp_path, "succ", ppo__reward_mode="success")
    Trainer(cfg).run(stop_after=1)
    assert seen["mode"] == "success"
    assert seen["env"].min() < 0  # a random policy's answers are penalised by the env's table ...
    np.testing.assert_array_equal(seen["gae"], seen["solved"])  # ... GAE sees only the solved turns
    m = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))[-1]
    assert m["train/reward_mean"] == pytest.approx(float(seen["env"].mean()), abs=1e-6)
    assert m["train/repeated_answers"] == pytest.approx(seen["repeated"])  # GP's repeat metric


def test_snapshots_every_update_and_the_last_equals_final(tmp_path):
    """train.snapshot_every=1 over 2 updates (PPO): language-model checkpoints snapshots/1 and
    snapshots/2 (none at update 0; they load as the language model, as final does); snapshots/2 is bit
    for bit the final model, snapshots/1 an earlier one."""
    cfg = make(tmp_path, "snap", train__snapshot_every=1)
    Trainer(cfg).run()
    run = cfg.train.run_dir
    assert sorted(os.listdir(os.path.join(run, "snapshots"))) == ["1", "2"]
    final, two, one = (final_params(run, c) for c in ("final", "snapshots/2", "snapshots/1"))
    assert final.keys() == two.keys() == one.keys()
    for k in final:
        np.testing.assert_array_equal(two[k], final[k], err_msg=k)
    assert any(not np.array_equal(one[k], two[k]) for k in final)


def test_snapshot_every_is_validated():
    from sftrl_jax.config import ConfigError
    from sftrl_jax.rl.config import RLTrainSection

    assert RLTrainSection().snapshot_every == 0
    with pytest.raises(ConfigError, match=r"train\.snapshot_every must be >= 0 .*got -2"):
        RLTrainSection(snapshot_every=-2)
