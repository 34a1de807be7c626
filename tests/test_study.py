"""`sftrl study` end to end at toy sizes, its KL diagnostic, and resume."""

import json

import numpy as np
import pytest

from sftrl_jax import cli

TINY = [
    "seeds=[3]",
    "probe_episodes=4",
    "eval_episodes=4",
    "eval_batch=4",
    "kl_prompts=3",
    "warmup.examples=32",
    "warmup.steps=2",
    "warmup.batch_size=4",
    "arms.points=2",
    "arms.updates=2",
    "arms.num_envs=4",
    "arms.steps_per_update=2",
    "arms.prompts_per_update=2",
    "arms.group_size=2",
    "arms.samples_per_step=8",
    "arms.micro_batch=8",
    "arms.max_new_tokens=8",
    "progress=false",
]
STUDY = ["warmup.diverse_rules=0.5", *TINY]  # the module's study run: Init warmed up on diverse rules too


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Llama saved as a model folder (the study only needs a folder to start from)."""
    from sftrl_jax.models.checkpoint import save_checkpoint
    from sftrl_jax.train.state import ModelSection, load_model

    path = tmp_path_factory.mktemp("base") / "base"
    model = load_model(
        ModelSection(
            preset="llama-tiny",
            text_overrides=dict(
                vocab_size=2048,
                hidden_size=32,
                intermediate_size=64,
                num_layers=1,
                num_heads=2,
                num_kv_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
            ),
        ),
        seed=0,
    )
    save_checkpoint(model, str(path))
    return str(path)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def study_run(tiny_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("study") / "s"
    assert cli.main(["study", f"run_dir={run}", f"base={tiny_base}", *STUDY]) == 0
    return run


def test_study_evaluates_every_checkpoint_of_every_arm_and_seed(study_run):
    run = study_run
    assert json.loads((run / "study.json").read_text())["seeds"] == [3]
    probe = json.loads((run / "base.json").read_text())["probe"]
    assert set(probe) == {"id_rule", "held_out_rule"} and probe["held_out_rule"]["rule"] == [11, 12, 13]
    evals = _rows(run / "evals.jsonl")
    keys = {(r["seed"], r["arm"], r["step"], r["split"]) for r in evals}
    uses = [r for r in evals if r["metric"] == "rule_use"]
    evals = [r for r in evals if r["metric"] == "success_rate"]
    sft_steps = sorted({r["step"] for r in evals if r["arm"] == "sft"})
    assert len(sft_steps) == 2 and sft_steps[1] == 2 * sft_steps[0]
    want = {
        (s, arm, step, split)
        for s in (3,)
        for split in ("id", "ood-rule")
        for arm, steps in (("init", [0]), ("rl", [1, 2]), ("grpo", [1, 2]), ("sft", sft_steps))
        for step in steps
    }
    assert keys == want and len(evals) == len(want)  # each once
    assert all(r["episodes"] == 4 for r in evals)
    # The primary endpoint beside every evaluation: the first answers' rule use, from its turns.jsonl.
    from sftrl_jax.envs.general_points import prompts
    from sftrl_jax.evaluation import failures

    assert {(r["seed"], r["arm"], r["step"], r["split"]) for r in uses} == want and len(uses) == len(want)
    for r in uses:
        turns = run / f"seed{r['seed']}" / "eval" / f"{r['arm']}_{r['step']}" / r["split"] / "turns.jsonl"
        got = failures.rule_use(
            str(turns), task="gp-l", split=r["split"], env_options=prompts.template_options("short")
        )
        assert (r["value"], r["as_10"], r["episodes"]) == (got["rule"], got["as_10"], got["n"]) and got["n"] == 4
        assert r["stderr"] == pytest.approx((got["rule"] * (1 - got["rule"]) / 4) ** 0.5)
    for s in (3,):
        for arm, steps in (("rl", [1, 2]), ("grpo", [1, 2]), ("sft", sft_steps)):
            for k in steps:
                assert (run / f"seed{s}" / arm / "snapshots" / str(k) / "model_config.json").exists()
        g = {(r["arm"], r["step"]): r["gflops"] for r in evals if r["seed"] == s and r["split"] == "id"}
        assert 0 < g[("init", 0)] < g[("rl", 1)] < g[("rl", 2)]
        # the SFT arm's end has the PPO arm's compute, within the rounding of its steps to a multiple of
        # arms.points (2) plus half a step (batches differ in tokens)
        per_step = g[("init", 0)] / 2
        assert abs(g[("sft", sft_steps[1])] - g[("rl", 2)]) <= per_step * 2.5, g
    kl = _rows(run / "kl.jsonl")
    assert {(r["seed"], r["arm"], r["step"], r["split"]) for r in kl} == want
    assert all(r["kl"] == 0.0 for r in kl if r["arm"] == "init")
    moved = [r for r in kl if r["arm"] != "init"]
    assert all(r["kl"] >= 0 and r["kl_reverse"] >= 0 and r["prompts"] == 3 for r in moved)
    assert any(r["kl"] > 0 for r in moved)


def test_the_warm_up_reads_other_rules_and_the_arms_data_only_the_id_rule(study_run):
    """warmup.diverse_rules=0.5: Init's data states other J/Q/K rules in about half its examples (never
    11/12/13); the SFT arm trains on the ID-only expert data."""
    from sftrl_jax import config as config_lib

    def rules(path):
        return [
            ex["conversations"][0]["value"].split("count as ", 1)[1].split(".")[0]
            for ex in json.loads(path.read_text())
        ]

    seed = study_run / "seed3"
    warm, ident = rules(seed / "data_warmup" / "gp_l_train.json"), rules(seed / "data" / "gp_l_train.json")
    assert set(ident) == {"'10'"} and len(ident) == len(warm) == 32
    other = [r for r in warm if r != "'10'"]
    assert 8 <= len(other) <= 24 and "'11', '12', and '13' respectively" not in warm
    init_files = config_lib.read_yaml(str(seed / "init" / "config.yaml"))["data"]["train_files"]
    sft_files = config_lib.read_yaml(str(seed / "sft" / "config.yaml"))["data"]["train_files"]
    assert init_files == [str(seed / "data_warmup" / "gp_l_train.json")]
    assert sft_files == [str(seed / "data" / "gp_l_train.json")]


def test_study_resumes_without_redoing_finished_stages(study_run, tiny_base, capsys):
    before = (study_run / "evals.jsonl").read_text(), (study_run / "kl.jsonl").read_text()
    assert cli.main(["study", f"run_dir={study_run}", f"base={tiny_base}", *STUDY]) == 0
    out = capsys.readouterr().out
    assert "evaluating" not in out and "arm (" not in out and "warm-up" not in out
    assert ((study_run / "evals.jsonl").read_text(), (study_run / "kl.jsonl").read_text()) == before


def test_study_resumes_after_a_kill_during_a_final_save(study_run, tiny_base, tmp_path, capsys):
    """Issue 32 item 2: a stage is done only when its `final` is a complete model checkpoint. A
    `final` cut before its model_config.json (the older, non-atomic save) or an atomic save killed
    before its rename (`final.partial`, no `final`) reruns the stage, which resumes from its last
    checkpoint and writes the same model; the evaluations already written are kept."""
    import os
    import shutil

    from sftrl_jax.models.checkpoint import is_checkpoint

    run = tmp_path / "s"
    shutil.copytree(study_run, run)
    init = run / "seed3" / "init" / "final"
    (init / "model_config.json").unlink()
    grpo = run / "seed3" / "grpo"
    os.rename(grpo / "final", grpo / "final.partial")
    evals, kl = _rows(run / "evals.jsonl"), _rows(run / "kl.jsonl")
    for name, rows in (("evals.jsonl", evals), ("kl.jsonl", kl)):  # Init's rows were not written yet
        (run / name).write_text("".join(json.dumps(r) + "\n" for r in rows if r["arm"] != "init"))
    assert cli.main(["study", f"run_dir={run}", f"base={tiny_base}", *STUDY]) == 0
    out = capsys.readouterr().out
    assert "seed 3: SFT warm-up from the base -> Init" in out and "seed 3: grpo arm (grpo)" in out
    assert "rl arm" not in out and "SFT arm" not in out and "evaluating init at step 0" in out
    assert "evaluating rl" not in out and "evaluating grpo" not in out
    assert is_checkpoint(str(init)) and is_checkpoint(str(grpo / "final"))
    assert not (grpo / "final.partial").exists()

    def key(r):
        return (r["arm"], r["step"], r["split"])

    # Init's rows again, equal to the first run's: the rewritten Init is the same model
    assert sorted(_rows(run / "evals.jsonl"), key=key) == sorted(evals, key=key)
    assert sorted(_rows(run / "kl.jsonl"), key=key) == sorted(kl, key=key)


@pytest.mark.parametrize(("arm", "line"), [("rl", "seed 3: rl arm (ppo)"), ("sft", "seed 3: SFT arm")])
def test_study_reruns_only_the_stage_killed_before_its_final(study_run, tiny_base, tmp_path, capsys, arm, line):
    """Issue 32: a kill after a stage's last checkpoint but before its `final` (no `final` at all)
    reruns that stage alone, from its checkpoint, to the same evaluations; the other stages are kept."""
    import shutil

    from sftrl_jax.models.checkpoint import is_checkpoint

    run = tmp_path / "s"
    shutil.copytree(study_run, run)
    final = run / "seed3" / arm / "final"
    shutil.rmtree(final)
    evals = _rows(run / "evals.jsonl")
    assert cli.main(["study", f"run_dir={run}", f"base={tiny_base}", *STUDY]) == 0
    out = capsys.readouterr().out
    assert line in out
    others = {"SFT warm-up from the base -> Init", "rl arm (ppo)", "grpo arm (grpo)", "SFT arm"} - {line[8:]}
    assert not [o for o in others if o in out], out
    assert is_checkpoint(str(final))
    assert _rows(run / "evals.jsonl") == evals


def test_study_refuses_a_missing_base(tmp_path, capsys):
    assert cli.main(["study", f"run_dir={tmp_path}", f"base={tmp_path / 'nope'}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["study", f"run_dir={tmp_path}", "arms.points=3", "arms.updates=8"]) == 2
    assert "arms.points" in capsys.readouterr().err


def test_policy_kl_is_zero_against_itself_and_matches_a_direct_computation(tiny_base):
    import jax

    from sftrl_jax import sampling
    from sftrl_jax.evaluation import kl as kl_lib
    from sftrl_jax.train.state import load_for_eval

    model, tok, _ = load_for_eval(tiny_base, "gp-l")
    other, _, _ = load_for_eval(tiny_base, "gp-l")
    from flax import nnx

    params = nnx.state(other, nnx.Param)
    nnx.update(other, jax.tree.map(lambda x: x * 1.3, params))
    prompts = [tok.chat_ids([{"role": "user", "content": t}], add_generation_prompt=True) for t in ("3 4 5 6", "Hi")]
    same = kl_lib.policy_kl(model, model, tok, prompts, max_new_tokens=6)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["kl_reverse"] == pytest.approx(0.0, abs=1e-6)
    got = kl_lib.policy_kl(model, other, tok, prompts[:1], max_new_tokens=6)
    # by hand: greedy answer of `model`, then full distributions of both along it
    res = sampling.generate(model, prompts[:1], max_new_tokens=6, temperature=0.0, stop_tokens=tok.stop_ids)
    ans = list(np.asarray(res.tokens)[0, : int(res.lengths[0])])
    ids = np.asarray([prompts[0] + ans], np.int32)

    def logp(m):
        out = m(input_ids=ids, attention_mask=np.ones_like(ids))
        return np.asarray(jax.nn.log_softmax(getattr(out, "logits", out), -1))[0]

    lp, lq = logp(model), logp(other)
    pos = slice(len(prompts[0]) - 1, len(prompts[0]) - 1 + len(ans))
    want = float((np.exp(lp[pos]) * (lp[pos] - lq[pos])).sum() / len(ans))
    assert got["tokens"] == len(ans) > 0
    assert got["kl"] == pytest.approx(want, rel=1e-4) and got["kl"] > 0


@pytest.mark.slow  # ~60 s: a whole (toy) study on a Qwen2.5 base
def test_study_takes_a_qwen_base_with_its_chatml_tokenizer(tmp_path):
    """`base:` is any model folder: a Qwen2.5 HF folder (with its ChatML tokenizer, as a user's
    Qwen2.5-0.5B-Instruct download) runs the small-scale protocol; Init and the arms stay Qwen2 and
    keep its tokenizer."""
    from sftrl_jax.data.tokenizer import CHATML, default_tokenizer_path, load_tokenizer
    from sftrl_jax.models import checkpoint, save_pretrained
    from sftrl_jax.models import config as config_lib
    from sftrl_jax.train.state import ModelSection, load_model, tokenizer_for

    base = tmp_path / "qwen-base"
    tiny = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    model = load_model(ModelSection(preset="qwen2.5-tiny", text_overrides=dict(tiny, head_dim=16)), seed=0)
    save_pretrained(model, str(base))
    load_tokenizer(default_tokenizer_path("chatml")).hf.save_pretrained(str(base))
    run = tmp_path / "s"
    assert cli.main(["study", f"run_dir={run}", f"base={base}", "arms.arms=[rl]", *TINY]) == 0
    for stage in ("init", "rl"):
        final = run / "seed3" / stage / "final"
        config, _ = checkpoint.read_checkpoint_config(str(final))
        assert type(config) is config_lib.Qwen2Config and config.text.qkv_bias
        assert tokenizer_for(ModelSection(init=str(final))).chat_format == CHATML
    evals = _rows(run / "evals.jsonl")
    assert {r["arm"] for r in evals} >= {"init", "rl"} and all(r["seed"] == 3 for r in evals)


def test_an_rl_arm_the_learner_would_refuse_stops_at_config_time(tmp_path, capsys):
    """8 envs x 6 turns = 48 turns per update is no multiple of 32 turns per step: refused when the
    config is read (exit 2, one line naming the arm), not after the base probe and the warm-up."""
    run = tmp_path / "s"
    args = ["study", f"run_dir={run}", "arms.num_envs=8", "arms.steps_per_update=6", "arms.samples_per_step=32"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the rl arm's RL run (ppo)" in err[0] and "ppo.samples_per_step (32)" in err[0], err
    assert not run.exists()
