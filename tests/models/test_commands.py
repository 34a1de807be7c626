"""`sftrl convert / export / inspect`, orbax model checkpoints, and the 11B model built abstractly."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import cli
from sftrl_jax.models import build, checkpoint, convert
from sftrl_jax.models import config as config_lib
from sftrl_jax.parallel import make_mesh
from tests.models import hf_helpers as H
from tests.models.test_config import FIXTURE

N_11B = 10_670_220_835


def test_inspect_11b_config_in_seconds_without_allocating():
    """In a fresh process (so its peak memory is its own): count, and bytes per device on fsdp=8."""
    start = time.time()
    code = (
        # Peak RSS of this process's own memory (VmHWM): getrusage's ru_maxrss also counts the
        # parent's resident memory at the spawn (Linux keeps the old mm's high-water mark across
        # vfork + exec), which made this test measure the size of the pytest process.
        "import sys; from sftrl_jax import cli; rc = cli.main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('maxrss_mb', int(hwm) // 1024); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "inspect", FIXTURE, "--mesh", "data=1,fsdp=8,tensor=1", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"parameters: {N_11B}" in lines
    assert "architecture: MllamaForConditionalGeneration" in lines
    params = next(line for line in lines if line.startswith("per device: params"))
    per_device = int(params.split("(")[1].split(" bytes")[0].replace(",", ""))
    assert 2 * N_11B / 8 <= per_device < 2 * N_11B / 8 * 1.001
    adam = next(line for line in lines if line.startswith("per device: adamw"))
    assert f"({2 * per_device:,} bytes)" in adam
    maxrss_mb = int(lines[-1].split()[-1])
    assert maxrss_mb < 2000  # the weights alone would be 21 GB in bf16
    assert time.time() - start < 120  # seconds, not minutes, even on a loaded 2-core machine


@pytest.mark.hf
def test_11b_param_count_matches_transformers_on_meta_device():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with open(FIXTURE) as f:
        hf_cfg = transformers.MllamaConfig.from_dict(json.load(f))
    with torch.device("meta"):
        model = transformers.MllamaForConditionalGeneration(hf_cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == N_11B == build.param_count(config_lib.MllamaConfig.llama_3_2_11b_vision())


def test_11b_forward_lowers_abstractly():
    cfg = config_lib.MllamaConfig.llama_3_2_11b_vision()
    graphdef, state = nnx.split(build.abstract_model(cfg, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(state))
    s = jax.ShapeDtypeStruct
    batch = dict(
        input_ids=s((2, 32), jnp.int32),
        attention_mask=s((2, 32), jnp.int32),
        pixel_values=s((2, 1, 4, 3, 560, 560), jnp.bfloat16),
        aspect_ratio_ids=s((2, 1), jnp.int32),
        aspect_ratio_mask=s((2, 1, 4), jnp.int32),
        cross_attention_mask=s((2, 32, 1, 4), jnp.int32),
    )
    traced = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch)).trace(state, batch)
    out = traced.out_info
    assert out.logits.shape == (2, 32, 128256) and out.logits.dtype == jnp.float32
    assert out.hidden_states.shape == (2, 32, 4096)
    assert "stablehlo.dot_general" in traced.lower().as_text()[:2_000_000]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("torch")
    cfg = config_lib.MllamaConfig.tiny()
    return cfg, H.save_hf(H.hf_model(cfg, seed=21), str(tmp_path_factory.mktemp("hf")))


@pytest.mark.hf
def test_convert_then_export_round_trip(hf_folder, tmp_path, capsys, n_devices):
    transformers = pytest.importorskip("transformers")
    cfg, path = hf_folder
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf_out")
    assert cli.main(["convert", "--hf", path, "--out", ckpt, "--mesh", "data=1,fsdp=-1,tensor=1"]) == 0
    assert "265,291 parameters" in capsys.readouterr().out
    assert checkpoint.is_checkpoint(ckpt)

    # restores straight into a sharded layout and computes what the HF folder computes
    mesh = make_mesh((1, 2, 4) if n_devices >= 8 else None)
    restored = checkpoint.load_checkpoint(ckpt, mesh=mesh)
    q = restored.language_model.layers[0].self_attn.q_proj[...]
    assert q.sharding.mesh.shape == mesh.shape and q.addressable_shards[0].data.size < q.size
    direct = convert.from_pretrained(path)
    for (p, a), (_, b) in zip(build.flat_params(direct).items(), build.flat_params(restored).items()):
        np.testing.assert_array_equal(a[...], b[...], err_msg=p)

    assert cli.main(["export", "--ckpt", ckpt, "--out", out, "--dtype", "bfloat16"]) == 0
    _, info = transformers.MllamaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    assert cli.main(["inspect", ckpt]) == 0
    assert "parameters: 265291" in capsys.readouterr().out
    assert cli.main(["inspect", out, "--mesh", "fsdp=2,tensor=4"]) == 0
    text = capsys.readouterr().out
    assert "parameters: 265291" in text and "per device: params" in text


def test_checkpoint_dtype_cast_and_config_flags(tmp_path):
    cfg = config_lib.MllamaConfig.tiny().with_transformers_semantics()
    model = build.create_model(cfg, seed=3)
    checkpoint.save_checkpoint(model, str(tmp_path / "c"))
    stored, dtype = checkpoint.read_checkpoint_config(str(tmp_path / "c"))
    assert stored == cfg and dtype == "float32"
    bf16 = checkpoint.load_checkpoint(str(tmp_path / "c"), dtype=jnp.bfloat16)
    a = model.language_model.embed_tokens[...]
    b = bf16.language_model.embed_tokens[...]
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a.astype(jnp.bfloat16), b)


def test_command_errors_are_messages(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a sftrl_jax model checkpoint" in capsys.readouterr().err
    assert cli.main(["inspect", FIXTURE, "--mesh", "data=3,fsdp=3"]) == 0  # sizes only: no devices needed
    assert cli.main(["inspect", FIXTURE, "--mesh", "data=3,pipe=3"]) == 2
    assert "expected name=size" in capsys.readouterr().err
