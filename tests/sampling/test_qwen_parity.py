"""Greedy tokens of a tiny Qwen2.5 equal transformers' greedy `generate` (KV cache on) with identical
weights: tied and untied heads, the layers per layer and stacked, a ragged batch, a stop token."""

import pytest

from sftrl_jax import models
from sftrl_jax.models import config as config_lib
from tests.models.test_qwen_parity import hf_folder
from tests.sampling.test_parity import check_text_greedy

pytest.importorskip("torch")
pytestmark = pytest.mark.hf


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per-layer", "stacked"])
@pytest.mark.parametrize(
    "cfg",
    [config_lib.Qwen2Config.tiny(), config_lib.Qwen2Config.tiny(tie_word_embeddings=False, num_kv_heads=1)],
    ids=["tied", "untied"],
)
def test_qwen_greedy_equals_transformers(cfg, scan_layers, tmp_path):
    hf, path = hf_folder(cfg, str(tmp_path), seed=5)
    result = check_text_greedy(hf, models.from_pretrained(path, scan_layers=scan_layers))
    assert all(len(set(row.tolist())) >= 3 for row in result.tokens)  # not one token repeated
