"""Device mesh with axes (data, fsdp, tensor)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from sftrl_jax.errors import UserError
from sftrl_jax.parallel import rules


def parse_mesh_spec(text: str) -> dict[str, int]:
    """`"data=1,fsdp=8,tensor=1"` -> `{"data": 1, "fsdp": 8, "tensor": 1}` (missing axes are 1)."""
    sizes = dict.fromkeys(rules.MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in sizes:
            raise UserError(f"mesh spec {text!r}: expected name=size with names {rules.MESH_AXES}, got {part!r}")
        if name in seen:
            raise UserError(f"mesh spec {text!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"mesh spec {text!r}: size of {name!r} must be an integer, got {value!r}") from None
    return sizes


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill the one `-1` axis with the remaining devices; check the product equals `n_devices`."""
    unknown = [k for k in sizes if k not in rules.MESH_AXES]
    if unknown:
        raise UserError(f"unknown mesh axes {unknown}; the axes are {rules.MESH_AXES}")
    out = {a: int(sizes.get(a, 1)) for a in rules.MESH_AXES}
    free = [a for a, s in out.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"mesh {out}: at most one axis may be -1 (= the rest of the devices)")
    bad = [a for a, s in out.items() if s == 0 or s < -1]
    if bad:
        raise UserError(f"mesh {out}: axis sizes must be positive or -1, got {bad}")
    known = math.prod(s for s in out.values() if s != -1)
    if free:
        if n_devices % known:
            raise UserError(f"mesh {out}: the fixed axes ({known} devices) do not divide the {n_devices} devices")
        out[free[0]] = n_devices // known
    elif known != n_devices:
        raise UserError(f"mesh {out} needs {known} devices but {n_devices} are available")
    return out


def make_mesh(
    sizes: Mapping[str, int] | Sequence[int] | str | None = None, *, devices: Sequence | None = None
) -> jax.sharding.Mesh:
    """Mesh over `devices` (default: all) with axes (data, fsdp, tensor).

    `sizes` is a dict, a `(data, fsdp, tensor)` tuple or a `"data=1,fsdp=-1,tensor=1"` string; `-1`
    means the rest of the devices. Default: everything on fsdp. Axes are `Auto` (GSPMD propagation),
    so model code only annotates with `rules.constrain`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if sizes is None:
        sizes = {rules.FSDP: -1}
    elif isinstance(sizes, str):
        sizes = parse_mesh_spec(sizes)
    elif not isinstance(sizes, Mapping):
        if len(sizes) != len(rules.MESH_AXES):
            raise UserError(f"mesh sizes {tuple(sizes)}: expected one size per axis {rules.MESH_AXES}")
        sizes = dict(zip(rules.MESH_AXES, sizes))
    resolved = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(resolved[a] for a in rules.MESH_AXES)
    try:
        mesh_devices = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # irregular topologies (e.g. fake CPU devices): plain order is fine
        mesh_devices = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(
        mesh_devices, rules.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(rules.MESH_AXES)
    )
