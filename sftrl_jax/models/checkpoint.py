"""Model checkpoints in our own format: an orbax checkpoint of the parameters plus our config JSON.

    CKPT/model_config.json   our config (every field, including the semantics flags) + param dtype
    CKPT/params/             orbax StandardCheckpointer tree, same structure as `nnx.state(model)`

`sftrl convert` writes one from an HF folder, `sftrl export` turns one back into an HF folder, and
`load_checkpoint` restores one straight into the shardings of a mesh.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sftrl_jax.errors import UserError
from sftrl_jax.models import build
from sftrl_jax.models import config as config_lib

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_checkpoint_config(path: str) -> tuple[config_lib.ModelConfig, str]:
    """(config, stored parameter dtype name) of a checkpoint folder."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not a sftrl_jax model checkpoint (no {CONFIG_FILE})") from None
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8
        raise UserError(f"{file}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{file}: must be a JSON object, got a {type(d).__name__}")
    dtype = d.pop("param_dtype", "float32")
    try:
        return config_lib.from_dict(d), dtype
    except UserError as e:
        raise UserError(f"{file}: {e}") from None


def save_checkpoint(model: nnx.Module, path: str) -> None:
    """Write `model`'s parameters (any sharding; every process calls this) and config to `path`."""
    path = os.path.abspath(path)
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(state)
    dtype = np.dtype(leaves[0].dtype).name if leaves else "float32"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(state), force=True)
    if jax.process_index() == 0:
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({**config_lib.to_dict(model.config), "param_dtype": dtype}, f, indent=2)


def load_checkpoint(
    path: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    compute_dtype=None,
    remat: bool = False,
    config: config_lib.ModelConfig | None = None,
) -> nnx.Module:
    """Restore a checkpoint written by `save_checkpoint` / `sftrl convert`.

    Each parameter is read directly into its sharding on `mesh` (default: one device). `dtype`
    (default: as stored) casts the parameters; `config` may replace the stored one (same shapes).
    """
    path = os.path.abspath(path)
    stored, stored_dtype = read_checkpoint_config(path)
    config = stored if config is None else config
    param_dtype = jnp.dtype(dtype if dtype is not None else stored_dtype)
    graphdef, abstract_state = nnx.split(
        build.abstract_model(config, param_dtype=param_dtype, dtype=compute_dtype, remat=remat)
    )
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), abstract_state)
    else:
        shardings = build.shardings(abstract_state, mesh)
        target = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract_state, shardings
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(target))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{path}: cannot restore the parameters for this config ({e})") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
