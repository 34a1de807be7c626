"""Every shipped config parses into its dataclass and starts with the command that runs it."""

from pathlib import Path

import pytest

from sftrl_jax import config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def _cls(path: Path):
    kind = path.parent.name
    if kind == "sft":
        from sftrl_jax.sft.train import SFTConfig

        return SFTConfig
    if kind == "rl":
        from sftrl_jax.rl.config import RLConfig

        return RLConfig
    if kind in ("study", "demo"):  # the demo is a study config (`sftrl demo`)
        if path.name.startswith("pretrain"):  # the base's pretraining stages: SFT runs
            from sftrl_jax.sft.train import SFTConfig

            return SFTConfig
        from sftrl_jax.study import StudyConfig

        return StudyConfig
    raise AssertionError(f"no dataclass for configs/{kind}: add it here")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sftrl ") or first.startswith("# make "), first
    cfg = config.load(_cls(path), path)
    assert config.to_dict(cfg)


def garbage(n_tokens: int) -> str:
    """`{"formula": "++...+"}` of `n_tokens` tokens of the shipped tokenizer (6 of them the JSON): the
    paper's table scores it -3 per '+' and -2 for the unused cards (2,006 tokens: -6,002)."""
    return '{"formula": "' + "+" * (n_tokens - 6) + '"}'


REWARD_FLOOR = -10.0  # what every shipped RL config trains GeneralPoints with (docs/GENERAL_POINTS.md)


def _rl_envs():
    """(config path, task, split, env options, max_new_tokens) of every shipped config's RL env."""
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.study import StudyConfig

    out = []
    for path in CONFIGS:
        if path.parent.name == "rl":
            cfg = config.load(RLConfig, path)
            out.append((path, cfg.env.task, cfg.env.split, cfg.env.options, cfg.sampling.max_new_tokens))
        elif path.parent.name in ("study", "demo") and not path.name.startswith("pretrain"):
            cfg = config.load(StudyConfig, path)
            out.append((path, cfg.task, "train", cfg.env_options(), cfg.arms.max_new_tokens))
    return out


def test_shipped_configs_bound_the_reward_of_a_garbage_turn(monkeypatch):
    """Issue #32: a 2,006-token answer of '+' scored -6,002 in training. The RL configs set
    `reward_floor` (a GP turn trains on at least -10; V-IRL's rewards are bounded already), for that
    answer and for the longest such answer their `max_new_tokens` can sample; the study and the demo
    keep the paper's rewards for their recorded results, bounded by their 64-token budget."""
    from sftrl_jax import envs
    from sftrl_jax.data import tokenizer as tokenizer_lib
    from sftrl_jax.envs.general_points import render

    monkeypatch.setattr(render, "render_hand", lambda hand: None)  # gp-vl's image is not graded
    tok = tokenizer_lib.load_tokenizer()
    rows = _rl_envs()
    assert {p.parent.name for p, *_ in rows} == {"rl", "demo", "study"}
    for path, task, split, options, max_new_tokens in rows:
        env = envs.make(task, split=split, **options)
        texts = [garbage(2006), garbage(max_new_tokens)]
        assert [len(tok.encode(t)) for t in texts] == [2006, max_new_tokens]
        for text in texts:
            env.reset(seed=0)
            _, reward, _, _, _ = env.step(text)
            if path.parent.name == "rl":
                if task.startswith("gp-"):
                    assert options.get("reward_floor") == REWARD_FLOOR, path
                assert reward >= REWARD_FLOOR, (path, reward)
            elif len(tok.encode(text)) <= max_new_tokens:  # the study / demo: what their budget samples
                assert max_new_tokens <= 64 and reward >= -3 * max_new_tokens, (path, max_new_tokens, reward)
