"""`sftrl plan` bounds its inputs before anything is allocated (issue #32.7: `--devices 100000` and a
config.json of 10**6 layers grew to gigabytes for minutes): each absurd input is one line and exit 2,
in a few seconds, in process (before any fake device exists)."""

import json
import os
import re
import time

import pytest

from sftrl_jax import cli
from sftrl_jax.commands import plan
from sftrl_jax.models import config as model_config

BASE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "sftrl_jax", "data", "assets", "gp_l_base", "config.json")
SFT = "configs/sft/gp_l_tiny.yaml"


def _folder(tmp_path, **fields):
    with open(BASE_CONFIG) as f:
        d = json.load(f)
    d.update(fields)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return [f"model.init={folder}", "model.preset=null"]


CASES = {
    "devices-100000": (["--devices", "100000"], {}, r"--devices must be in 1\.\.4096 .*got 100000"),
    "devices-0": (["--devices", "0"], {}, r"--devices must be in 1\.\.4096"),
    "images-1e6": (["--images", "1000000"], {}, r"--images must be in 0\.\.64"),
    "limit-nan": (["--limit-gib", "nan"], {}, r"--limit-gib must be a positive number"),
    "layers-1e6": (
        [],
        {"num_hidden_layers": 10**6},
        r"num_layers \(config\.json: num_hidden_layers\) must be an integer in \[1, 1024\], got 1000000",
    ),
    "hidden-1e9": ([], {"hidden_size": 10**9}, r"hidden_size must be an integer in \[1, 65536\], got 1000000000"),
    "vocab-1e12": ([], {"vocab_size": 10**12}, r"vocab_size must be an integer in \[1, 4194304\], got 1000000000000"),
    "params-1e14": (
        [],
        {
            "hidden_size": 65536,
            "intermediate_size": 524288,
            "num_hidden_layers": 1024,
            "num_attention_heads": 512,
            "num_key_value_heads": 512,
            "head_dim": 128,
        },
        r"TextConfig: about 1\.\d+e\+14 parameters, more than the 2e\+12",
    ),
    "heads-0": (
        [],
        {"num_key_value_heads": 0},
        r"config\.json: field 'num_key_value_heads' must be a positive integer",
    ),
    "buckets-1e9": (
        ["data.buckets=[1000000000]"],
        {},
        r"config key 'data\.buckets\[0\]' must be an integer in \[1, 1048576\]",
    ),
    "overrides-1e6-layers": (
        ["model.init=null", "model.preset=llama-tiny", "model.text_overrides.num_layers=1000000"],
        None,
        r"num_layers \(config\.json: num_hidden_layers\) must be an integer in \[1, 1024\]",
    ),
    "overrides-unknown-field": (
        ["model.text_overrides.hidden=64"],
        None,
        r"model\.text_overrides: unknown TextConfig field\(s\) \['hidden'\]",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_absurd_plan_inputs_are_one_line_and_exit_2(tmp_path, capsys, name):
    extra, fields, match = CASES[name]
    args = list(extra)
    if fields:
        args += _folder(tmp_path, **fields)
    start = time.perf_counter()
    rc = cli.main(["plan", "--config", SFT, *args])
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("sftrl plan: error: "), err
    assert re.search(match, err[0]), err[0]
    assert took < 10, took


def test_the_bounds_pass_every_preset_and_are_documented():
    """The limits sit far above every shipped preset; the help names the device bound."""
    for cfg in (
        model_config.LlamaConfig.llama_3_2_1b(),
        model_config.LlamaConfig.llama_3_2_3b(),
        model_config.MllamaConfig.llama_3_2_11b_vision(),
        model_config.MllamaConfig.tiny(),
    ):
        assert model_config.approx_params(cfg.text) < model_config.MAX_PARAMS
    # Llama 3.1 405B's sizes build (the largest released Llama)
    model_config.TextConfig(hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128, num_kv_heads=8)
    assert plan.MAX_DEVICES == 4096
