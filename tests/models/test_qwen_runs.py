"""The tiny random Qwen2.5 preset (`model.preset: qwen2.5-tiny`) through the commands end to end:
`sftrl sft`, `sftrl eval` on its checkpoint, `sftrl rl` with PPO and with GRPO (a step each)."""

import json
import os

import pytest

from sftrl_jax import cli
from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.models import checkpoint
from sftrl_jax.models import config as config_lib
from tests.rl.test_rl_train import TINY as RL
from tests.sft.test_sft_train import TINY as SFT


def _write(d: dict, path) -> str:
    path.write_text(json.dumps(d))
    return str(path)


def _qwen(section: dict) -> dict:
    d = json.loads(json.dumps(section))
    d["model"]["preset"] = "qwen2.5-tiny"
    # the ChatML prompt (Qwen's default system message) pads to 512: room for the answer beyond it
    d["model"].setdefault("text_overrides", {})["max_position_embeddings"] = 1024
    return d


@pytest.mark.slow  # ~60 s on two loaded cores
def test_qwen_tiny_sft_eval_rl(tmp_path, capsys):
    data = str(tmp_path / "gp_l.json")
    generate_gp_sft("gp-l", "train", 16, data, seed=0)
    sft = _qwen(SFT)
    sft["data"]["train_files"] = [data]
    sft["train"].update(run_dir=str(tmp_path / "sft"), steps=2, save_every=2)
    assert cli.main(["sft", "--config", _write(sft, tmp_path / "sft.yaml")]) == 0
    final = os.path.join(sft["train"]["run_dir"], "final")
    config, _ = checkpoint.read_checkpoint_config(final)
    assert type(config) is config_lib.Qwen2Config and config.text.qkv_bias

    args = ["eval", "--ckpt", final, "--task", "gp-l", "--split", "id", "--episodes", "1", "--max-new-tokens", "16"]
    assert cli.main(args) == 0
    assert '"episodes": 1' in capsys.readouterr().out

    for algo in ("ppo", "grpo"):
        rl = _qwen(RL)
        rl["algo"] = algo
        rl["train"].update(run_dir=str(tmp_path / algo), updates=1)
        assert cli.main(["rl", "--config", _write(rl, tmp_path / f"{algo}.yaml")]) == 0
        config, _ = checkpoint.read_checkpoint_config(os.path.join(rl["train"]["run_dir"], "final"))
        assert type(config) is config_lib.Qwen2Config
