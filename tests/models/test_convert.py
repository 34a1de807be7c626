"""HF <-> ours: round trips through transformers, both Mllama key layouts, sharded folders, and
bad input that must fail naming the file, key or field."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sftrl_jax.errors import UserError
from sftrl_jax.models import build, convert, safetensors_io
from sftrl_jax.models import config as config_lib
from tests.models import hf_helpers as H

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def mllama_folder(tmp_path_factory):
    cfg = config_lib.MllamaConfig.tiny()
    hf = H.hf_model(cfg, seed=11)
    path = H.save_hf(hf, str(tmp_path_factory.mktemp("hf_mllama")))
    return cfg, hf, path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    cfg = config_lib.LlamaConfig.tiny()
    hf = H.hf_model(cfg, seed=12)
    return cfg, hf, H.save_hf(hf, str(tmp_path_factory.mktemp("hf_llama")))


def _tensors(folder) -> dict[str, np.ndarray]:
    files, weight_map = safetensors_io.open_folder(folder)
    return {k: np.array(files[f].get(k)) for k, f in weight_map.items()}


def _hf_logits(model, batch):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def test_mllama_round_trip_through_transformers(mllama_folder, tmp_path):
    cfg, hf, path = mllama_folder
    ours = convert.from_pretrained(path, config=cfg.with_transformers_semantics())
    out = str(tmp_path / "export")
    convert.save_pretrained(ours, out)
    # the same tensors, bit for bit, under the same (hub layout) keys
    original, written = _tensors(path), _tensors(out)
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    reloaded, info = transformers.MllamaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = H.image_batch(cfg, images=2, seed=3)
    batch["attention_mask"][:] = 1  # HF's plain forward numbers positions 0..T-1
    ref = _hf_logits(hf, batch)
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), batch), ref)
    got = H.jit_forward(ours)(**{k: jnp.asarray(v) for k, v in batch.items()}).logits
    assert H.rel_diff(got, ref) < 1e-4


def test_mllama_newer_key_layout_loads(mllama_folder, tmp_path):
    """transformers 4.52-4.57 wrote `model.language_model.*`, `lm_head.*`: the model's own names."""
    cfg, hf, path = mllama_folder
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state) and "lm_head.weight" in state
    folder = str(tmp_path)
    shutil.copy(os.path.join(path, "config.json"), folder)
    safetensors_io.write_file(
        os.path.join(folder, "model.safetensors"), [(k, v.shape, v.dtype) for k, v in state.items()], state.__getitem__
    )
    a = convert.from_pretrained(path)
    b = convert.from_pretrained(folder)
    for (pa, va), (pb, vb) in zip(build.flat_params(a).items(), build.flat_params(b).items()):
        assert pa == pb
        np.testing.assert_array_equal(va[...], vb[...])


def test_sharded_bf16_export_and_reload(mllama_folder, tmp_path):
    cfg, _, path = mllama_folder
    ours = convert.from_pretrained(path)
    out = str(tmp_path / "sharded")
    convert.save_pretrained(ours, out, dtype=jnp.bfloat16, max_shard_bytes=200_000)
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 2
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    _, info = transformers.MllamaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    back = convert.from_pretrained(out, dtype=jnp.bfloat16)
    for (p, a), (_, b) in zip(build.flat_params(ours).items(), build.flat_params(back).items()):
        assert b.dtype == jnp.bfloat16, p
        np.testing.assert_array_equal(np.asarray(a[...]).astype(ml_dtypes.bfloat16), np.asarray(b[...]))


def test_llama_tied_embeddings_round_trip(tmp_path):
    cfg = config_lib.LlamaConfig.tiny(tie_word_embeddings=True)
    hf = H.hf_model(cfg, seed=13)
    path = H.save_hf(hf, str(tmp_path / "hf"))
    assert "lm_head.weight" not in _tensors(path)
    ours = convert.from_pretrained(path)
    assert "lm_head" not in build.flat_params(ours)
    convert.save_pretrained(ours, str(tmp_path / "out"))
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    ref = _hf_logits(hf, {"input_ids": ids})
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), {"input_ids": ids}), ref)
    assert H.rel_diff(H.jit_forward(ours)(jnp.asarray(ids)).logits, ref) < 1e-4


# --------------------------------------------------------------------------------------------------
# Bad input


def _copy(folder, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, fn):
    file = os.path.join(folder, "config.json")
    with open(file) as f:
        d = json.load(f)
    fn(d)
    with open(file, "w") as f:
        json.dump(d, f)


def _rewrite(folder, fn):
    """Rewrite model.safetensors with `fn(tensors)` applied to its {key: array}."""
    tensors = fn(_tensors(folder))
    file = os.path.join(folder, "model.safetensors")
    safetensors_io.write_file(file, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)


def test_missing_shard_names_the_file(mllama_folder, tmp_path):
    _, _, path = mllama_folder
    out = str(tmp_path / "sharded")
    convert.save_pretrained(convert.from_pretrained(path), out, max_shard_bytes=200_000)
    shard = sorted(n for n in os.listdir(out) if n.startswith("model-00002-of-"))[0]
    os.remove(os.path.join(out, shard))
    with pytest.raises(UserError, match=rf"{shard.replace('.', '[.]')}.*missing"):
        convert.from_pretrained(out)


def test_wrong_shape_names_file_key_and_shapes(llama_folder, tmp_path):
    folder = _copy(llama_folder[2], tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"

    def shrink(t):
        t[key] = t[key][:100]
        return t

    _rewrite(folder, shrink)
    with pytest.raises(UserError) as e:
        convert.from_pretrained(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and key in msg and "[100, 64]" in msg and "[128, 64]" in msg


def test_unexpected_and_missing_tensors_are_named(llama_folder, tmp_path):
    folder = _copy(llama_folder[2], tmp_path)
    _rewrite(folder, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(UserError, match=r"unexpected tensor.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert.from_pretrained(folder)
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if "q_proj" not in k and k != "model.norm.weight"})
    with pytest.raises(UserError, match=r"missing tensor.*model\.norm\.weight"):
        convert.from_pretrained(folder)


def test_unknown_architecture_and_rope_type_name_the_field(llama_folder, tmp_path):
    folder = _copy(llama_folder[2], tmp_path)
    _edit_config(folder, lambda d: d.update(architectures=["MistralForCausalLM"]))
    with pytest.raises(UserError, match=r"config\.json.*unknown architecture \['MistralForCausalLM'\]"):
        convert.from_pretrained(folder)
    _edit_config(
        folder,
        lambda d: d.update(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    )
    with pytest.raises(UserError, match=r"config\.json.*rope_scaling\.rope_type='dynamic'"):
        convert.from_pretrained(folder)


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        convert.from_pretrained(str(tmp_path))
    H.write_config(config_lib.to_hf_dict(config_lib.LlamaConfig.tiny()), str(tmp_path))
    with pytest.raises(UserError, match=r"no model\.safetensors"):
        convert.from_pretrained(str(tmp_path))
