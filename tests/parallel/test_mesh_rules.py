"""Mesh construction and the logical-axis rules table."""

import jax
import jax.numpy as jnp
import pytest

from sftrl_jax.errors import UserError
from sftrl_jax.parallel import make_mesh, mesh, rules


def test_rules_drop_axes_that_do_not_divide():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    assert rules.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), sizes) == jax.sharding.PartitionSpec(
        "fsdp"
    )
    assert rules.logical_to_spec(("batch", "seq"), (4, 7), {"data": 2, "fsdp": 2}) == jax.sharding.PartitionSpec(
        ("data", "fsdp")
    )
    assert rules.logical_to_spec(("batch", "seq"), (2, 7), {"data": 2, "fsdp": 2}) == jax.sharding.PartitionSpec("data")
    with pytest.raises(KeyError, match="no rule"):
        rules.logical_to_spec(("nonsense",), (4,), sizes)


def test_constrain_is_a_no_op_without_mesh():
    x = jnp.ones((4, 3))
    assert rules.constrain(x, ("batch", None)) is x


def test_mesh_sizes_and_errors():
    assert mesh.resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.parse_mesh_spec("data=1, fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(UserError, match="do not divide"):
        mesh.resolve_axis_sizes({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(UserError, match="needs 6 devices but 8"):
        mesh.resolve_axis_sizes({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(UserError, match="at most one"):
        mesh.resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(UserError, match="expected name=size"):
        mesh.parse_mesh_spec("pipeline=2")
    m = make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_state_shardings_follow_param_names(n_devices):
    from flax import nnx

    from sftrl_jax.models import build
    from sftrl_jax.models import config as config_lib

    if n_devices < 8:
        pytest.skip("needs 8 devices")
    m = make_mesh((1, 2, 4))
    state = nnx.state(build.abstract_model(config_lib.LlamaConfig.tiny()))
    shardings = build.flat_params(rules.state_shardings(state, m))
    assert shardings["model.layers.0.mlp.gate_proj"].get_value().spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert shardings["model.layers.0.self_attn.o_proj"].get_value().spec == jax.sharding.PartitionSpec(
        "tensor", None, "fsdp"
    )
    assert shardings["model.norm.scale"].get_value().spec == jax.sharding.PartitionSpec("fsdp")
