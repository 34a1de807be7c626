"""PPO's critic: an MLP on the backbone's final hidden state at the last prompt token (RL4VLM).

    value = W3 relu(W2 relu(W1 h + b1) + b2) + b3,    h in R^D, widths D -> 1024 -> 512 -> 1

The actor and the critic share the backbone (one model, one optimiser): `PolicyWithValue` holds both
so that a single `nnx.split` gives all trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax.models import layers


class ValueHead(nnx.Module):
    def __init__(self, dim: int, *, hidden: Sequence[int] = (1024, 512), param_dtype=jnp.float32, rngs: nnx.Rngs):
        widths = (dim, *hidden, 1)
        self.kernels = nnx.List(
            [
                layers.param(rngs, layers.normal, (a, b), ("embed" if i == 0 else None, None), param_dtype)
                for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
            ]
        )
        self.biases = nnx.List([layers.param(rngs, layers.zeros, (b,), (None,), param_dtype) for b in widths[1:]])

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> values [...] (fp32)."""
        x = h.astype(jnp.float32)
        n = len(self.kernels)
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            x = x @ w[...].astype(jnp.float32) + b[...].astype(jnp.float32)
            if i < n - 1:
                x = jax.nn.relu(x)
        return x[..., 0]


class PolicyWithValue(nnx.Module):
    """The language model (actor) and the value head (critic) as one trainable module."""

    def __init__(self, model: nnx.Module, value_head: ValueHead):
        self.model = model
        self.value_head = value_head

    @property
    def config(self):
        return self.model.config
