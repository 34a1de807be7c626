"""Tiny models with peaked next-token distributions (weights at O(1) activation scale), no torch."""

from __future__ import annotations

import numpy as np
from flax import nnx

from sftrl_jax.models import build
from sftrl_jax.models import config as config_lib


def peaked_model(config: config_lib.ModelConfig, *, seed: int = 0, mesh=None):
    """`build.create_model`, then every matrix rescaled to ~1/sqrt(fan-in) and embeddings to 0.5, so
    logits are far from uniform (greedy decoding has no near-ties) and every path matters."""
    model = build.create_model(config, seed=seed, mesh=mesh)
    state = nnx.state(model, nnx.Param)

    def rescale(path: str, var: nnx.Variable):
        value = var[...]
        names = var.get_metadata().get("out_sharding") or ()
        if value.ndim < 2 or var.get_metadata().get("init") != "normal":
            return value
        if names and names[0] == "vocab" or "embedding" in path:
            return value * 25.0  # std 0.5
        fan_in = int(np.prod(value.shape[:2])) if path.endswith("o_proj") else value.shape[0]
        return value * (1.0 / np.sqrt(fan_in) / 0.02)

    nnx.update(model, build.map_params(state, rescale))
    return model
