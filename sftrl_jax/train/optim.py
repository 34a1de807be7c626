"""Optimisers (optax): AdamW with warm-up + cosine schedule, clipping, decay masks, frozen paths.

Parameter paths are the `/`-joined keys of an `nnx.State` (e.g.
`vision_model/transformer/layers/0/mlp/fc1/kernel`). `freeze` and `no_decay` are regular
expressions searched in those paths: frozen parameters get zero updates and keep no optimiser state
(the paper's SFT sweep freezes the vision tower and/or the projector this way).

Moments have a declared dtype, `optim.moment_dtype`: "float32" (the default; what mixed-precision
trainers do: with `model.param_dtype=bfloat16` AdamW still keeps fp32 moments and computes the
update in fp32, then casts it to bf16), "bfloat16" (half the optimiser memory, less precise second
moments) or "param" (each moment in its parameter's dtype). The gradients and parameters are cast
to that dtype before the update and the update back to the parameter's dtype, so the skip-non-finite
branches agree whatever the parameters' dtype. Note bf16 parameters keep no fp32 master copy: an
update below a parameter's bf16 resolution (~0.4% of its magnitude, e.g. lr 1e-6 on weights ~0.02)
is rounded away; use `model.param_dtype=float32` with `model.dtype=bfloat16` for such small rates.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from sftrl_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule. Paper SFT: lr 1e-6 (GP-L), cosine, warm-up 3%, weight decay 0.
    Paper PPO: Adam eps 1e-7, grad clip 0.01, cosine to 1e-9 over `lr_max_steps`."""

    lr: float = 1e-6  # peak learning rate
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = 0.03  # fraction of total steps spent warming up linearly from 0
    min_lr: float = 0.0  # end value of the cosine / linear decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = (r"norm", r"bias", r"embed")  # regexes: paths without weight decay
    grad_clip: float | None = 1.0  # global-norm clip; None = off
    freeze: tuple[str, ...] = ()  # regexes: paths that are not trained
    skip_nonfinite: bool = True  # a step whose gradients are NaN/inf changes nothing (counted)
    moment_dtype: Literal["float32", "bfloat16", "param"] = "float32"  # AdamW moments; "param" = as the param

    def __post_init__(self):
        # Written so that NaN fails every check: `nan < 0` is False, `not 0 <= nan` is True.
        for name in ("lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"optim.eps must be a finite number > 0, got {self.eps}")
        for name in ("b1", "b2"):  # Adam's moment decays; b >= 1 never forgets, b > 1 diverges
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"optim.grad_clip must be a finite number > 0 or null, got {self.grad_clip}")
        if self.moment_dtype not in ("float32", "bfloat16", "param"):
            raise ConfigError(f"optim.moment_dtype must be float32, bfloat16 or param, got {self.moment_dtype!r}")
        for pattern in (*self.freeze, *self.no_decay):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"optim: bad regular expression {pattern!r}: {e}") from None


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimiser step."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, cfg.min_lr, max(total_steps - warmup, 1))
    else:
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1), alpha=_alpha(cfg))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _alpha(cfg: OptimConfig) -> float:
    return cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def path_labels(params: Any, patterns: Sequence[str], yes: Any, no: Any) -> Any:
    """A pytree like `params` whose leaves are `yes` where a regex matches the leaf's path, else `no`."""
    compiled = [re.compile(p) for p in patterns]

    def label(path, _):
        s = path_str(path)
        return yes if any(c.search(s) for c in compiled) else no

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, params: Any, *, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ clip, + decay mask, + frozen paths, + non-finite skipping) for the pytree `params`."""
    if cfg.freeze:
        frozen = jax.tree.leaves(path_labels(params, cfg.freeze, True, False))
        if not any(frozen):
            raise ConfigError(f"optim.freeze {list(cfg.freeze)} matches no parameter path")
        if all(frozen):
            raise ConfigError(f"optim.freeze {list(cfg.freeze)} freezes every parameter")
    decay_mask = path_labels(params, cfg.no_decay, False, True)
    tx = optax.adamw(
        schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    if cfg.freeze:
        labels = path_labels(params, cfg.freeze, "frozen", "train")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.skip_nonfinite:
        # Never gives up by itself; the training loop aborts after K bad steps in a row.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    return with_moment_dtype(tx, None if cfg.moment_dtype == "param" else jnp.dtype(cfg.moment_dtype))


def _cast(tree: Any, dtype) -> Any:
    """Floating leaves of `tree` cast to `dtype` (None = unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_moment_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` run in `dtype` (None: each parameter's own dtype): its state is initialised from the
    parameters cast to `dtype`, each update sees gradients and parameters cast to `dtype`, and the
    updates it returns are cast to their parameters' dtypes. The state is `inner`'s own (same pytree,
    so checkpoints and `nonfinite_counts` are unchanged)."""

    def init(params):
        return inner.init(_cast(params, dtype))

    def update(grads, state, params=None):
        target = params if params is not None else grads
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, target) if dtype is None else _cast(grads, dtype)
        updates, state = inner.update(grads, state, _cast(params, dtype))
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, target), state

    return optax.GradientTransformation(init, update)


def nonfinite_counts(opt_state: Any) -> tuple[Any, Any] | None:
    """(consecutive, total) skipped non-finite steps, if the optimiser tracks them."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)):
        if isinstance(s, optax.ApplyIfFiniteState):
            return s.notfinite_count, s.total_notfinite
    return None


def init_state(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh):
    """`tx.init(params)` on `mesh` with every parameter-shaped leaf (AdamW's moments) sharded like its
    parameter. Why: `jax.jit(tx.init)` left XLA to choose the moments' shardings and it replicated
    them (`zeros_like` of an FSDP-sharded parameter came out whole on every device: the tiny SFT
    config's step arguments were 7.8 MB per device on 8 devices instead of 1.4; at 11B that is
    2 x 42.7 GB per device)."""
    with jax.set_mesh(mesh):
        return jax.jit(sharded_init(tx, params, mesh))(params)


def sharded_init(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh):
    """The function `init_state` jits: `tx.init` with the moments constrained to their parameters'
    shardings (the planner compiles it abstractly)."""
    from sftrl_jax.parallel import rules

    shardings = rules.state_shardings(params, mesh)

    def init(params):
        state = tx.init(params)
        return optax.tree_map_params(tx, lambda x, s: jax.lax.with_sharding_constraint(x, s), state, shardings)

    return init
