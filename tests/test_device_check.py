"""tools/device_check.py end to end in its --smoke mode (tiny shapes, CPU): every row of the table,
parity within tolerance, sensible speeds and MFUs, the --json file."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

_PATH = Path(__file__).resolve().parents[1] / "tools" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("sftrl_device_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own tool file
    return module


@pytest.mark.slow  # 32 s cold; the GPU script's CPU smoke run
def test_smoke_runs_end_to_end(device_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert device_check.main(["--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == set(device_check.ROWS)
    table = [line.split("|")[0].strip() for line in text.splitlines() if "|" in line]
    assert all(name in table for name in device_check.ROWS), text
    assert result["info"]["mode"] == "smoke"

    for name in ("parity_llama", "parity_mllama"):
        r = rows[name]
        assert r["ok"], r
        # bf16 against fp32 on random tiny models: ~0.5% of the largest logit, on either side
        assert 0 < r["ours_vs_fp32"] < 0.03 and 0 < r["hf_bf16_vs_fp32"] < 0.03, r

    s = rows["sampler"]
    assert s["ours_tokens_per_s"] > 0 and s["hf_tokens_per_s"] > 0
    assert s["ours_over_hf"] == pytest.approx(s["ours_tokens_per_s"] / s["hf_tokens_per_s"], rel=1e-6)
    assert 0.0 <= s["greedy_agree"] <= 1.0

    peak = rows["matmul_peak"]["measured_flops"]
    assert peak > 1e8
    for name in ("sft_step", "ppo_step", "sft_step_lora", "ppo_step_lora"):
        r = rows[name]
        assert r["finite"] and r["step_s"] > 0 and r["model_flops"] > 0, r
        assert 0 < r["mfu"] < 1 and 0 < r["mfu_vs_measured_peak"] < 1.5, r
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["step_s"] / 989e12, rel=1e-6)
        assert math.isfinite(r["loss_last"])
        # compiled once: a step that retraced (a state whose structure the step changes) would take
        # about as long as the first call
        assert r["step_s"] < r["first_call_s"] / 2, r
    assert rows["sft_step"]["loss_last"] < rows["sft_step"]["loss_first"]  # lr 1e-5: a small step down

    # LoRA (rank 16 on the tiny Llama's attention and MLP products): the same batches, the ideal of a
    # frozen base (2 forwards, not 3), only the adapters (and PPO's value head) trained
    tc = device_check.llama_config(smoke=True).text
    rank, D, F = 16, tc.hidden_size, tc.intermediate_size
    NH, KH = tc.num_heads * tc.head_dim, tc.num_kv_heads * tc.head_dim
    # A [in, r] + B [r, out] of q, o (D <-> N H), k, v (D -> K H), gate, up, down (D <-> F)
    adapters = tc.num_layers * rank * (2 * (D + NH) + 2 * (D + KH) + 3 * (D + F))
    for name in ("sft_step", "ppo_step"):
        full, low = rows[name], rows[name + "_lora"]
        assert low["shape"] == full["shape"]
        assert low["model_flops"] == pytest.approx(full["model_flops"] * 2 / 3, rel=1e-9)
        assert low["base_unchanged"] and low["trainable_moved"], low
        assert adapters <= low["trainable_params"] < low["params"] / 2, low
    assert rows["sft_step_lora"]["trainable_params"] == adapters
    assert rows["ppo_step_lora"]["trainable_params"] > adapters  # + the value head


def test_full_mode_needs_an_accelerator(device_check, capsys):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator is present")
    assert device_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
