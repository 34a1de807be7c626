"""What the seam may use while a program is traced: a frozen `Policy`, set per traced function.

A step builder (SFT, RL) asks `policy_for(mesh)` once, then wraps its step with
`traced_with(step, policy)` before `jax.jit`; the ops read `current()` at trace time. Model code
never sees any of it. Outside any `traced_with` the platform default applies (`Policy()`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator

import jax

ATTENTION_IMPLS = (None, "cudnn", "flash", "cpu_kernel", "blocked")


@dataclasses.dataclass(frozen=True)
class Policy:
    """platform: 'cpu' | 'gpu' | 'tpu' (None: `jax.default_backend()`). cpu_kernels: the native CPU
    kernels of `sftrl_jax.kernels` (OpenBLAS products, causal attention, RoPE, fused projections)
    may run: only for a program on one CPU device (XLA does not partition a custom call).
    exact: the RL passes: keep the OpenBLAS products but not the causal-attention / RoPE kernels
    or fused projections, whose other summation order made the first PPO/GRPO ratio differ from 1
    (2.4e-7). reference: the plain XLA ops of `ops.xla` on any backend (the parity tests' "XLA path
    of each backend"). attention: insist on one fused kernel (an error where it cannot run; tests,
    benchmarks); "blocked": `ops.xla.attention_blocked` on any backend (XLA ops with a fused kernel's
    memory: `sftrl plan`'s stand-in for cuDNN / the TPU kernel); None = the backend's choice."""

    platform: str | None = None
    cpu_kernels: bool = False
    exact: bool = False
    reference: bool = False
    attention: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"ops.Policy: attention {self.attention!r} is not one of {ATTENTION_IMPLS}")

    @property
    def backend(self) -> str:
        p = self.platform or jax.default_backend()
        return "gpu" if p in ("cuda", "rocm", "gpu") else p


_DEFAULT = Policy()
_POLICY: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("sftrl_ops_policy", default=None)


def current() -> Policy:
    return _POLICY.get() or _DEFAULT


@contextlib.contextmanager
def use(policy: Policy) -> Iterator[None]:
    """Trace under `policy` (a context manager; `traced_with` for a function)."""
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def traced_with(fn, policy: Policy | None):
    """`fn` traced under `policy` (wrap a step function before `jax.jit`); None: the default."""
    if policy is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use(policy):
            return fn(*args, **kwargs)

    return wrapped


def policy_for(mesh: jax.sharding.Mesh | None, *, exact: bool = False) -> Policy:
    """The policy for programs on `mesh`: its platform; native CPU kernels on one CPU device when
    they are built (`SFTRL_CPU_KERNELS`, `SFTRL_CPU_GEMM`, see `sftrl_jax.kernels`)."""
    if mesh is None:
        devices = jax.devices()[:1]
    else:
        devices = list(mesh.devices.flat)
    platform = devices[0].platform
    kernels_ok = False
    if platform == "cpu" and len(devices) == 1:
        from sftrl_jax import kernels

        kernels_ok = kernels.gemm_available()
    return Policy(platform=platform, cpu_kernels=kernels_ok, exact=exact)
