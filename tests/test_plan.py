"""`sftrl plan` on the tiny configs: parameter bytes and FLOPs against hand-computed counts."""

import json

import pytest

from sftrl_jax import cli, planning
from sftrl_jax.models import config as config_lib

TINY = (
    "model.text_overrides={vocab_size: 2048, hidden_size: 128, intermediate_size: 384, num_layers: 2, "
    "num_heads: 4, num_kv_heads: 2, head_dim: 32, max_position_embeddings: 2048}"
)
# By hand, for the tiny text model above: per layer q (128 x 4 x 32) + k, v (128 x 2 x 32 each) + o (4 x 32
# x 128) = 16384 + 8192 + 8192 + 16384 = 49152; MLP 3 x 128 x 384 = 147456; two layers + the head 128 x 2048.
MATMUL = 2 * (49152 + 147456) + 128 * 2048  # 655,360
# All parameters: the matrices, the embedding 2048 x 128, norms 2 x 2 x 128 + 128.
PARAMS = MATMUL + 2048 * 128 + 5 * 128  # 918,144


def _tiny():
    return config_lib.LlamaConfig.tiny(
        vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32
    )


def _plan(capsys, *args):
    assert cli.main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["programs"]


def test_matmul_params_by_hand():
    cfg = config_lib.LlamaConfig.tiny(
        vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32
    )
    assert planning.matmul_params(cfg, images=False) == (MATMUL, 0)
    # forward FLOPs of 16 x 160 tokens: 2 x matrices x tokens + attention's two products over the
    # 80 keys a causal query sees on average (2 layers, 4 heads of 32)
    tokens = 16 * 160
    attention = 4 * 2 * 4 * 32 * 80 * tokens
    assert planning.flops.forward_flops(cfg, rows=16, length=160) == 2 * MATMUL * tokens + attention


def test_plan_sft_tiny(capsys):
    (row,) = _plan(capsys, "--config", "configs/sft/gp_l_tiny.yaml", "--devices", "8", "--only", "[160]")
    assert row["name"] == "sft_step[160]" and set(planning.FIELDS) <= set(row)
    # fp32 params + AdamW's two moments, FSDP-sharded over 8 devices, + the [16, 160] batch (4 arrays of 4 bytes)
    state = 3 * 4 * PARAMS / 8
    assert state <= row["argument_bytes"] <= state + 16 * 160 * 4 * 4 / 8 + 64 * 1024
    ideal = 3 * planning.flops.forward_flops(
        config_lib.LlamaConfig.tiny(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=384,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
        ),
        rows=16,
        length=160,
    )
    assert row["ideal_flops"] == pytest.approx(ideal / 8)
    # The plan compiles XLA's ops, whose attention computes the whole [T, T] square (the ideal counts
    # the causal half a fused kernel computes): compare with the whole square's count.
    square = 3 * planning.flops.forward_flops(_tiny(), rows=16, length=160, keys=160) / 8
    assert 0.9 < row["flops"] / square < 1.15
    assert row["peak_bytes"] <= row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
    assert row["collective_bytes"] > 0  # FSDP gathers the weights


def test_plan_rl_tiny_update_is_sharded(capsys):
    rows = _plan(
        capsys,
        "--config",
        "configs/rl/gp_l_tiny.yaml",
        "model.init=null",
        "model.preset=llama-tiny",
        TINY,
        "--devices",
        "8",
        "--only",
        "update",
    )
    (row,) = rows
    assert row["name"].startswith("ppo_update[") and row["loop_trips"] == 32 // 16
    # Per device, the step's FLOPs (both micro-batches: the scan's trip count is counted) are those
    # of its share of the rows (the whole attention square, as XLA's ops compute it; PPO's value head
    # is ~0.1% more).
    length = int(row["name"].split("[")[1].rstrip("]"))
    square = 3 * planning.flops.forward_flops(_tiny(), rows=32, length=length, keys=length) / 8
    assert row["ideal_flops"] == pytest.approx(3 * planning.flops.forward_flops(_tiny(), rows=32, length=length) / 8)
    assert 0.9 < row["flops"] / square < 1.15


def test_plan_refuses_unsharded_micro_batches(capsys):
    args = ["plan", "--config", "configs/rl/gp_l_tiny.yaml", "model.init=null", "model.preset=llama-tiny", TINY]
    assert cli.main([*args, "ppo.micro_batch=4", "ppo.samples_per_step=32", "--devices", "8"]) == 2
    err = capsys.readouterr().err
    assert "ppo.micro_batch 4 must be a multiple of the mesh's batch axes data x fsdp (8)" in err


def test_analytic_peak_by_hand(capsys):
    """The analytic figure (planning/memory.py) of the tiny SFT step with remat, counted by hand."""
    (row,) = _plan(
        capsys, "--config", "configs/sft/gp_l_tiny.yaml", "model.remat=true", "--devices", "8", "--only", "[160]"
    )
    grads = 4 * PARAMS // 8  # the sharded fp32 gradient sum
    rows = 16 // 8  # per device
    residuals = 2 * rows * 160 * 128 * 4  # each layer's input, fp32
    layer = 32768 + 16384 + 3 * 128 * 384  # q, k, v (16384 + 2 x 8192) + o + MLP = 196,608 parameters
    working = 2 * layer * 4 + 4 * layer + rows * 160 * (4 * 128 + 3 * 384) * 4
    logits = 3 * rows * 160 * 2048 * 4
    assert row["analytic_peak_bytes"] == row["argument_bytes"] + grads + residuals + working + logits


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_export_only_lowers_every_rl_program_for_the_accelerator(capsys, platform):
    """`--platform P --export-only`: every program of the run exported for P with nothing compiled
    here, and no CPU-only custom call (our native kernels' FFI targets) in any of them."""
    args = ["plan", "--config", "configs/rl/gp_l_tiny.yaml", "model.init=null", "model.preset=llama-tiny", TINY]
    assert cli.main([*args, "--devices", "8", "--platform", platform, "--export-only", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["programs"]
    assert [r["name"] for r in rows] == ["rollout_prefill", "rollout_decode", "values_pass", "ppo_update[768]"]
    for r in rows:
        assert r["export"]["platform"] == platform and "compile_s" not in r
        assert "cpu" not in r["export"]["custom_calls"].lower() and "sftrl" not in r["export"]["custom_calls"]
    if platform == "tpu":  # the flash kernel, run per device under shard_map (Mosaic does not partition)
        assert "tpu_custom_call" in rows[-1]["export"]["custom_calls"]
    assert cli.main([*args, "--devices", "8", "--export-only"]) == 2
    assert "--export-only needs --platform" in capsys.readouterr().err


def test_hlo_flops_counts_known_loops_by_their_trips():
    """A scan's body counts trip-count times (nested: the product), a run-time loop once, a batched
    product 2 x result x contracted; `cost_analysis()` (one body per loop) is what it corrects."""
    import jax
    import jax.numpy as jnp

    w, x = jnp.ones((10, 64, 64)), jnp.ones((4, 64))
    one = 2 * 4 * 64 * 64

    def layers(x, w):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

    def nested(x, w):
        return jax.lax.scan(lambda c, _: (layers(c, w), None), x, None, length=3)[0]

    def runtime(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, c: c @ w[i], x)

    def flops(fn, *args):
        return planning.analysis.hlo_flops(jax.jit(fn).lower(*args).compile().as_text())

    assert flops(layers, x, w) == 10 * one
    assert flops(nested, x, w) == 30 * one
    assert flops(runtime, x, w, 3) == one
    assert (
        flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6)))
        == 2 * 3 * 4 * 6 * 5
    )
    assert jax.jit(layers).lower(x, w).compile().cost_analysis()["flops"] < 2 * one  # the body once

    # Collectives the same way: one all-reduce of the [4, 64] carry per layer is 10 of them.
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])

    def reduced(x, w):
        step = lambda c, wi: (jax.lax.psum(c @ wi, "fsdp"), None)  # noqa: E731
        return jax.lax.scan(step, x, w)[0]

    fn = jax.jit(jax.shard_map(reduced, mesh=mesh, in_specs=(P(), P()), out_specs=P()))
    assert planning.analysis.collectives(fn.lower(x, w).compile().as_text())["all-reduce"] == 10 * 4 * 64 * 4


def test_plan_scanned_layers_counts_every_layer(capsys):
    """`model.scan_layers=true`: the step's FLOPs are the unrolled step's (every layer counted)."""
    args = ["--devices", "8", "--only", "[160]"]
    (unrolled,) = _plan(capsys, "--config", "configs/sft/gp_l_tiny.yaml", "model.remat=true", *args)
    (scanned,) = _plan(
        capsys, "--config", "configs/sft/gp_l_tiny.yaml", "model.remat=true", "model.scan_layers=true", *args
    )
    assert scanned["ideal_flops"] == unrolled["ideal_flops"]
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.01)
    assert scanned["xla_flops"] < 0.9 * unrolled["xla_flops"]  # what cost_analysis alone would have said


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/sft/gp_l.yaml", "configs/sft/gp_vl.yaml"])
def test_11b_sft_step_fits_an_80_gib_device(capsys, config):
    """The paper's SFT recipe at 11B on the 8-device node (`sftrl plan`, ~2 min each here): the
    longest bucket's step fits 80 GiB per device by XLA:CPU's own buffers, every layer counted."""
    (row,) = _plan(
        capsys,
        "--config",
        config,
        "model.init=null",
        "model.preset=llama-3.2-11b-vision",
        "--mesh",
        "data=1,fsdp=8,tensor=1",
        "--devices",
        "8",
        "--only",
        "[2048]",
    )
    assert row["peak_bytes"] < 80 * 2**30
    assert 0.85 < row["flops"] / row["ideal_flops"] < 1.15


def test_the_plan_holds_no_f32_copy_of_a_bf16_weight_stack():
    """XLA:CPU multiplies bf16 in f32 and, left to its loop-invariant code motion, converts a whole
    scanned bf16 weight stack to f32 before the loop (2x the weights, which an accelerator never holds):
    the planner compiles without that hoist (`hoist=True` shows the copy)."""
    import jax
    import jax.numpy as jnp

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    stack = jax.ShapeDtypeStruct((8, 512, 2048), jnp.bfloat16)  # 16 MiB of bf16 weights
    x = jax.ShapeDtypeStruct((4, 512), jnp.bfloat16)

    def layers(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi).astype(c.dtype) @ wi.T, None), x, w)[0]

    program = planning.programs.Program("layers", jax.jit(layers), (stack, x), None, mesh)
    weights = 8 * 512 * 2048 * 2
    assert planning.analyse(program, hoist=True)["temp_bytes"] >= 2 * weights  # the f32 copy of the stack
    assert planning.analyse(program)["temp_bytes"] <= weights // 2  # one layer's f32 slice (4 MiB) at a time


def test_a_frozen_vision_side_runs_forward_only_in_the_ideal():
    """LoRA with no adapter on the vision side: nothing upstream of the vision tokens is trained, so the
    tower, projector and cross-attention k/v count one forward; the text side 2 (+ remat's)."""
    from sftrl_jax.planning import flops

    cfg = config_lib.MllamaConfig.tiny()
    text, side = flops._forward_parts(cfg, rows=2, length=64, keys=None, images=1)
    assert side > 0 and text + side == flops.forward_flops(cfg, rows=2, length=64, images=1)
    ideal = lambda **kw: flops.ideal_train_flops(cfg, rows=2, length=64, images=1, remat=True, **kw)  # noqa: E731
    assert ideal() == 4 * (text + side)
    assert ideal(frozen_base=True) == 3 * (text + side)
    assert ideal(frozen_base=True, vision_trained=False) == 3 * text + side
    assert ideal(vision_trained=False) == 4 * (text + side)  # full fine-tuning trains the tower
    # a decode step: the new token goes through the cross-attention layers, not the (cached) vision side
    step = flops.decode_flops(cfg, rows=2, keys=70, images=1)
    assert step == flops._forward_parts(cfg, rows=2, length=1, keys=70, images=1)[0]
    assert step > flops.forward_flops(cfg, rows=2, length=1, keys=70) and step < flops.forward_flops(
        cfg, rows=2, length=1, keys=70, images=1
    )
