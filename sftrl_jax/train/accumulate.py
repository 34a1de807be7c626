"""Gradient accumulation and the optimiser update: the one step body SFT, PPO and GRPO share.

    grads, aux = accumulate(loss_fn, params, batch, n_micro=4)   # summed grads, aux stacked [4, ...]
    state, metrics = apply(state, grads, tx, lr_fn=lr_fn)

`accumulate` cuts the step's batch [B, ...] into `n_micro` micro-batches [B / n_micro, ...], scans
them in order (one forward/backward each, so activation memory is one micro-batch's) and sums their
gradients. The parameters ride in the scan's carry behind an `optimization_barrier`, so to XLA they
are new values each iteration: otherwise its loop-invariant code motion hoists every FSDP all-gather
of a weight out of the micro-batch loop, and the whole model sits gathered on every device for the
whole step (`sftrl plan` on the 11B SFT step: 291 all-gathers, 27.96 GiB per device, in the entry
computation). How the sum is normalised is the loss's business (SFT: by the step's loss tokens, so the
update equals one big batch's; PPO/GRPO: by the micro-batch count), so the caller divides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sftrl_jax.models import lora
from sftrl_jax.parallel import rules


def micro_batches(batch: dict[str, jax.Array], n_micro: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n_micro, B / n_micro, ...] for every array of `batch` (rows keep their order)."""
    return jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)


def accumulate(
    loss_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    batch: dict[str, jax.Array],
    *,
    n_micro: int,
    key: jax.Array | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """(sum over micro-batches of d loss_fn / d params, loss_fn's aux stacked over micro-batches); of
    a LoRA model's trainable parameters only (`models.lora.partition`).

    `loss_fn(params, micro_batch) -> (loss, aux)`; aux values are scalars (so the stacked aux holds
    [n_micro] arrays). `key` (`step_key`): the LoRA adapters' dropout masks (none without it)."""
    # A LoRA model: gradients of the trainable parameters only (adapters, a value head); the frozen
    # base rides along as an input, differentiated through its activations only.
    trainable, frozen = lora.partition(params)
    grad_fn = jax.value_and_grad(lambda t, f, mb: loss_fn(lora.combine(t, f), mb), has_aux=True)

    def step(carry, xs):
        p, grads = carry
        i, mb = xs
        p = jax.lax.optimization_barrier(p)  # loop-variant to XLA: its gathers stay in the loop
        with lora.dropout_key(None if key is None else jax.random.fold_in(key, i)):
            (_, aux), g = grad_fn(*p, mb)
        # The running sum sharded like the parameters (FSDP): not one whole gradient per device.
        return (p, rules.constrain_params(jax.tree.map(jnp.add, grads, g))), aux

    zeros = rules.constrain_params(jax.tree.map(jnp.zeros_like, trainable))
    xs = (jnp.arange(n_micro), micro_batches(batch, n_micro))
    (_, grads), aux = jax.lax.scan(step, ((trainable, frozen), zeros), xs)
    # Parameters a step does not use (the vision tower and cross-attention layers of a text-only
    # batch) have gradients that are zeros XLA can prove constant; divided by a constant (PPO/GRPO's
    # micro-batch count) they stay constant, and XLA then constant-folds the optimiser's finite checks
    # and norms over each of those parameters, element by element (`sftrl plan` on the 11B GP-L PPO
    # update: minutes of "Constant folding an instruction is taking > 8s"). The barrier makes them
    # ordinary values: same numbers, nothing folded.
    return jax.lax.optimization_barrier(grads), aux


def step_key(state) -> jax.Array:
    """A training step's random key: the run's key folded with the step (LoRA dropout)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def reduce_aux(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-micro-batch metrics -> the step's: the max of `*_max` keys, the mean of the others."""
    return {k: (v.max() if k.endswith("_max") else v.mean()) for k, v in aux.items()}


def apply(state, grads: Any, tx: optax.GradientTransformation, *, lr_fn) -> tuple[Any, dict[str, jax.Array]]:
    """One optimiser update of the `TrainState` with the (normalised) gradients; returns the new
    state and the update's own metrics (grad and update norms, learning rate, whether finite)."""
    trainable, frozen = lora.partition(state.params)  # `grads`: of the trainable ones (`accumulate`)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = lora.combine(optax.apply_updates(trainable, updates), frozen)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "grad_norm": grad_norm,
        "update_norm": optax.tree.norm(updates),
        "lr": lr_fn(state.step),
        "finite": jnp.isfinite(grad_norm),
    }
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics
