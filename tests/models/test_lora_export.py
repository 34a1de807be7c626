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


def _randomise_b_on_host(model, scale=0.1, seed=0):
    """`_randomise_b` with numpy's generator: no XLA compile per B shape (seconds for the many shapes
    of a scanned Mllama's stacks on a busy CPU)."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_graph(model):
        for name, var in vars(module).items() if isinstance(module, nnx.Module) else ():
            if name.endswith(lora.B):
                var[...] = jnp.asarray(scale * rng.standard_normal(var.shape), var.dtype)


@pytest.mark.hf
# stacked: ~10-14 s more (lora.add compiles a draw per stack shape): slow; the per-layer case stays in the suite
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_peft_loads_our_mllama_adapters_and_matches_our_logits_with_images(tmp_path, scan):
    """Mllama (transformers' 4.52+ module tree): adapters on the text decoder's self- and
    cross-attention layers and MLPs and on the vision tower, every one attached by PEFT, logits on a
    text+image batch equal to ours."""
    import safetensors.numpy

    from sftrl_jax.models import config as config_lib
    from tests.models import hf_helpers as H

    cfg = config_lib.MllamaConfig.tiny()  # the mllama-tiny preset's config
    # gates, norms and biases at O(1) (a fresh preset's zero gates would hide the cross-attention)
    H.save_hf(H.hf_model(cfg, seed=1), str(tmp_path / "hf"))
    model = convert.from_pretrained(str(tmp_path / "hf"), config=cfg.with_transformers_semantics(), scan_layers=scan)
    convert.save_pretrained(model, str(tmp_path / "base"))  # the base, written by our converter
    targets = ("attention", "mlp", "cross_attention", "vision")
    paths = lora.add(model, lora.LoRASection(rank=4, alpha=8, targets=targets), seed=0)
    _randomise_b_on_host(model)
    cfg_out = convert.save_adapter(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    t, v = cfg.text, cfg.vision
    n_text = 7 * t.num_layers  # self layers: q k v o gate up down; cross layers: the same in cross_attn
    n_vision = 6 * (v.num_layers + v.num_global_layers)  # q k v o fc1 fc2
    assert cfg_out["r"] == 4 and cfg_out["lora_alpha"] == 8
    assert len(cfg_out["target_modules"]) == n_text + n_vision
    assert sum(".cross_attn." in m for m in cfg_out["target_modules"]) == 4 * len(t.cross_attention_layers)
    assert sum(m.startswith("model.vision_model.") for m in cfg_out["target_modules"]) == n_vision
    if not scan:
        assert len(paths) == n_text + n_vision

    batch = H.image_batch(cfg, images=2, seed=2)
    real = batch["attention_mask"].astype(bool)
    ours = np.asarray(H.jit_forward(model)(**{k: jnp.asarray(x) for k, x in batch.items()}).logits)[real]
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(
        str(tmp_path / "base"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    inputs = {k: torch.tensor(x) for k, x in batch.items()}
    inputs["position_ids"] = torch.tensor(H.positions(batch["attention_mask"]))
    with torch.no_grad():
        plain = hf(**inputs).logits.numpy()[real]
    with_adapters = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    attached = sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
        for name, m in with_adapters.named_modules()
        if name.endswith(".lora_A.default") and isinstance(m, torch.nn.Linear)
    )
    # PEFT attached an adapter to every adapted weight and loaded every tensor we wrote into it
    assert len(attached) == n_text + n_vision and attached == sorted(cfg_out["target_modules"])
    written = safetensors.numpy.load_file(str(tmp_path / "adapter" / convert.ADAPTER_WEIGHTS))
    loaded = {k: x.numpy() for k, x in peft.get_peft_model_state_dict(with_adapters).items()}
    assert (
        sorted(written)
        == sorted(loaded)
        == sorted(f"base_model.model.{m}.lora_{ab}.weight" for m in attached for ab in "AB")
    )
    for key, tensor in written.items():
        np.testing.assert_array_equal(loaded[key], tensor, err_msg=key)
    with torch.no_grad():
        theirs = with_adapters(**inputs).logits.numpy()[real]
    assert np.abs(ours - plain).max() > 1e-2  # the adapters move the logits ...
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)  # ... and PEFT applies them as we do
    for part in (".vision_model.", ".cross_attn."):  # the image path's adapters matter on their own
        bs = [m.weight for n, m in with_adapters.named_modules() if n.endswith(".lora_B.default") and part in n]
        with torch.no_grad():
            for b in bs:
                b.zero_()
            without = with_adapters(**inputs).logits.numpy()[real]
        assert bs and np.abs(without - theirs).max() > 1e-2, part
