"""Native XLA:CPU kernels for training steps: C++ XLA FFI handlers, compiled on this machine at first use.

Only `sftrl_jax.ops.cpu` calls these (the seam decides when; model code never names them):

    if kernels.gemm_available():
        c = kernels.gemm(a, b, trans_b=True)  # a [M, K] @ b[N, K]^T on OpenBLAS
        out, lse = kernels.causal_attention(q, k, v, mask, scale=0.125, block=64)
        y = kernels.rope(x, cos, sin)

`gemm` (blas_gemm.cc): fp32 products of any shape through the sgemm of the `scipy-openblas64`
wheel, the transposed operands of a backward pass read in place (10-15% faster SFT steps here,
`tools/bench_gemm.py`). `causal_attention` / `causal_attention_grad` (causal_attention.cc): a
training step's causal self-attention, forward and backward, in query blocks against the keys up to
each block's end, the softmax between two sgemm calls on a block's scores in cache and no [T, T]
probabilities kept for the backward pass (~10% of a 2 x 1024-token step). `rope` (rope.cc): the
rotation, forward and transposed (XLA:CPU evaluated the tables' trigonometry per head and half).
The kernels are an optimisation only: without a C++ compiler, or with `SFTRL_CPU_KERNELS=0`
(`SFTRL_CPU_GEMM=0` turns off the BLAS alone), `available()` is False and the seam runs XLA's ops,
which compute the same values up to fp32 rounding. (The sampler's decode kernels of earlier
versions were dropped with the sampler's second forward: decoding runs through the model.)

Build: the sources ship with the package; the first `available()` call of a process compiles them
with `$CXX` (default `c++`) against the XLA FFI headers jaxlib ships, with `-O3 -march=native`,
into `$SFTRL_KERNEL_CACHE` (default `~/.cache/sftrl_jax/kernels`), keyed by the source, flags,
compiler, jaxlib version and CPU, so later processes load it in milliseconds. A failed build logs
one warning with the compiler's message and falls back.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("blas_gemm.cc", "causal_attention.cc", "rope.cc"))
# Included by the sources (part of the build key).
HEADERS = (Path(__file__).with_name("parallel_for.h"), Path(__file__).with_name("blas.h"))
TARGETS = {  # FFI target name -> the handler's symbol in the library
    "sftrl_gemm_f32": "SftrlGemmF32",
    "sftrl_causal_attention_fwd_f32": "SftrlCausalAttentionFwdF32",
    "sftrl_causal_attention_bwd_f32": "SftrlCausalAttentionBwdF32",
    "sftrl_rope_f32": "SftrlRopeF32",
}
# The BLAS behind `gemm`: the ILP64 OpenBLAS of the `scipy-openblas64` wheel (a private copy, so
# setting its thread count does not touch numpy's), and its symbols.
BLAS_MODULE = "scipy_openblas64"
BLAS_SGEMM = "scipy_cblas_sgemm64_"
BLAS_SET_THREADS = "scipy_openblas_set_num_threads64_"
# -fno-trapping-math: loops with selects (masks, clamps) vectorise; no value changes (no reassociation).
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided; "error": why not; "path": the shared library
_registered: dict = {}  # the library whose handlers this process registered with XLA


def enabled() -> bool:
    """False when `SFTRL_CPU_KERNELS` is 0/false/off/no."""
    return os.environ.get("SFTRL_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftrl_jax" / "kernels"
    return Path(os.environ.get("SFTRL_KERNEL_CACHE", default))


def _cpu_id() -> str:
    """The CPU's model and feature flags (a library built with -march=native runs only on its like)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    return path, version.splitlines()[0] if version else ""


def _build() -> Path:
    cxx, version = _compiler()
    include = jax.ffi.include_dir()
    digest = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(FLAGS).encode(), version.encode()):
        digest.update(part)
    digest.update(jax.__version__.encode())
    digest.update(_cpu_id().encode())
    out = cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if run.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the CPU kernels are built and registered in this process (builds them on first call)."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            try:
                path = _build()
                if not _registered:  # XLA takes one registration per target and process
                    lib = ctypes.cdll.LoadLibrary(str(path))
                    for target, symbol in TARGETS.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                    _registered.update(path=path, lib=lib)
                _state.update(ok=True, path=path)
            except Exception as e:  # any failure means "use the JAX path", said once
                _state.update(ok=False, error=f"{type(e).__name__}: {e}")
                log.warning("sftrl_jax CPU kernels unavailable, using the JAX path: %s", _state["error"])
        return _state["ok"]


def _load_blas() -> None:
    """Hands the BLAS's sgemm to the library and makes the BLAS single-threaded (the kernel splits
    the work over XLA's threads itself)."""
    import importlib

    module = importlib.import_module(BLAS_MODULE)
    blas = ctypes.CDLL(str(Path(module.get_lib_dir()) / f"lib{module.get_library()}.so"))
    set_threads = getattr(blas, BLAS_SET_THREADS)
    set_threads.argtypes = [ctypes.c_int]
    set_threads(1)
    setter = _registered["lib"].SftrlSetSgemm
    setter.argtypes = [ctypes.c_void_p]
    setter(ctypes.cast(getattr(blas, BLAS_SGEMM), ctypes.c_void_p))
    _registered["blas"] = blas


def gemm_available() -> bool:
    """Whether `gemm` can run: the kernels are available and the OpenBLAS of the `scipy-openblas64`
    wheel loads (`SFTRL_CPU_GEMM=0` turns `gemm` off alone)."""
    if os.environ.get("SFTRL_CPU_GEMM", "1").strip().lower() in ("0", "false", "off", "no") or not available():
        return False
    with _lock:
        if "gemm" not in _state:
            try:
                if "blas" not in _registered:
                    _load_blas()
                _state["gemm"] = True
            except Exception as e:
                _state.update(gemm=False, gemm_error=f"{type(e).__name__}: {e}")
                log.warning("sftrl_jax BLAS matmul unavailable, using XLA's: %s", _state["gemm_error"])
        return _state["gemm"]


def error() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return _state.get("error")


def gemm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False, threads: int = 0) -> jax.Array:
    """op(a) @ op(b) in fp32 on CPU through OpenBLAS's sgemm: a [..., M, K] (or [..., K, M] with
    `trans_a`), b [..., K, N] (or [..., N, K] with `trans_b`) -> [..., M, N], the leading (batch)
    axes equal in a and b. The transposed operand is read in place (no copy). The work is split over
    XLA's intra-op threads (`threads` caps them; 0: all): by batch index, or within a product when
    there are fewer products than threads, one single-threaded BLAS call per part. Inside `jit` on
    one CPU device (XLA does not partition the call: on a mesh of several devices it would gather
    the operands). Call `gemm_available()` first."""
    for name, x in (("a", a), ("b", b)):
        if x.dtype != np.float32 or x.ndim < 2:
            raise TypeError(f"gemm: {name} must be a float32 array of 2 or more axes, got {x.dtype} {x.shape}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"gemm: the batch axes of a {a.shape} and b {b.shape} differ")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if k != kb:
        raise ValueError(f"gemm: op(a) is {(m, k)} and op(b) is {(kb, n)}: inner sizes differ")
    call = jax.ffi.ffi_call("sftrl_gemm_f32", jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32))
    return call(
        a, b, trans_a=np.int64(bool(trans_a)), trans_b=np.int64(bool(trans_b)), threads=np.int64(threads or 1 << 20)
    )


def _attention_args(q, k, v, mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != np.float32 or x.ndim != 4:
            raise TypeError(f"causal_attention: {name} must be a 4-D float32 array, got {x.dtype} {x.shape}")
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(
            f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit [B, T, N, H], [B, T, K, H] "
            "with N a multiple of K"
        )
    if mask.shape != (b, t, t):
        raise ValueError(f"causal_attention: mask {mask.shape} is not [B, T, T] = {(b, t, t)}")
    return mask.astype(bool)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, block: int, threads: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Causal self-attention of a training step on CPU (causal_attention.cc): q [B, T, N, H], k/v
    [B, T, K, H] (N = K * G), mask [B, T, T] bool within the causal pattern -> (out [B, T, N, H],
    lse [B, K, T * G], the rows' log-sum-exp, +inf for a row with no key, which attends uniformly to
    all keys); the queries in blocks of `block` positions against the keys up to each block's end.
    `threads` caps the threads used (0: all of XLA's intra-op pool); the result does not depend on
    it. Call `gemm_available()` first."""
    mask = _attention_args(q, k, v, mask)
    b, t, n, _ = q.shape
    shapes = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((b, k.shape[2], t * n // k.shape[2]), jnp.float32),
    )
    call = jax.ffi.ffi_call("sftrl_causal_attention_fwd_f32", shapes)
    return call(q, k, v, mask, scale=np.float32(scale), block=np.int64(block), threads=np.int64(threads or 1 << 20))


def causal_attention_grad(
    q, k, v, mask, out, lse, dout, *, scale: float, block: int, threads: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients (dq, dk, dv) of `causal_attention` for the output cotangent `dout`, from its
    inputs and its (out, lse); the probabilities are recomputed from lse."""
    mask = _attention_args(q, k, v, mask)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call("sftrl_causal_attention_bwd_f32", shapes)
    return call(
        q,
        k,
        v,
        mask,
        out,
        lse,
        dout,
        scale=np.float32(scale),
        block=np.int64(block),
        threads=np.int64(threads or 1 << 20),
    )


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, inverse: bool = False, threads: int = 0) -> jax.Array:
    """RoPE of x [B, T, N, H] (fp32, CPU; rope.cc) with cos, sin [B, T, H/2] (`ops.rope_cos_sin`):
    y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin over the halves of H, the values of `ops.xla.rope`;
    `inverse` rotates by the opposite angle (the transpose: the backward pass). `threads` caps the
    threads used (0: all of XLA's intra-op pool); the result does not depend on it. Call
    `available()` first."""
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[3] % 2:
        raise TypeError(f"rope: x must be a [B, T, N, H] float32 array with H even, got {x.dtype} {x.shape}")
    table = (*x.shape[:2], x.shape[3] // 2)
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dtype != np.float32 or c.shape != table:
            raise ValueError(f"rope: {name} {c.dtype} {c.shape} is not float32 [B, T, H/2] = {table} for x {x.shape}")
    call = jax.ffi.ffi_call("sftrl_rope_f32", jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x, cos, sin, inverse=np.int64(bool(inverse)), threads=np.int64(threads or 1 << 20))
