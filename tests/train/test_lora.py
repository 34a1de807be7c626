"""LoRA (models/lora.py, the run harness): adapters start at zero and merge exactly, only they train
and are checkpointed, resume is bitwise, and the sampler decodes with the adapters of the current step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import config, sampling
from sftrl_jax.config import ConfigError
from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.models import lora
from sftrl_jax.models.checkpoint import load_checkpoint
from sftrl_jax.sft.train import SFTConfig, train
from sftrl_jax.train.metrics import read_jsonl
from sftrl_jax.train.state import ModelSection, load_model

TEXT = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32
)


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _randomise_b(model, scale=0.1):
    """Non-zero B matrices, as after some training."""
    i = 0
    for _, module in nnx.iter_graph(model):
        for name, var in vars(module).items() if isinstance(module, nnx.Module) else ():
            if name.endswith("_lora_b"):
                i += 1
                var[...] = scale * jax.random.normal(jax.random.key(i), var.shape)


@pytest.mark.parametrize(("preset", "scan"), [("llama-tiny", False), ("llama-tiny", True), ("mllama-tiny", True)])
def test_adapters_start_at_zero_and_merge_equals_the_factored_forward(preset, scan):
    model = load_model(ModelSection(preset=preset, scan_layers=scan))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)))
    base = _logits(model, ids)
    section = lora.LoRASection(rank=4, alpha=8, targets=("attention", "mlp", "cross_attention", "vision"))
    paths = lora.add(model, section, seed=0)
    per_layer = 7 * (1 if scan else model.config.text.num_layers)
    assert len([p for p in paths if ".self_attn." in p or ".mlp." in p and "vision" not in p]) >= per_layer // 2
    np.testing.assert_array_equal(np.asarray(_logits(model, ids)), np.asarray(base))  # B = 0: unchanged
    trainable, frozen = lora.partition(nnx.state(model, nnx.Param))
    assert all(
        isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    assert len(jax.tree.leaves(trainable)) == 2 * len(paths)
    _randomise_b(model)
    moved = np.asarray(_logits(model, ids))
    assert np.abs(moved - np.asarray(base)).max() > 1e-2
    merged = lora.merge(nnx.clone(model))
    assert lora.adapter_paths(merged) == [] and len(lora.adapter_paths(model)) == len(paths)
    assert lora.partition(nnx.state(merged, nnx.Param))[1] is None  # nothing frozen any more
    np.testing.assert_allclose(np.asarray(_logits(merged, ids)), moved, atol=2e-5, rtol=0)


def test_targets_and_config_errors():
    model = load_model(ModelSection(preset="llama-tiny"))
    paths = lora.add(model, lora.LoRASection(rank=2, targets=(r"layers\.0\.self_attn\.q_proj$",)))
    assert paths == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ConfigError, match=r"lora.targets \['vision'\] match no product weight of the LlamaForCausalLM"):
        lora.add(load_model(ModelSection(preset="llama-tiny")), lora.LoRASection(rank=2, targets=("vision",)))
    with pytest.raises(ConfigError, match=r"lora.targets: '\(' is neither a group"):
        lora.LoRASection(rank=2, targets=("(",))
    with pytest.raises(ConfigError, match=r"dropout must be a finite number in \[0, 1\), got 1.0"):
        lora.LoRASection(rank=2, dropout=1.0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("loradata") / "gp_l.json"
    generate_gp_sft("gp-l", "train", 64, str(path), seed=0)
    return str(path)


def _cfg(tmp_path, data_file, name, **lora_over):
    d = {
        "model": {"preset": "llama-tiny", "text_overrides": TEXT},
        "data": {"max_length": 256, "buckets": [256], "batch_size": 8, "train_files": [data_file]},
        "optim": {"lr": 1.0e-2, "warmup_ratio": 0.0},
        "train": {
            "run_dir": str(tmp_path / name),
            "steps": 6,
            "log_every": 1,
            "save_every": 2,
            "devices": 1,
            "progress": False,
            "async_checkpointing": False,
        },
        "lora": {"rank": 8, "alpha": 16, **lora_over},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return config.load(SFTConfig, p)


def _params(path):
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(load_checkpoint(path), nnx.Param))
    }


def test_lora_sft_trains_only_the_adapters_checkpoints_them_and_resumes_bitwise(tmp_path, data_file):
    full = _cfg(tmp_path, data_file, "full")
    train(full)
    rows = read_jsonl(os.path.join(full.train.run_dir, "metrics.jsonl"))
    loss = [r["train/loss"] for r in rows]
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.3, loss
    # The checkpoint holds the adapters (2 per targeted weight: 7 weights x 2 layers) and their moments,
    # not the base; it names the base.
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(full.train.run_dir, "checkpoints", "6", "state"))
    saved = jax.tree_util.tree_leaves_with_path(meta.item_metadata["params"])
    assert len(saved) == 2 * 7 * 2 and all("lora_" in jax.tree_util.keystr(k) for k, _ in saved)
    extra = json.loads(open(os.path.join(full.train.run_dir, "checkpoints", "6", "extra", "metadata")).read())
    assert extra["lora_base"] == {"preset": "llama-tiny", "seed": 0}
    # final/ is the merged model: a plain checkpoint, different from the base by the trained deltas
    base = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(
            nnx.state(load_model(ModelSection(preset="llama-tiny", text_overrides=TEXT)), nnx.Param)
        )
    }
    final = _params(os.path.join(full.train.run_dir, "final"))
    assert final.keys() == base.keys()
    changed = {k for k in base if not np.array_equal(base[k], final[k])}
    assert changed and all(("_proj" in k) for k in changed)  # norms, embeddings, head untouched
    # `sftrl export --adapter`: PEFT's files; PEFT puts them on the base and gives final/'s logits
    _peft_matches_final(tmp_path, full.train.run_dir)
    # interrupted after step 3 (checkpoint at 2), resumed: the same final model, bit for bit
    cut = _cfg(tmp_path, data_file, "cut")
    train(cut, stop_after=3)
    train(cut)
    again = _params(os.path.join(cut.train.run_dir, "final"))
    for k in final:
        np.testing.assert_array_equal(again[k], final[k], err_msg=k)
    # a resume on another base is refused, naming both
    other = config.load(SFTConfig, tmp_path / "cut.yaml", ["train.seed=5", "train.steps=8"])
    with pytest.raises(ConfigError, match=r"adapters were trained on base \{'preset': 'llama-tiny', 'seed': 0\}"):
        train(other)


def _peft_matches_final(tmp_path, run_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from sftrl_jax import cli
    from sftrl_jax.models import convert

    out = tmp_path / "peft"
    assert (
        cli.main(["export", "--adapter", "--ckpt", os.path.join(run_dir, "final"), "--out", str(out), "--base", "b"])
        == 0
    )
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (
        adapter_config["r"] == 8
        and adapter_config["lora_alpha"] == 16
        and adapter_config["base_model_name_or_path"] == "b"
    )
    convert.save_pretrained(
        load_model(ModelSection(preset="llama-tiny", text_overrides=TEXT)), str(tmp_path / "hf_base")
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base"), dtype=torch.float32)
    ids = np.random.default_rng(1).integers(3, 2000, (2, 16))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(out))(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_checkpoint(os.path.join(run_dir, "final"))(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert cli.main(["export", "--adapter", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def _rl_trainer(tmp_path, name, *, updates=2, **sections):
    """An RL Trainer of a tiny LoRA policy (rank 4) on GP-L, one device; `sections` added to the config."""
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl.train import Trainer
    from tests.rl.test_rl_train import TINY  # its env, sampling, eval and train sections

    d = {
        "model": {"preset": "llama-tiny", "text_overrides": {**TEXT, "max_position_embeddings": 1024}},
        **{k: TINY[k] for k in ("env", "sampling", "eval")},
        "optim": {"lr": 5.0e-2, "grad_clip": 1.0},
        "train": {**TINY["train"], "run_dir": str(tmp_path / name), "updates": updates},
        "lora": {"rank": 4, "alpha": 8},
        **sections,
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return Trainer(config.load(RLConfig, p))


def test_the_sampler_decodes_with_the_adapters_of_the_current_update(tmp_path):
    """One PPO update of a LoRA policy: the sampler's log-probs of a fixed prompt change, and equal
    those of the model with the adapters merged into its weights."""
    trainer = _rl_trainer(tmp_path, "rl", ppo={"epochs": 1, "samples_per_step": 4, "micro_batch": 4})
    prompt = [[1, 17, 42, 99, 7, 300, 12]]

    def sample(model):
        r = sampling.generate(model, prompt, max_new_tokens=6, temperature=0.0)
        return np.asarray(r.tokens), np.asarray(r.logprobs_raw)  # log-softmax of the logits

    before = sample(trainer.learner.lm())
    trainer.run(stop_after=1)
    lm = trainer.learner.lm()
    after = sample(lm)
    merged = sample(lora.merge(nnx.clone(lm)))
    assert not np.allclose(after[1], before[1], atol=1e-4), (after, before)
    np.testing.assert_array_equal(after[0], merged[0])
    np.testing.assert_allclose(after[1], merged[1], atol=1e-5, rtol=0)


def test_dropout_applies_only_inside_a_training_steps_key():
    model = load_model(ModelSection(preset="llama-tiny"))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)))
    lora.add(model, lora.LoRASection(rank=4, dropout=0.5), seed=0)
    _randomise_b(model)
    plain = np.asarray(_logits(model, ids))
    with lora.dropout_key(jax.random.key(0)):
        dropped = np.asarray(_logits(model, ids))
    with lora.dropout_key(jax.random.key(0)):
        again = np.asarray(_logits(model, ids))
    np.testing.assert_array_equal(dropped, again)  # the same key, the same masks
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(_logits(model, ids)), plain)  # outside a step: no dropout
    no_drop = load_model(ModelSection(preset="llama-tiny"))
    lora.add(no_drop, lora.LoRASection(rank=4, dropout=0.0), seed=0)
    _randomise_b(no_drop)
    with lora.dropout_key(jax.random.key(0)):
        np.testing.assert_array_equal(np.asarray(_logits(no_drop, ids)), plain)


@pytest.mark.parametrize(("kind", "bound"), [("int8", 0.02), ("int4", 0.3)])
def test_qlora_stores_the_base_quantized_and_merges_to_its_dequantized_forward(kind, bound):
    """lora.quantize: every product weight of the base as int8 / int4 with a scale per output channel
    (the logits move by quantisation error only); the merged model is the dequantized base plus the
    deltas, in the weights' original dtype, with no integer weight or scale left."""
    model = load_model(ModelSection(preset="llama-tiny", scan_layers=True))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)))
    base = np.asarray(_logits(model, ids))
    lora.add(model, lora.LoRASection(rank=4, quantize=kind), seed=0)
    att = model.model.stacks[0].self_attn
    assert att.q_proj[...].dtype == jnp.dtype(kind) and att.q_proj_qscale.shape == (2, 1, 4, 16)
    quantized = np.asarray(_logits(model, ids))
    err = np.abs(quantized - base).max() / np.abs(base).max()
    assert 0 < err < bound, err
    _randomise_b(model)
    moved = np.asarray(_logits(model, ids))
    merged = lora.merge(nnx.clone(model))
    leaves = jax.tree.leaves(nnx.state(merged, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)} and not hasattr(
        merged.model.stacks[0].self_attn, "q_proj_qscale"
    )
    np.testing.assert_allclose(np.asarray(_logits(merged, ids)), moved, atol=2e-5, rtol=0)
    trainable, frozen = lora.partition(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))  # adapters only, fp32
    with pytest.raises(ConfigError, match="lora.quantize must be one of int8, int4 or null"):
        lora.LoRASection(rank=4, quantize="nf3")
    with pytest.raises(ConfigError, match="has LoRA adapters already"):
        lora.add(model, lora.LoRASection(rank=4))


@pytest.mark.slow  # ~15 s; QLoRA's forward, quantisation and merge stay in the default suite (the test above)
def test_qlora_sft_trains(tmp_path, data_file):
    cfg = _cfg(tmp_path, data_file, "q4", quantize="int4")
    train(cfg)
    loss = [r["train/loss"] for r in read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))]
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.3, loss
    final = _params(os.path.join(cfg.train.run_dir, "final"))
    assert all(v.dtype == np.float32 for v in final.values())  # merged: dequantized base + deltas


@pytest.mark.slow  # ~60 s each: a subprocess killed after its checkpoint, then resumed
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_lora_sft_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path, data_file, quantize):
    import signal
    import subprocess
    import sys

    from tests.sft.test_sft_train import KILL_AFTER_SAVE

    over = {} if quantize is None else {"quantize": quantize}  # QLoRA: the base re-quantized on resume
    full = _cfg(tmp_path, data_file, "whole", **over)
    train(full)
    killed = _cfg(tmp_path, data_file, "killed", **over)
    code = KILL_AFTER_SAVE.format(kill_step=4)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "killed.yaml")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(killed.train.run_dir, "final"))
    train(killed)  # resumes from step 4: the adapters and their moments from the checkpoint, the base rebuilt
    a, b = _params(os.path.join(full.train.run_dir, "final")), _params(os.path.join(killed.train.run_dir, "final"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la = [r["train/loss"] for r in read_jsonl(os.path.join(full.train.run_dir, "metrics.jsonl"))]
    lb = [r["train/loss"] for r in read_jsonl(os.path.join(killed.train.run_dir, "metrics.jsonl"))]
    assert la == lb
