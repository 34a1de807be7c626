"""bf16 parameters: the SFT step compiles and learns, the optimiser's moments have the declared dtype
(`optim.moment_dtype`), sharded like their parameters by `optim.init_state`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax.config import ConfigError
from sftrl_jax.models import build
from sftrl_jax.models import config as mc
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.sft.train import make_train_step
from sftrl_jax.train import optim
from sftrl_jax.train.state import TrainState, rng_data, split_params


def _moments(opt_state):
    """The AdamW moment pytrees (mu, nu) inside the optimiser state."""
    import optax

    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    adam = [s for s in found if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    return adam[0].mu, adam[0].nu


def _batch(vocab: int):
    ids = np.random.default_rng(0).integers(0, vocab, (8, 16))
    B, T = ids.shape
    return {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "targets": jnp.asarray(np.roll(ids, -1, axis=1), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }


@pytest.mark.parametrize(
    ("moment_dtype", "expected"),
    [pytest.param("float32", jnp.float32, marks=pytest.mark.slow), ("param", jnp.bfloat16)],
)
def test_sft_step_with_bf16_params(moment_dtype, expected):
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("data=1,fsdp=-1,tensor=1"))  # all 8 fake devices
    model = build.create_model(mc.LlamaConfig.tiny(), mesh=mesh, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    graphdef, params, rest = split_params(model)
    cfg = optim.OptimConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant", moment_dtype=moment_dtype)
    tx = optim.make_optimizer(cfg, params, total_steps=10)
    opt_state = optim.init_state(tx, params, mesh)
    for moments in _moments(opt_state):
        for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(params), strict=True):
            assert m.dtype == expected
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim)  # sharded like its parameter
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng_data(0))
    step = jax.jit(make_train_step(graphdef, rest, tx, grad_accum=2, lr_fn=optim.schedule(cfg, 10)), donate_argnums=0)
    batch = _batch(model.config.text.vocab_size)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(6):
            state, m = step(state, batch)
            assert bool(m["finite"])
            losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(state.params))
    for moments in _moments(state.opt_state):
        assert all(m.dtype == expected for m in jax.tree.leaves(moments))


def test_nonfinite_step_with_bf16_params_is_skipped():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.bfloat16)}
    tx = optim.make_optimizer(optim.OptimConfig(lr=0.1, warmup_ratio=0.0), params, total_steps=4)
    state = tx.init(params)
    grads = {"w": jnp.full((4, 3), jnp.nan, jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 and not np.any(np.asarray(u, np.float32)) for u in jax.tree.leaves(updates))
    assert int(optim.nonfinite_counts(state)[1]) == 1
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(_moments(state)))


def test_moment_dtype_is_checked():
    optim.OptimConfig(moment_dtype="bfloat16")
    with pytest.raises(ConfigError, match="moment_dtype"):
        optim.OptimConfig(moment_dtype="float16")
