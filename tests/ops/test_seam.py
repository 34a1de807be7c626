"""The ops seam holds: model files name no kernel, context variable or backend; only `ops` imports
`sftrl_jax.kernels`; each backend's selection picks what its docstring promises; the sampler
prepares its weights once per parameter version, outside the decode program."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import kernels, ops, sampling
from sftrl_jax.models import build
from sftrl_jax.models import config as config_lib
from sftrl_jax.sampling import sampler

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "sftrl_jax"
MODEL_FILES = ("layers.py", "text.py", "vision.py", "mllama.py")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_the_seam_imports_the_kernels():
    importers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(n == "sftrl_jax.kernels" or n.startswith("sftrl_jax.kernels.") for n in _imports(p))
    )
    assert importers == ["ops/cpu.py", "ops/policy.py"]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_name_no_kernel_context_or_backend(name):
    path = PACKAGE / "models" / name
    imports = _imports(path)
    assert not {n for n in imports if "kernels" in n or n == "contextvars" or n == "contextlib"}
    code = path.read_text()
    for word in ("default_backend", "platform", "contextvar", "cpu_gemm", "ffi", "cudnn", "pallas"):
        assert word not in code, f"models/{name} names {word!r}"


def _qkv(dtype, t=256, s=None, n=4, k=2, h=16):
    rng = np.random.default_rng(0)
    s = t if s is None else s
    q = jnp.asarray(rng.standard_normal((2, t, n, h)), dtype)
    kv = [jnp.asarray(rng.standard_normal((2, s, k, h)), dtype) for _ in range(2)]
    mask = jnp.asarray(np.tril(np.ones((t, s), bool))[None].repeat(2, 0))
    return q, *kv, mask


def _lowered(policy, fn, *args, platforms=None):
    traced = jax.jit(ops.traced_with(fn, policy)).trace(*args)
    if platforms:
        return jax.export.export(jax.jit(ops.traced_with(fn, policy)), platforms=platforms)(*args).mlir_module()
    return traced.lower().as_text()


def test_each_backend_selects_its_attention():
    q, k, v, mask = _qkv(jnp.bfloat16)
    attend = lambda q, k, v, m: ops.attention(q, k, v, m, scale=0.25, causal=True)  # noqa: E731
    # TPU: the Pallas flash kernel (a Mosaic custom call) for causal self-attention of 128-row blocks.
    tpu = _lowered(ops.Policy(platform="tpu"), attend, q, k, v, mask, platforms=("tpu",))
    assert "tpu_custom_call" in tpu
    # ... and XLA's ops when the length is not a multiple of its blocks.
    q2, k2, v2, m2 = _qkv(jnp.bfloat16, t=100)
    assert "tpu_custom_call" not in _lowered(ops.Policy(platform="tpu"), attend, q2, k2, v2, m2, platforms=("tpu",))
    # CPU: blocked XLA attention (two query blocks of 128 rows -> more dots than the reference's two).
    cpu = _lowered(ops.Policy(platform="cpu"), attend, *_qkv(jnp.float32, t=1100))
    ref = _lowered(ops.Policy(reference=True), attend, *_qkv(jnp.float32, t=1100))
    assert cpu.count("dot_general") > ref.count("dot_general") == 2
    if kernels.gemm_available():
        with_kernels = _lowered(ops.Policy(platform="cpu", cpu_kernels=True), attend, *_qkv(jnp.float32))
        assert "sftrl_causal_attention_fwd_f32" in with_kernels
        exact = _lowered(ops.Policy(platform="cpu", cpu_kernels=True, exact=True), attend, *_qkv(jnp.float32))
        assert "sftrl_causal_attention_fwd_f32" not in exact and "sftrl_gemm_f32" in exact


def test_gpu_attention_is_cudnn_where_it_fits():
    q, k, v, mask = _qkv(jnp.bfloat16)
    attend = lambda q, k, v, m: ops.attention(q, k, v, m, scale=0.25, causal=True)  # noqa: E731
    try:
        gpu = _lowered(ops.Policy(platform="gpu", attention="cudnn"), attend, q, k, v, mask, platforms=("cuda",))
    except Exception as e:  # cuDNN's version check needs a GPU on some JAX versions
        pytest.skip(f"cuDNN attention cannot be lowered without a GPU here: {type(e).__name__}: {e}"[:200])
    assert "cudnn" in gpu.lower()
    # fp32 (the parity tests' dtype) is outside cuDNN's envelope: XLA's ops.
    q32, k32, v32, _ = _qkv(jnp.float32)
    assert "cudnn" not in _lowered(ops.Policy(platform="gpu"), attend, q32, k32, v32, mask, platforms=("cuda",))


def test_backends_agree_with_the_reference_on_cpu():
    """The XLA fallbacks of the GPU and TPU modules (what their backends run outside the fused
    kernels) give the reference's values, run here on CPU."""
    q, k, v, mask = _qkv(jnp.float32, t=100)
    mask = mask.at[1, :, :7].set(False)  # key padding
    attend = lambda q, k, v, m: ops.attention(q, k, v, m, scale=0.25, causal=True)  # noqa: E731
    ref = jax.jit(ops.traced_with(attend, ops.Policy(reference=True)))(q, k, v, mask)
    for policy in (ops.Policy(platform="gpu"), ops.Policy(platform="tpu"), ops.Policy(platform="cpu")):
        got = jax.jit(ops.traced_with(attend, policy))(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5, err_msg=str(policy))


def test_sampler_prepares_weights_once_per_parameter_version():
    cfg = config_lib.LlamaConfig.tiny()
    model = build.create_model(cfg, seed=0, dtype=jnp.bfloat16)  # fp32 parameters, bf16 compute
    prompts = [[1, 5, 9], [1, 7]]
    start = sampler.PREPARE_COUNT[0]
    first = sampling.generate(model, prompts, max_new_tokens=6, temperature=0.0)
    again = sampling.generate(model, prompts, max_new_tokens=6, temperature=0.0)
    assert sampler.PREPARE_COUNT[0] - start == 1
    np.testing.assert_array_equal(first.tokens, again.tokens)
    # A new parameter version (an optimiser step) is prepared once more.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 1.0001, state))
    sampling.generate(model, prompts, max_new_tokens=6, temperature=0.0)
    assert sampler.PREPARE_COUNT[0] - start == 2
    # The decode program casts no weight matrix: its bf16 inputs come in already cast.
    graphdef, params = nnx.split(model)
    prepared = sampler.prepare_weights(params, model.dtype)
    assert {x.dtype for x in jax.tree.leaves(prepared) if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
    # fp32 compute over fp32 parameters: nothing to prepare, the parameters themselves.
    model32 = build.create_model(cfg, seed=0)
    params32 = nnx.state(model32)
    assert sampler.prepare_weights(params32, jnp.float32) is params32


def test_sampler_decodes_a_remat_model():
    """The 11B recipes train with `model.remat: true`; the rollout samples that same model. Decoding
    through the model must not run `nnx.remat` inside the decode loop (it did not trace: found by
    `sftrl plan` on configs/rl/gp_l.yaml), and gives the tokens of the model without remat."""
    cfg = config_lib.LlamaConfig.tiny()
    prompts = [[1, 5, 9], [1, 7]]
    plain = sampling.generate(build.create_model(cfg, seed=0), prompts, max_new_tokens=6, temperature=0.0)
    remat = sampling.generate(build.create_model(cfg, seed=0, remat=True), prompts, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(remat.tokens, plain.tokens)
    np.testing.assert_allclose(remat.logprobs_raw, plain.logprobs_raw, atol=1e-6)


@pytest.mark.parametrize("filled", [1, 37, 128, 129, 300, 333])
def test_decode_attention_reads_only_the_filled_slots(filled):
    """`ops.attention(..., filled=n)` for a one-query step equals the reference over the first n slots
    (masked as given), whatever the block arithmetic (n not a multiple of the 128-slot block, the
    last block clamped to the cache's end at S = 333), and never reads a block past the filled ones:
    NaN there would poison the output."""
    from sftrl_jax.ops import xla

    rng = np.random.default_rng(filled)
    b, s, n, kv, h = 3, 333, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
    k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    mask = rng.random((b, 1, s)) < 0.7
    mask[:, :, filled - 1] = True  # the step's own slot
    mask[2] = False  # a row with nothing to attend: uniform over all S slots
    k[:, filled:], v[:, filled:] = 0.0, 0.0  # empty slots hold zeros, as a fresh cache
    ref = xla.attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask & (np.arange(s) < filled)), scale=0.3)
    first_unread = -(-filled // 128) * 128
    k[:, first_unread:], v[:, first_unread:] = np.nan, np.nan
    got = jax.jit(lambda q, k, v, m, f: ops.attention(q, k, v, m, scale=0.3, filled=f))(
        q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), jnp.int32(filled)
    )
    if first_unread >= s:  # every block read: no NaN was placed
        assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(ref[:2]), rtol=2e-6, atol=2e-6)
    # The empty row: the reference's uniform weights over all S slots (sum of the filled values / S).
    want = np.repeat(np.nan_to_num(v[2]).sum(0) / s, n // kv, axis=0)
    np.testing.assert_allclose(np.asarray(got[2, 0]), want, rtol=1e-5, atol=1e-6)
