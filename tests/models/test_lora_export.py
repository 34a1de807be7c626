"""LoRA adapters in PEFT's format: `peft` loads ours onto the transformers model and its logits equal
ours (fp32, 1e-4), per-layer and stacked layouts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from sftrl_jax.models import convert, lora  # noqa: E402
from sftrl_jax.train.state import ModelSection, load_model  # noqa: E402
from tests.train.test_lora import _randomise_b  # noqa: E402


@pytest.mark.hf
@pytest.mark.parametrize("scan", [False, True])
def test_peft_loads_our_adapters_and_matches_our_logits(tmp_path, scan):
    model = load_model(ModelSection(preset="qwen2.5-tiny" if scan else "llama-tiny", scan_layers=scan))
    convert.save_pretrained(model, str(tmp_path / "base"))
    lora.add(model, lora.LoRASection(rank=4, alpha=8), seed=0)
    _randomise_b(model)
    cfg = convert.save_adapter(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    layers = model.config.text.num_layers
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and len(cfg["target_modules"]) == 7 * layers
    ids = np.random.default_rng(0).integers(3, 200, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    with torch.no_grad():
        plain = hf(torch.tensor(ids)).logits.numpy()
    with_adapters = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = with_adapters(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-2  # the adapters move the logits ...
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)  # ... and PEFT applies them as we do


def test_save_adapter_refuses_a_model_without_adapters(tmp_path):
    from sftrl_jax.errors import UserError

    with pytest.raises(UserError, match="the model has no LoRA adapters to save"):
        convert.save_adapter(load_model(ModelSection(preset="llama-tiny")), str(tmp_path / "a"))
